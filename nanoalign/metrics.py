"""Logging: one fixed-format line per step on rank 0, the same dict appended to metrics.jsonl, and plots.

Tests and tools read metrics.jsonl, never stdout. NaN (e.g. a reward no sample could score) is
written as null so the file stays valid JSON.
"""

import json
import math
from pathlib import Path

from tqdm import tqdm

# Shown in the step line, in this order, when present; everything else goes only to metrics.jsonl.
HEADLINE = ("loss", "reward", "eval/loss", "eval/accuracy", "rewards/accuracies", "grad_norm", "lr")
# Counts, summed over ranks (not averaged), and shown in the step line whenever they are not 0.
COUNTS = ("skipped_samples", "skipped_rows", "skipped_pairs", "truncated_rows", "eval/skipped_samples")


def _clean(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsLog:
    def __init__(self, out_dir, rank: int, log_every: int = 1):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.rank, self.log_every = rank, log_every

    def log(self, step: int, metrics: dict, force_print: bool = False) -> None:
        if self.rank != 0:
            return
        record = {"step": step, **{k: _clean(float(v)) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if force_print or step % self.log_every == 0:
            shown = " | ".join([f"{k} {metrics[k]:.4g}" for k in HEADLINE if k in metrics]
                               + [f"{k} {metrics[k]:g}" for k in COUNTS if metrics.get(k)])  # fmt: skip
            tqdm.write(f"step {step:5d} | {shown}")  # above the progress bar, not through it


    def amend_last(self, metrics: dict) -> None:
        """Add metrics measured after the last step was logged (e.g. the exported model's accuracy)
        to that step's record, so metrics.jsonl keeps one record per step."""
        if self.rank != 0:
            return
        lines = self.path.read_text().splitlines()
        lines[-1] = json.dumps({**json.loads(lines[-1]), **{k: _clean(float(v)) for k, v in metrics.items()}})
        self.path.write_text("".join(line + "\n" for line in lines))


def read_metrics(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_metrics(jsonl_path, png_path) -> list[str]:
    """Plot loss, reward and eval curves from metrics.jsonl into one PNG. Returns the keys plotted."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    records = read_metrics(jsonl_path)
    wanted = ["loss", "eval/loss", "reward", "eval/accuracy", "rewards/accuracies", "rewards/margins"]
    keys = [k for k in wanted if any(r.get(k) is not None for r in records)]
    if not keys:
        return []
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, markersize=3)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return keys


def first_logged(out_dir: Path, key: str) -> float | None:
    """The first logged value of `key` in this run's metrics.jsonl."""
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        if (value := json.loads(line).get(key)) is not None:
            return value
    return None
