"""The tracker (--report-to): trackio in its local mode (no account) gets exactly metrics.jsonl's values
and the tables of samples; a resumed run continues its tracker run; nothing imports a tracker
unless asked to, and a missing one is named with its pip command."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
from conftest import one_thread

from nanoalign.config import Config, check_config
from nanoalign.metrics import TABLE_ROWS, read_metrics
from nanoalign.shapes import shapes_sample

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # train.py lives at the repo root
import train as train_module  # noqa: E402

PROJECT, RUN = "nanoalign-test", "grpo-run"


def grpo(out_dir, warm_model: str, max_steps: int, *flags: str) -> dict:
    argv = ["--algo", "grpo", "--model", warm_model, "--out-dir", str(out_dir), "--max-steps", str(max_steps),
            "--batch-size", "8", "--num-generations", "4", "--max-completion-length", "16", "--warmup-steps", "1",
            "--eval-every", "1", "--num-eval-samples", "6", "--save-every", "1", "--no-export", *flags]  # fmt: skip
    with one_thread():
        return train_module.train(train_module.parse_config(argv))


@pytest.fixture(scope="module")
def tracked(warm_model, tmp_path_factory):
    """A 2-step GRPO run logged to trackio, then resumed for a third step: (out_dir, trackio's records
    by step). trackio reads TRACKIO_DIR once, when the run first imports it."""
    assert "trackio" not in sys.modules, "trackio was imported before its storage could be pointed at a temp dir"
    os.environ["TRACKIO_DIR"] = str(tmp_path_factory.mktemp("trackio"))
    out = tmp_path_factory.mktemp("tracked") / "grpo"
    grpo(out, warm_model, 2, "--report-to", "trackio", "--tracker-project", PROJECT, "--run-name", RUN)
    grpo(out, warm_model, 3, "--report-to", "trackio", "--tracker-project", PROJECT)  # resumes at step 2, same run
    import trackio
    from trackio.sqlite_storage import SQLiteStorage

    assert [run.name for run in trackio.Api().runs(PROJECT)] == [RUN]  # the resumed run did not start another
    by_step = {}
    for entry in SQLiteStorage.get_logs(PROJECT, RUN):
        by_step.setdefault(entry["step"], {}).update(entry)
    return out, by_step


def test_trackio_gets_every_value_of_metrics_jsonl(tracked):
    out, by_step = tracked
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3] == sorted(by_step)
    for record in records:
        logged = {k: v for k, v in record.items() if v is not None}
        assert {k: by_step[record["step"]].get(k) for k in logged} == logged


def test_trackio_gets_tables_of_held_out_answers_and_rollouts(tracked):
    _, by_step = tracked
    for step in (0, 1, 2, 3):  # every step evaluates (--eval-every 1)
        rows = by_step[step]["eval/samples"]["_value"]
        assert len(rows) == TABLE_ROWS and set(rows[0]) == {"image", "prompt", "answer", "gold", "right"}
        assert [r["gold"] for r in rows] == [shapes_sample("eval", i, "rl")["solution"] for i in range(TABLE_ROWS)]
        assert all(r["image"]["_type"] == "trackio.image" and isinstance(r["right"], bool) for r in rows)
    for step in (1, 2, 3):  # every step samples a generation batch; its first rows are shown with their rewards
        rows = by_step[step]["train/rollouts"]["_value"]
        assert len(rows) == TABLE_ROWS and set(rows[0]) == {"image", "prompt", "completion", "reward"}
        assert all(isinstance(r["reward"], float) and isinstance(r["completion"], str) for r in rows)
    assert "train/rollouts" not in by_step[0]  # nothing is sampled before the first step


def test_training_never_imports_a_tracker_unless_asked(tiny_dirs, tmp_path, monkeypatch):
    for name in ("trackio", "wandb"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed: importing it raises
    argv = ["--algo", "sft", "--out-dir", str(tmp_path), "--max-steps", "1", "--batch-size", "2", "--num-eval-samples", "2",
            "--no-export"]  # fmt: skip
    with one_thread():
        assert train_module.train(train_module.parse_config(argv))["loss"] > 0


def test_a_missing_tracker_or_a_stray_tracker_flag_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)  # nothing installed
    for tracker in ("trackio", "wandb"):
        with pytest.raises(ValueError, match=rf"pip install -e '\.\[{tracker}\]'"):
            check_config(Config(report_to=tracker))
    with pytest.raises(ValueError, match="--run-name.*without --report-to"):
        check_config(Config(run_name="mine"))
