"""The flags a user sets, beside the defaults: each one trains correctly.

  * generation does not depend on training-only flags (activation checkpointing, frozen vision):
    greedy completions token for token equal, 1 process and 2 FSDP ranks;
  * the flag matrix: every algorithm with the flags users set, two steps each, finite losses and a
    step-0 evaluation that training-only flags do not change.

What used to sit here beside them moved to the files of their subjects: RL gradient accumulation and
degenerate groups to test_grpo.py; bad input on 2 ranks, held-out data and column renames to
test_data.py; checkpoints and resume to test_checkpoint.py; config and --model checks to
test_config.py; the LLaVA template to test_batch.py; the gold warning to test_rewards.py; the exported
accuracy and a NaN eval loss to test_sft_train.py; the citation lint to test_structure.py.

Assertions read metrics.jsonl, return values and raised errors, never stdout.
"""

import json
import math
from pathlib import Path

import pytest

from nanoalign.metrics import read_metrics

TESTS = Path(__file__).resolve().parent
from conftest import one_thread, torchrun  # noqa: E402
from flags_worker import FLAG_SETS, greedy_completions  # noqa: E402
from test_algorithms import run_train, save_image, steps, toy_preferences, write_jsonl  # noqa: E402,F401


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


# -----------------------------------------------------------------------------
# generation under training-only flags


def test_greedy_generation_ignores_training_only_flags_one_process(warm_model, dist_world):
    # With checkpointing in train mode, HF's checkpointed layers drop the KV cache, and every token
    # after the first would be decoded without its context or image (seen: accuracy 0.86 -> 0.00).
    plain = greedy_completions(warm_model, FLAG_SETS["plain"])
    assert any(len(ids) > 3 for ids in plain), plain  # real answers, not just a stop token
    for name, flags in FLAG_SETS.items():
        assert greedy_completions(warm_model, flags) == plain, name


def test_greedy_generation_ignores_training_only_flags_two_ranks(warm_model, tmp_path):
    out = tmp_path / "greedy.json"
    proc = torchrun(str(TESTS / "flags_worker.py"), warm_model, str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads(out.read_text())
    assert results["plain"][0] != results["plain"][1]  # the ranks decoded different prompts
    for name in FLAG_SETS:
        assert results[name] == results["plain"], name


# -----------------------------------------------------------------------------
# the flag matrix: every algorithm with the flags users set

TRAINING_ONLY = ("--activation-checkpointing", "--freeze-vision", "--grad-accum-steps", "2")
RL_SMALL = ("--batch-size", "4", "--num-generations", "4", "--max-completion-length", "20",
            "--reward-funcs", "toy_rewards:shorter", "accuracy", "--reward-weights", "1.0", "1.0")  # fmt: skip
PAIRWISE = ("--batch-size", "4", "--num-generations", "2", "--max-completion-length", "20",
            "--reward-funcs", "toy_rewards:shorter", "--reward-weights", "1.0")  # fmt: skip
MATRIX = {
    "sft": [(), TRAINING_ONLY, ("--dtype", "bfloat16"), ("--model", "tiny-llava")],
    "dpo": [(), TRAINING_ONLY, ("--precompute-ref-logps",), ("--beta", "0.5", "--dtype", "bfloat16")],
    "mpo": [(), TRAINING_ONLY, ("--loss-types", "sigmoid", "ipo", "--loss-weights", "1.0", "0.5")],
    "grpo": [
        RL_SMALL, RL_SMALL + TRAINING_ONLY,
        RL_SMALL + ("--loss-type", "bnpo", "--beta", "0.05", "--scale-rewards", "batch"),
        RL_SMALL + ("--loss-type", "dr_grpo", "--scale-rewards", "none", "--num-iterations", "2"),
        RL_SMALL + ("--mask-truncated-completions", "--max-completion-length", "2"),  # every completion masked
        RL_SMALL + ("--steps-per-generation", "2", "--dtype", "bfloat16", "--delta", "1.5"),
        RL_SMALL + ("--model", "tiny-llava"),
    ],
    "gspo": [RL_SMALL, RL_SMALL + TRAINING_ONLY + ("--steps-per-generation", "4"), RL_SMALL + ("--loss-type", "dapo")],
    "rloo": [PAIRWISE, PAIRWISE + TRAINING_ONLY, PAIRWISE + ("--normalize-advantages", "--beta", "0", "--num-iterations", "2")],
    "online_dpo": [PAIRWISE, PAIRWISE + TRAINING_ONLY, PAIRWISE + ("--missing-eos-penalty", "1.0", "--dtype", "bfloat16")],
}
CASES = [(algo, flags) for algo, variants in MATRIX.items() for flags in variants]


@pytest.fixture(scope="module")
def matrix_data(toy_preferences) -> dict:
    return {"sft": "shapes", "dpo": toy_preferences, "mpo": toy_preferences}


@pytest.fixture(scope="module")
def baselines() -> dict:
    return {}  # algo -> step-0 evaluation of its first (plain) matrix entry, filled as the matrix runs


@pytest.mark.parametrize("algo,flags", CASES, ids=[f"{a}-{i}" for a, v in MATRIX.items() for i in range(len(v))])
def test_flag_matrix(algo, flags, warm_model, tiny_dirs, matrix_data, baselines, tmp_path):
    dataset = matrix_data.get(algo, "shapes")
    model = () if "--model" in flags else ("--model", "tiny" if algo == "sft" else warm_model)
    eval_split = "test" if dataset != "shapes" else "eval"
    run_train(tmp_path, algo, *model, "--dataset", dataset, "--max-steps", "2", *flags,
              **{"eval-split": eval_split, "eval-every": 0, "num-eval-samples": 8, "max-completion-length": False})  # fmt: skip
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]
    assert all(r["loss"] is not None and math.isfinite(r["loss"]) for r in records[1:]), records
    assert all(math.isfinite(r["grad_norm"]) for r in records[1:])
    first_eval = {k: v for k, v in records[0].items() if k != "step"}
    assert first_eval, "a step-0 held-out evaluation"
    if flags in ((), RL_SMALL, PAIRWISE):
        baselines[algo] = first_eval
    elif set(flags) - set(TRAINING_ONLY) <= set(RL_SMALL + PAIRWISE) and algo in baselines:
        # only training-only flags differ from the plain entry: the step-0 evaluation is the same
        assert first_eval == pytest.approx(baselines[algo], abs=1e-6), (baselines[algo], first_eval)
