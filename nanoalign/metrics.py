"""Logging: one fixed-format line per step on rank 0, the same dict appended to metrics.jsonl (and sent to a
tracker with --report-to), and plots. Tests and tools read metrics.jsonl, never stdout; NaN is written as null
so the file stays valid JSON. A tracker (trackio or wandb: one API) gets each record, nulls left out, and the
tables of samples made since the last step (`Run.tables`: held-out answers, RL rollouts with their rewards).
"""

import dataclasses
import importlib
import json
import math
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from nanoalign.data import message_text

# Shown in the step line, in this order, when present; everything else goes only to metrics.jsonl.
HEADLINE = ("loss", "reward", "eval/loss", "eval/accuracy", "rewards/accuracies", "grad_norm", "lr")
# Counts, summed over ranks (not averaged), and shown in the step line whenever they are not 0.
COUNTS = ("skipped_samples", "skipped_rows", "skipped_pairs", "truncated_rows", "eval/skipped_samples")
TABLE_ROWS = 4  # samples per tracker table: a look at what the model writes, not a measurement


def _clean(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def sample_table(samples: list[dict], **columns: list) -> list[dict]:
    """The first TABLE_ROWS samples as tracker-table rows: first image, the prompt's last turn, then each column's value."""
    return [{"image": s["images"][0] if s["images"] else None, "prompt": message_text(s["prompt"][-1]),
             **{name: values[i] for name, values in columns.items()}} for i, s in enumerate(samples[:TABLE_ROWS])]  # fmt: skip


class Tracker:
    """The run in trackio or wandb, on rank 0 (imported only when asked for). out_dir/tracker.json names it, so a
    resume with the same tracker, project and --run-name (or none) continues it; any other starts a new one."""

    def __init__(self, cfg, out_dir: Path, resumed: bool):
        self.lib = importlib.import_module(cfg.report_to)  # check_config made sure it is installed
        saved_path = out_dir / "tracker.json"
        saved = json.loads(saved_path.read_text()) if resumed and saved_path.exists() else {}
        same = saved.get("report_to") == cfg.report_to and saved.get("project") == cfg.tracker_project
        same = same and cfg.run_name in (None, saved["name"])
        named = {"name": cfg.run_name}
        if same:  # wandb finds a run by its id, trackio by its name
            named = {"name": saved["name"], "resume": "must", **({"id": saved["id"]} if cfg.report_to == "wandb" else {})}
        self.run = self.lib.init(project=cfg.tracker_project, config=dataclasses.asdict(cfg), **named)
        note = "" if same or not resumed else (f" without this training's earlier steps: {saved_path} names no {cfg.report_to} "
                                               "run of this project and --run-name")  # fmt: skip
        print(f"{cfg.report_to}: {'continuing' if same else 'new'} run {self.run.name!r} in project {cfg.tracker_project!r}{note}")
        saved = {"report_to": cfg.report_to, "project": cfg.tracker_project, "name": self.run.name, "id": self.run.id}
        saved_path.write_text(json.dumps(saved))

    def log(self, record: dict, tables: dict[str, list[dict]]) -> None:
        values = {k: v for k, v in record.items() if k != "step" and v is not None}
        for name, rows in tables.items():
            cells = [[self.lib.Image(v) if isinstance(v, Image.Image) else v for v in row.values()] for row in rows]
            values[name] = self.lib.Table(columns=list(rows[0]), data=cells)
        self.lib.log(values, step=record["step"])


class MetricsLog:
    def __init__(self, out_dir, rank: int, log_every: int = 1, tracker: Tracker | None = None, tables: dict | None = None):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.rank, self.log_every, self.tracker = rank, log_every, tracker
        self.tables = {} if tables is None else tables  # Run.tables: filled by the run, sent (and emptied) with each step

    def log(self, step: int, metrics: dict, force_print: bool = False) -> None:
        tables = {name: rows for name, rows in self.tables.items() if rows}
        self.tables.clear()
        if self.rank != 0:
            return
        record = {"step": step, **{k: _clean(float(v)) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tracker:
            self.tracker.log(record, tables)
        if force_print or step % self.log_every == 0:
            shown = " | ".join([f"{k} {metrics[k]:.4g}" for k in HEADLINE if k in metrics]
                               + [f"{k} {metrics[k]:g}" for k in COUNTS if metrics.get(k)])  # fmt: skip
            tqdm.write(f"step {step:5d} | {shown}")  # above the progress bar, not through it

    def amend_last(self, metrics: dict) -> None:
        """Add metrics measured after the last step was logged (the exported model's accuracy) to its record."""
        if self.rank != 0:
            return
        lines = self.path.read_text().splitlines()
        added = {k: _clean(float(v)) for k, v in metrics.items()}
        lines[-1] = json.dumps({**json.loads(lines[-1]), **added})
        self.path.write_text("".join(line + "\n" for line in lines))
        if self.tracker:
            self.tracker.log({"step": json.loads(lines[-1])["step"], **added}, {})

    def close(self) -> None:
        if self.tracker:
            self.tracker.lib.finish()  # trackio writes in the background: finish flushes it


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


def logged(out_dir: Path, key: str) -> list[float]:
    """Every logged value of `key` in this run's metrics.jsonl, in step order (a resumed run's too)."""
    return [record[key] for record in read_metrics(out_dir / "metrics.jsonl") if record.get(key) is not None]
