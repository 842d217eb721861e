"""Tests for nanoalign/sft.py and the training loop (train.py) on the tiny Qwen2.5-VL:

  * data parallel and gradient accumulation give the gradient of one big batch (2-process FSDP
    over gloo vs 1 process; the step's global token count is what makes them agree);
  * a run killed after a checkpoint resumes exactly where the uninterrupted run would be;
  * the exported model loads with from_pretrained and equals the trained weights;
  * `python train.py --help` lists every flag with its docstring.
"""

import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from nanoalign import sft
from nanoalign.config import PRESETS, Config
from nanoalign.checkpoint import latest_checkpoint
from nanoalign.metrics import read_metrics
from nanoalign.model import Policy

REPO = Path(__file__).resolve().parents[1]
import train as train_module  # noqa: E402
from conftest import CORE_FAMILIES, assert_same_step, crash_after_checkpoint, kill_at_first_checkpoint, subprocess_env  # noqa: E402
from parity_worker import parity_samples  # noqa: E402  (tests/ is on pythonpath, pyproject.toml)
from test_algorithms import run_train  # noqa: E402


# -----------------------------------------------------------------------------
# sft_loss: hand values


def test_sft_loss_sums_and_divides_by_step_tokens():
    logps = torch.tensor([[0.0, -1.0, -2.0, -9.0], [0.0, -0.5, -7.0, -7.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    # counted: -1, -2 (row 0) and -0.5 (row 1): nll_sum = 3.5; over a step of 7 tokens: 3.5 / 7 = 0.5
    loss, metrics = sft.sft_loss(logps, mask, 7.0)
    assert_close(loss, torch.tensor(0.5))
    assert_close(metrics["nll_sum"], torch.tensor(3.5))
    assert_close(metrics["num_tokens"], torch.tensor(3.0))


# -----------------------------------------------------------------------------
# data parallel and gradient accumulation parity


def test_reference_step_is_the_global_token_mean(one_process, load_family, tiny_dirs):
    # The one-micro-batch reference itself equals the definition, computed without FSDP:
    # loss = -SUM_{rows,t} M l_t / SUM M over the 4 rows.
    processor, model, stop_ids = load_family("tiny")
    samples = parity_samples()
    batch = sft.encode(samples, _run_stub(processor, stop_ids))
    with torch.no_grad():
        logps, _ = Policy(model)(**batch.model_inputs())
    expected = float(-(logps * batch.mask).sum() / batch.mask.sum())
    assert one_process["sft:4:1"]["num_tokens"] == float(batch.mask.sum())
    assert_close(one_process["sft:4:1"]["loss"], expected, rtol=1e-6, atol=1e-6)


# test_fsdp_two_ranks_match_one_process: one test for every family in test_families.py (for "tiny" on
# one_process/two_processes, the conftest.py fixtures the tests below share)


def test_gradient_accumulation_matches_one_big_batch(one_process, two_processes):
    reference = one_process["sft:4:1"]
    # Every row has a different number of counted tokens (so does every split of them): a
    # per-micro-batch token mean would weight them differently and NOT give this gradient.
    row_tokens = one_process["sft:1:4"]["rank_tokens"]
    assert len(set(row_tokens)) == 4, row_tokens
    assert sum(row_tokens) == reference["num_tokens"]
    assert one_process["sft:2:2"]["rank_tokens"][0] != one_process["sft:2:2"]["rank_tokens"][1]
    assert_same_step(one_process["sft:2:2"], reference)  # 1 process, 2 micro-batches of 2
    assert_same_step(one_process["sft:1:4"], reference)  # 1 process, 4 micro-batches of 1
    assert_same_step(two_processes["sft:1:2"], reference)  # 2 ranks x 2 micro-batches of 1


def test_preference_step_two_ranks_and_accumulation_match_one_process(one_process, two_processes):
    # DPO and MPO (sigmoid + bco_pair + sft) against a frozen reference: the pairs' chosen answers
    # have different lengths, so MPO's sft term is right only if normalised over the whole step.
    assert_same_step(two_processes["dpo:2:1"], one_process["dpo:4:1"])  # 2 ranks x 2 pairs
    reference = one_process["mpo:4:1"]
    assert_same_step(one_process["mpo:2:2"], reference)  # 1 process, 2 micro-batches of 2 pairs
    assert_same_step(two_processes["mpo:1:2"], reference)  # 2 ranks x 2 micro-batches of 1 pair


def test_metrics_average_over_the_ranks_that_measured_them(two_processes):
    # train.py logs mean_over_ranks of every metric. A rank with nothing to measure reports NaN (e.g.
    # online DPO with every pair skipped there); it must not turn the mean into NaN or halve it.
    means = two_processes["mean_over_ranks"]
    assert means["partly"] == 3.0  # rank 1's value alone, not (NaN + 3) / 2 nor 3 / 2
    assert means["everywhere"] == 0.5  # (0 + 1) / 2
    assert math.isnan(means["nowhere"])


def _run_stub(processor, stop_ids):
    from nanoalign.config import Config
    from nanoalign.runtime import Run

    return Run(Config(max_length=512), processor, None, None, 0, 1, torch.device("cpu"), stop_ids, processor.tokenizer.pad_token_id)


# -----------------------------------------------------------------------------
# resume


def flags(out_dir, **overrides) -> list[str]:
    """CLI flags of a short tiny SFT run (no eval: the loop, checkpoints and data order are what count)."""
    values = {"out-dir": out_dir, "max-steps": 6, "batch-size": 2, "warmup-steps": 2, "save-every": 3,
              "num-shapes-samples": 64, "eval-split": "", "logps-chunk-size": 64, **overrides}  # fmt: skip
    argv = []
    for key, value in values.items():
        argv += [f"--{key}", str(value)] if value is not None else [f"--{key}"]
    return argv


def losses(path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(path)}


@pytest.mark.parametrize("name", CORE_FAMILIES)
def test_resume_after_crash_reproduces_uninterrupted_run(name, tmp_path, tiny_dirs, monkeypatch):
    # (LLaVA too: its vision post_layernorm never gets a gradient, so AdamW has no state for it.)
    common = {"model": name, "no-export": None}
    # Uninterrupted: 6 steps (warm-up 2, cosine to step 6), a checkpoint every 3 steps.
    train_module.train(train_module.parse_config(flags(tmp_path / "full", **common)))
    full = losses(tmp_path / "full" / "metrics.jsonl")
    assert sorted(full) == [1, 2, 3, 4, 5, 6]
    assert full[6]["loss"] < full[1]["loss"]  # it trains

    # Interrupted: the same run dies right after writing the step-3 checkpoint (the schedule is the
    # 6-step one, so the resumed LR must come from the restored scheduler, not a fresh one) ...
    crash_after_checkpoint(monkeypatch, 3, flags(tmp_path / "cut", **common))
    assert latest_checkpoint(tmp_path / "cut").name == "step_000003"
    # ... and a fresh process-level call of train() on the same out_dir resumes and finishes.
    train_module.train(train_module.parse_config(flags(tmp_path / "cut", **common)))
    cut = losses(tmp_path / "cut" / "metrics.jsonl")
    assert [r["step"] for r in read_metrics(tmp_path / "cut" / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        for key in ("loss", "grad_norm", "lr", "num_tokens"):
            assert_close(cut[step][key], full[step][key], rtol=1e-6, atol=1e-7, msg=f"step {step} {key}")


def test_summary_line_reports_a_start_accuracy_of_zero(tmp_path, tiny_dirs, capsys):
    # The random tiny model answers no held-out question right at step 0, so the run starts at 0.0:
    # the summary must still say where it started (it once took 0.0 for "no accuracy eval").
    argv = flags(tmp_path, **{"max-steps": 1, "save-every": 0, "eval-split": "eval", "num-eval-samples": 4, "no-export": None})
    metrics = train_module.train(train_module.parse_config(argv))
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["eval/accuracy"] == 0.0
    summary = f"eval accuracy: start 0.000 -> end {metrics['eval/accuracy']:.3f}"
    assert summary in capsys.readouterr().out
    # Resumed at its last step, a run evaluates nothing: the summary reads the logged evaluations (was "end nan").
    assert train_module.train(train_module.parse_config(argv)) == {}
    assert summary in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:Detected an existing checkpoint")  # a half-written one may be rewritten
def test_resume_after_sigkill(tmp_path, tiny_dirs):
    # A real kill: `python train.py` is SIGKILLed as soon as a checkpoint exists (it may be anywhere
    # after it: mid-step, mid-log or mid-save of the next checkpoint). A constant LR (no warm-up,
    # floor ratio 1) makes the run's length irrelevant, so the kill needs no precise timing.
    common = {"warmup-steps": 0, "min-lr-ratio": 1.0, "no-export": None, "save-every": 2}
    killed_dir = tmp_path / "killed"
    returncode = kill_at_first_checkpoint(flags(killed_dir, **{**common, "max-steps": 10_000}), killed_dir,
                                          tmp_path / "killed.log", timeout=180)  # fmt: skip
    assert returncode == -signal.SIGKILL
    resumed_from = int(latest_checkpoint(killed_dir).name.removeprefix("step_"))  # read after the kill
    end = resumed_from + 3

    train_module.train(train_module.parse_config(flags(killed_dir, **{**common, "max-steps": end})))
    train_module.train(train_module.parse_config(flags(tmp_path / "reference", **{**common, "max-steps": end})))
    reference = losses(tmp_path / "reference" / "metrics.jsonl")
    # The resumed run's records are the file's last 3 lines (the killed run may have logged a few
    # steps past its checkpoint before dying; those lines come before them).
    resumed = read_metrics(killed_dir / "metrics.jsonl")[-3:]
    assert [r["step"] for r in resumed] == list(range(resumed_from + 1, end + 1))
    for record in resumed:
        for key in ("loss", "grad_norm", "num_tokens"):
            assert_close(record[key], reference[record["step"]][key], rtol=1e-6, atol=1e-7, msg=f"step {record['step']} {key}")


@pytest.mark.filterwarnings("ignore:Detected an existing checkpoint")  # the stale step_000002 is overwritten
def test_no_resume_rerun_keeps_its_checkpoint(tmp_path, tiny_dirs):
    # A --no-resume rerun in an out_dir holding a longer run's checkpoints (steps 2 and 4): its own
    # step-1 checkpoint must survive the "keep the 2 newest" clean-up, and a resume must find it.
    out = tmp_path / "run"
    train_module.train(train_module.parse_config(flags(out, **{"max-steps": 4, "save-every": 2, "no-export": None})))
    train_module.train(train_module.parse_config(flags(out, **{"max-steps": 1, "no-resume": None, "no-export": None})))
    latest = latest_checkpoint(out)
    assert latest.name == "step_000001" and (latest / ".metadata").exists()
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1]  # a fresh run starts a fresh log
    train_module.train(train_module.parse_config(flags(out, **{"max-steps": 2, "no-export": None})))
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]


# -----------------------------------------------------------------------------
# export


# test_export_round_trip (3 steps through train.train, then the export train.py wrote): one test for
# every family in test_families.py


# -----------------------------------------------------------------------------
# command line


def test_help_lists_flags_with_docstrings():
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--help"], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = " ".join(proc.stdout.replace("│", " ").split())  # drop the box drawing and line wrapping
    for flag, doc in [
        ("--grad-accum-steps", "Micro-batches per optimizer step on each rank."),
        ("--max-length", "Longest row (prompt + completion, image tokens included)."),
        ("--skip-bad-samples", "Skip (and count in the logs) samples that cannot be used"),
        ("--algo", "Training method: sft, dpo, mpo, grpo, gspo, rloo or online_dpo."),
    ]:
        assert flag in text and doc in text, (flag, doc)


def test_tiny_sft_is_built_in_two_cached_phases(tmp_path, monkeypatch):
    # The RL/preference demos start from "tiny-sft": clean SFT from "tiny" first, then SFT from that
    # on the over-counting teacher. Each phase is built once; a second run reuses both.
    monkeypatch.setenv("NANOALIGN_CACHE", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # the gspo run's own out_dir (runs/gspo) lands here, not in the repository
    built = []

    def fake_train(cfg):  # records the run and leaves what a finished run leaves: final/config.json
        built.append(cfg)
        (Path(cfg.out_dir) / "final").mkdir(parents=True, exist_ok=True)
        (Path(cfg.out_dir) / "final" / "config.json").write_text("{}")

    monkeypatch.setattr(train_module, "train", fake_train)
    cfg = train_module.parse_config(["--algo", "gspo"])
    with pytest.raises(ValueError, match="num-generations"):  # a bad flag stops before the warm start's runs
        train_module.main(["--algo", "gspo", "--num-generations", "1"])
    assert built == []
    with pytest.raises(ValueError, match="tiny-sft is not built yet"):  # train() alone never builds it
        train_module.resolve_model(cfg, rank=0, device="cpu")
    train_module.main(["--algo", "gspo"])  # the command line builds it first, as a stage of its own
    clean, biased, run = built
    assert (clean.algo, clean.model, clean.shapes_overcount) == ("sft", "tiny", 0.0)
    assert biased.model == str(Path(clean.out_dir) / "final") and biased.shapes_overcount == 0.6
    assert (run.algo, run.model) == ("gspo", "tiny-sft")
    path = train_module.resolve_model(cfg, rank=0, device="cpu")
    assert path == str(Path(biased.out_dir) / "final") and Path(path).is_relative_to(tmp_path)
    train_module.main(["--algo", "gspo"])
    assert len(built) == 4 and built[-1].algo == "gspo"  # cached: nothing rebuilt


def test_parse_config_preset_then_overrides():
    cfg = train_module.parse_config(["--algo", "dpo", "--lr", "0.001"])
    preset = PRESETS["dpo"]()
    assert preset.lr != 0.001 and preset.max_steps != Config().max_steps  # so both checks below can fail
    assert (cfg.algo, cfg.model, cfg.lr, cfg.max_steps) == ("dpo", "tiny-sft", 0.001, preset.max_steps)  # preset + override
    assert train_module.parse_config([]).algo == "sft"
    with pytest.raises(SystemExit):
        train_module.parse_config(["--algo", "nope"])


# -----------------------------------------------------------------------------
# export and evaluation metrics


def test_exported_accuracy_reaches_metrics_jsonl(warm_model):
    last = read_metrics(Path(warm_model).parent / "metrics.jsonl")[-1]  # the warm-up run exported and checked it
    # the export, reloaded (sharded, as a frozen model), answers exactly as the trained policy did
    assert last["step"] == 70 and last["final/exported_accuracy"] == last["eval/accuracy"]


@pytest.mark.usefixtures("single_thread")  # in-process training: one OpenMP thread (conftest.one_thread)
def test_eval_loss_is_nan_when_no_held_out_token_is_left(tiny_dirs, tmp_path):
    with pytest.raises(ValueError, match="no assistant token to train on"):  # the training rows are cut too
        run_train(tmp_path, "sft", "--model", "tiny", "--max-steps", "1", "--batch-size", "2", "--max-length", "40",
                  **{"eval-split": "eval", "num-eval-samples": 4})  # fmt: skip
    (first,) = read_metrics(tmp_path / "metrics.jsonl")
    assert first["step"] == 0 and first["eval/loss"] is None  # NaN, written as null; was 0.0
