"""Checkpoints and resume: saves wait for the generation boundary, never write into an existing
checkpoint; resume refuses a changed config or world size, on every rank."""

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import REPO, torchrun  # noqa: E402
from parity_worker import sharded_policy  # noqa: E402
from test_algorithms import run_train, steps  # noqa: E402

import train as train_module  # noqa: E402
from nanoalign.checkpoint import latest_checkpoint, save_checkpoint

# -----------------------------------------------------------------------------
# checkpoints and resume


@pytest.mark.usefixtures("single_thread")  # in-process training: one OpenMP thread (conftest.one_thread)
def test_periodic_saves_wait_for_the_generation_boundary(warm_model, tmp_path, monkeypatch):
    saved = []
    real = train_module.save_checkpoint
    monkeypatch.setattr(train_module, "save_checkpoint", lambda out, step, *a: saved.append(step) or real(out, step, *a))
    run_train(tmp_path, "grpo", "--model", warm_model, "--max-steps", "11", "--steps-per-generation", "4",
              "--batch-size", "4", "--num-generations", "4", "--reward-funcs", "toy_rewards:shorter", "--reward-weights", "1.0",
              **{"save-every": 3, "max-completion-length": 4})  # fmt: skip
    # generation batches end at steps 4 and 8: the first boundaries at or after 3 and 6; 11 is the last step
    assert saved == [4, 8, 11]


@pytest.mark.usefixtures("single_thread")  # in-process training: one OpenMP thread (conftest.one_thread)
def test_a_second_save_of_a_step_never_writes_into_an_existing_checkpoint(tiny_dirs, dist_world, tmp_path):
    policy = sharded_policy(str(tiny_dirs["tiny"]), 1, torch.device("cpu"))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    first = save_checkpoint(tmp_path, 2, policy, optimizer, scheduler, {"step": 2, "num_drawn": 16}, 0)
    stamps = {p: p.stat().st_mtime_ns for p in first.iterdir()}
    # the stop-on-error save of the same state: nothing is written at all
    assert save_checkpoint(tmp_path, 2, policy, optimizer, scheduler, {"step": 2, "num_drawn": 16}, 0) == first
    # another state of the same step (a --no-resume rerun): a new directory, then `latest` moves
    again = save_checkpoint(tmp_path, 2, policy, optimizer, scheduler, {"step": 2, "num_drawn": 32}, 0)
    assert again.name == "step_000002.1" and latest_checkpoint(tmp_path) == again
    assert {p: p.stat().st_mtime_ns for p in first.iterdir()} == stamps  # untouched


@pytest.mark.usefixtures("single_thread")
def test_a_tied_embedding_is_saved_once(tiny_dirs, dist_world, tmp_path):
    # The tiny Qwen2.5-VL ties lm_head.weight to the embedding, as Qwen2.5-VL-3B does (311M parameters
    # there): the checkpoint holds it under its first name only; resuming a tied model exactly is
    # test_sft_train.test_resume_after_crash_reproduces_uninterrupted_run's.
    policy = sharded_policy(str(tiny_dirs["tiny"]), 1, torch.device("cpu"))
    every_name = [name for name, _ in policy.named_parameters(remove_duplicate=False)]
    unique = {name for name, _ in policy.named_parameters()}
    aliases = set(every_name) - unique
    assert any(name.endswith("lm_head.weight") for name in aliases)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    path = save_checkpoint(tmp_path, 1, policy, optimizer, scheduler, {"step": 1, "num_drawn": 8}, 0)
    saved = {key.removeprefix("model.") for key in dcp.FileSystemReader(path).read_metadata().state_dict_metadata}
    assert unique <= saved and not aliases & saved


@pytest.mark.usefixtures("single_thread")  # in-process training: one OpenMP thread (conftest.one_thread)
def test_resume_refuses_a_changed_config(tiny_dirs, tmp_path):
    common = ("--model", "tiny", "--batch-size", "2", "--max-length", "256")
    run_train(tmp_path, "sft", *common, "--max-steps", "1")
    with pytest.raises(ValueError, match=r"--algo: 'sft' -> 'dpo'.*--lr: 0.002 -> 1e-05.*--no-resume"):
        run_train(tmp_path, "dpo", *common, "--max-steps", "2", "--lr", "1e-5", "--beta", "0.1")
    run_train(tmp_path, "sft", *common, "--max-steps", "2", "--log-every", "5")  # safe changes resume
    assert [r["step"] for r in steps(tmp_path)] == [1, 2]


@pytest.mark.usefixtures("single_thread")  # in-process training: one OpenMP thread (conftest.one_thread)
def test_resume_refuses_another_world_size_on_every_rank(tiny_dirs, tmp_path):
    # the same settings as run_train's (so only the world size differs)
    sft = ("--model", "tiny", "--batch-size", "2", "--max-length", "256", "--warmup-steps", "1", "--max-completion-length", "24")

    def torchrun_sft(out, max_steps):
        return torchrun(str(REPO / "train.py"), *sft, "--out-dir", str(out), "--max-steps", str(max_steps), "--eval-split", "",
                        "--save-every", "0", "--no-export", timeout=300)  # fmt: skip

    # 2 ranks save, 1 resumes: it would halve the global batch and drop rank 1's RNG state (was: exit 0)
    proc = torchrun_sft(tmp_path / "two", 1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with pytest.raises(ValueError, match=r"saved by 2 rank\(s\) and this run has 1: resuming would change the global batch"):
        run_train(tmp_path / "two", "sft", *sft, "--max-steps", "2")
    # 1 rank saves, 2 resume: both ranks refuse, with the same message (was: rank 0 died in a gloo collective)
    run_train(tmp_path / "one", "sft", *sft, "--max-steps", "1")
    proc = torchrun_sft(tmp_path / "one", 2)
    assert proc.returncode != 0
    assert proc.stderr.count("saved by 1 rank(s) and this run has 2") >= 2, proc.stderr[-3000:]
    assert "Connection closed" not in proc.stderr
