"""End-to-end tests of the algorithm modules through train.train(), on the tiny Qwen2.5-VL:

  * a session fixture SFT-warms the tiny model (70 steps: the answer template is learned, the
    vision is not) and every other test starts from it, never from the slow built-in "tiny-sft";
  * GRPO, GSPO and RLOO: the reward goes up on a toy task (prime-rl style: "answer 3" is rewarded
    whatever the image shows) and the metrics are logged; GSPO clips its off-policy sequences;
  * DPO and MPO: held-out implicit-reward accuracy rises above chance on a toy preference set;
    the first step's loss is what policy == reference gives (log 2 for sigmoid);
    --precompute-ref-logps needs no reference model and a resumed run reads the saved table;
  * Online DPO: a short run logs its pair metrics; an all-None reward skips (and counts) every pair;
  * 2-process FSDP (torchrun, tests/rollout_worker.py): grpo, gspo, rloo and online_dpo run, and two
    ranks sampling the same prompt get different completions (ranks are seeded seed + rank);
  * bad input stops RL with an error naming what to fix; a NaN loss raises FloatingPointError
    before any update and the last checkpoint resumes;
  * `--algo` presets and flag overrides.

Every run is a few steps with small batches and short completions, on one intra-op thread (see
one_thread): the whole file takes about a minute on 2 CPU cores shared with other jobs.
Assertions read metrics.jsonl or train()'s return value, never stdout.
"""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from nanoalign import grpo
from nanoalign.checkpoint import latest_checkpoint
from nanoalign.data import BadSampleError
from nanoalign.metrics import read_metrics
from nanoalign.rollout import InProcess
from nanoalign.shapes import completion_text, make_example

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
import train as train_module  # noqa: E402
from conftest import one_thread, torchrun  # noqa: E402

LOG2 = math.log(2)
# The metrics TRL logs for GRPO (nanoalign/grpo.py). Every step logs the loss keys; the round keys come with the
# step that sampled a generation batch (with steps_per_generation > 1, only every that many steps).
LOSS_KEYS = ("loss", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")
ROUND_KEYS = ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "completions/clipped_ratio")
RL_KEYS = LOSS_KEYS + ROUND_KEYS
PAIR_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
             "logps/chosen", "logps/rejected")  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():  # restored after this module: other test files keep their setting
        yield


def run_train(out_dir, algo: str, *flags: str, **overrides) -> dict:
    """train() on `algo`'s preset with the CLI flags given, then "--name value" pairs from overrides
    (None: a bare flag, False: left out). Defaults keep runs short: no evaluation, no checkpoint but
    the last, no export."""
    values = {"out-dir": str(out_dir), "eval-split": "", "save-every": 0, "no-export": None, "warmup-steps": 1,
              "max-completion-length": 24, **overrides}  # fmt: skip
    argv = ["--algo", algo, *flags]
    for key, value in values.items():
        if value is not False:
            argv += [f"--{key}"] if value is None else [f"--{key}", str(value)]
    return train_module.train(train_module.parse_config(argv))


def steps(out_dir) -> list[dict]:
    """metrics.jsonl's training records (step 0 holds only the first evaluation)."""
    return [r for r in read_metrics(Path(out_dir) / "metrics.jsonl") if r["step"] > 0]


def assert_logged(records: list[dict], keys) -> None:
    """Every record has every key with a finite value (NaN is written as null)."""
    for key in keys:
        values = [r.get(key) for r in records]
        assert all(v is not None and math.isfinite(v) for v in values), f"{key}: {values}"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def save_image(image, root: Path, name: str) -> str:
    """Write a PIL image as root/images/<name>.png; returns the path a dataset row refers to."""
    path = root / "images" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return str(path)


# -----------------------------------------------------------------------------
# fixtures: the warmed model, the toy preference data


@pytest.fixture(scope="session")
def toy_preferences(tmp_path_factory) -> str:
    """A local preference dataset (data/train.jsonl: 64 pairs, data/test.jsonl: 16 held-out pairs)
    on shapes pictures where the chosen answer is always 3 and the rejected one another number: a
    preference any policy can learn in a few steps, like the toy reward below."""
    root = tmp_path_factory.mktemp("toy_preferences")
    for split, shapes_split, num in (("train", "train", 64), ("test", "eval", 16)):
        rows = []
        for i in range(num):
            ex = make_example(shapes_split, i)
            wrong = ((1, 2, 4) if ex["kind"] == "count" else (4, 5, 6))[i % 3]
            rows.append({"prompt": ex["question"], "images": [save_image(ex["images"][0], root, f"{split}_{i}")],
                         "chosen": completion_text(ex["kind"], 3), "rejected": completion_text(ex["kind"], wrong)})  # fmt: skip
        write_jsonl(root / "data" / f"{split}.jsonl", rows)  # images live outside data/ (else: an image folder)
    return str(root / "data")


# -----------------------------------------------------------------------------
# GRPO / GSPO / RLOO: reward goes up, metrics are logged


TOY_TASK = ("--batch-size", "32", "--lr", "5e-4", "--temperature", "0.5",
            "--reward-funcs", "toy_rewards:says_three", "--reward-weights", "1.0")  # fmt: skip


def went_up(rewards: list[float], num_first: int, num_last: int) -> bool:
    """The mean of the last rewards is high and clearly above the mean of the first ones."""
    first, last = sum(rewards[:num_first]) / num_first, sum(rewards[-num_last:]) / num_last
    return last >= 0.8 and last >= first + 0.25


# The toy task: reward 1 for answering 3, whatever the image shows. 1 process, 32 completions per
# step, lr 5e-4. Temperature 0.5 sharpens the warmed model's answers, so the same parameter change
# moves the sampled answer further (the losses use the same temperature). Seen over 3 seeds each:
# reward 0.3-0.7 in the first steps, 0.85-1.0 at the end. (With fewer prompts per step, a step now
# and then breaks the answer template for a few steps: too noisy to assert on.)


def test_grpo_reward_goes_up_on_toy_task(warm_model, tmp_path):
    num_steps = 10  # 4 prompts x G=8 per step
    run_train(tmp_path, "grpo", "--model", warm_model, "--max-steps", str(num_steps), "--num-generations", "8", *TOY_TASK)
    records = steps(tmp_path)
    assert [r["step"] for r in records] == list(range(1, num_steps + 1))
    assert_logged(records, RL_KEYS + ("rewards/says_three/mean",))
    assert "kl" not in records[0]  # beta = 0: no reference model, no KL
    rewards = [r["reward"] for r in records]
    assert went_up(rewards, 2, 3), rewards  # steps 1-2 (before learning shows) vs the last 3


def test_gspo_reward_goes_up_and_clips_off_policy_sequences(warm_model, tmp_path):
    # Preset: sequence-level ratios, eps 3e-4 / 4e-4, and each generation batch (4 x 32 rows: 16
    # prompts x G=8) feeds 4 optimizer steps. The first of them is on-policy (ratio 1, nothing
    # clipped); the next 3 use the stored old log-probs, and most sequence ratios leave the tiny range.
    run_train(tmp_path, "gspo", "--model", warm_model, "--max-steps", "12", *TOY_TASK)
    records = steps(tmp_path)
    assert len(records) == 12
    assert_logged(records, LOSS_KEYS)
    rounds = records[::4]  # the steps that sampled a generation batch: 1, 5, 9
    assert_logged(rounds, ROUND_KEYS + ("rewards/says_three/mean",))
    assert all(r["clip_ratio/region_mean"] == 0.0 for r in rounds)
    assert all(r["clip_ratio/region_mean"] > 0.3 for r in records[1:4])  # seen: 0.8-1.0
    rewards = [r["reward"] for r in rounds]
    assert went_up(rewards, 1, 1), rewards  # seen: 0.4 -> 0.85 -> 0.9
    # the rollout share of a round's first step is logged with it; the steps that only train have none
    assert all(0 < r["prepare_time"] < r["step_time"] for r in rounds)
    assert not any("prepare_time" in r for i, r in enumerate(records) if i % 4)


def test_rloo_reward_goes_up_with_kl_in_the_reward(warm_model, tmp_path):
    # Preset: G = 2 (16 prompts per step), beta = 0.05 (a frozen reference; KL goes into the reward).
    run_train(tmp_path, "rloo", "--model", warm_model, "--max-steps", "10", *TOY_TASK)
    records = steps(tmp_path)
    assert len(records) == 10
    assert_logged(records, RL_KEYS + ("rewards/says_three/mean", "kl"))
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # step 1: policy == reference
    assert records[-1]["kl"] > 0.01  # the policy moved away from it
    rewards = [r["reward"] for r in records]
    assert went_up(rewards, 2, 3), rewards


# -----------------------------------------------------------------------------
# DPO / MPO


def test_dpo_learns_held_out_preferences(warm_model, toy_preferences, tmp_path):
    metrics = run_train(
        tmp_path, "dpo", "--model", warm_model, "--dataset", toy_preferences, "--max-steps", "4",
        "--batch-size", "8", **{"eval-split": "test", "eval-every": 0, "num-eval-samples": 16},
    )  # fmt: skip
    before = read_metrics(tmp_path / "metrics.jsonl")[0]
    records = steps(tmp_path)
    assert_logged(records, PAIR_KEYS + ("loss/sigmoid",))
    # Step 1: policy == reference, so every r = 0 and the sigmoid loss is -log sigma(0) = log 2.
    assert records[0]["loss"] == pytest.approx(LOG2, abs=1e-4)
    assert before["eval/rewards/accuracies"] == 0.0  # r_c = r_r = 0: no pair is ranked yet
    assert metrics["eval/rewards/accuracies"] > 0.5 and metrics["eval/rewards/margins"] > 0, metrics


def test_mpo_mixes_three_losses_and_learns(warm_model, toy_preferences, tmp_path):
    metrics = run_train(
        tmp_path, "mpo", "--model", warm_model, "--dataset", toy_preferences, "--max-steps", "4",
        "--batch-size", "8", **{"eval-split": "test", "eval-every": 0, "num-eval-samples": 16},
    )  # fmt: skip
    records = steps(tmp_path)
    assert_logged(records, PAIR_KEYS + ("loss/sigmoid", "loss/bco_pair", "loss/sft"))
    # Step 1 (policy == reference): sigmoid = log 2, bco_pair = 2 log 2, and the preset weights
    # 0.8, 0.2, 1.0 give loss = 0.8 log 2 + 0.2 * 2 log 2 + sft = 1.2 log 2 + sft.
    step1 = records[0]
    assert step1["loss/sigmoid"] == pytest.approx(LOG2, abs=1e-4)
    assert step1["loss/bco_pair"] == pytest.approx(2 * LOG2, abs=1e-4)
    assert step1["loss"] == pytest.approx(1.2 * LOG2 + step1["loss/sft"], abs=1e-4)
    assert metrics["eval/rewards/accuracies"] > 0.5, metrics


def test_precomputed_reference_logps_then_resume_reads_the_table(warm_model, toy_preferences, tmp_path, monkeypatch):
    built = []  # `trainable` of every model train() builds: False would be a reference model
    build_policy = train_module.build_policy
    monkeypatch.setattr(train_module, "build_policy", lambda *a, **kw: built.append(kw["trainable"]) or build_policy(*a, **kw))
    common = ("--model", warm_model, "--dataset", toy_preferences, "--batch-size", "8", "--precompute-ref-logps")

    run_train(tmp_path, "dpo", *common, "--max-steps", "2")
    assert built == [True]  # the table replaces the reference model
    table = torch.load(tmp_path / "ref_logps.pt")
    assert table["train"].shape == (64, 2)  # chosen, rejected sums of every train pair
    assert steps(tmp_path)[0]["loss"] == pytest.approx(LOG2, abs=1e-4)  # the table is the step-0 policy

    # Doctor the saved table (chosen references 50 nats lower): a run that reads it sees
    # rewards/chosen = beta (logp - ref) shifted by 0.1 * 50 = +5; a recomputed table would give ~0.
    table["train"][:, 0] -= 50
    torch.save(table, tmp_path / "ref_logps.pt")
    mtime = (tmp_path / "ref_logps.pt").stat().st_mtime_ns
    run_train(tmp_path, "dpo", *common, "--max-steps", "4")  # resumes from the step-2 checkpoint
    records = steps(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["rewards/chosen"] > 4 for r in records[2:]), records
    assert (tmp_path / "ref_logps.pt").stat().st_mtime_ns == mtime  # read, not rewritten
    assert built == [True, True]


def test_precomputed_reference_is_recomputed_by_a_fresh_run(warm_model, toy_preferences, tmp_path):
    # A --no-resume run starts from the (new) model at step 0: a table left in out_dir by an earlier
    # run (another model, other data) must not be used as its reference.
    common = ("--model", warm_model, "--dataset", toy_preferences, "--batch-size", "8", "--precompute-ref-logps")
    torch.save({"train": torch.full((64, 2), -1000.0)}, tmp_path / "ref_logps.pt")  # a stale table
    run_train(tmp_path, "dpo", *common, "--max-steps", "1", "--no-resume")
    assert steps(tmp_path)[0]["loss"] == pytest.approx(LOG2, abs=1e-4)
    assert float(torch.load(tmp_path / "ref_logps.pt")["train"].max()) > -1000


# -----------------------------------------------------------------------------
# Online DPO


def test_online_dpo_short_run_logs_pair_metrics(warm_model, tmp_path):
    # The shapes task with the default rewards (math-verify accuracy + format): 4 prompts x 2 completions.
    run_train(tmp_path, "online_dpo", "--model", warm_model, "--max-steps", "2", "--batch-size", "8")
    records = steps(tmp_path)
    assert len(records) == 2
    assert_logged(records, PAIR_KEYS + ("scores/chosen", "scores/rejected", "scores/margin", "frac_ties",
                                        "completions/mean_length", "rewards/accuracy/mean", "rewards/format/mean"))  # fmt: skip
    assert records[0]["loss"] == pytest.approx(LOG2, abs=1e-4)  # policy == reference at step 1
    assert all(r["scores/margin"] >= 0 for r in records)  # chosen = the higher score
    assert all("skipped_pairs" in r for r in records)


def test_online_dpo_all_none_rewards_skip_every_pair(warm_model, tmp_path):
    metrics = run_train(
        tmp_path, "online_dpo", "--model", warm_model, "--max-steps", "2", "--batch-size", "8",
        "--max-completion-length", "12", "--reward-funcs", "toy_rewards:abstain", "--reward-weights", "1.0",
    )  # fmt: skip
    records = steps(tmp_path)
    assert len(records) == 2
    for r in records:
        assert r["skipped_pairs"] == 4  # every pair of the step: batch 8 / 2 completions
        assert r["loss"] == 0.0 and r["grad_norm"] == 0.0  # nothing to learn from, no crash
        assert r["rewards/abstain/failure_rate"] == 1.0
        assert r["rewards/accuracies"] is None and r["scores/chosen"] is None  # NaN: no pair to measure
    assert metrics["skipped_pairs"] == 4


def test_online_dpo_skips_pairs_whose_completions_are_both_empty_or_identical(warm_model, tmp_path, monkeypatch, capsys):
    class FirstPairsUseless(InProcess):  # as if the policy had answered nothing twice, then the same thing twice
        def sample(self, *args, **kwargs):
            rollouts = super().sample(*args, **kwargs)
            r = rollouts[0]
            r.texts[0] = r.texts[1] = ""
            r.completion_ids[3], r.has_eos[3], r.texts[3] = list(r.completion_ids[2]), r.has_eos[2], r.texts[2]
            return rollouts

    monkeypatch.setattr(train_module, "InProcess", FirstPairsUseless)  # the backend train() builds
    run_train(tmp_path, "online_dpo", "--model", warm_model, "--max-steps", "1", "--batch-size", "8")
    record = steps(tmp_path)[0]
    assert record["skipped_pairs"] == 2  # of 4: the empty and the identical pair; the other 2 train
    assert record["rewards/accuracies"] is not None and math.isfinite(record["loss"])
    # The count goes to metrics.jsonl and the step line; the round prints nothing of its own.
    assert all(line.startswith("step") for line in capsys.readouterr().out.splitlines() if "skipped" in line)


# -----------------------------------------------------------------------------
# 2-process FSDP


def test_fsdp_two_ranks_online_algorithms(warm_model, tmp_path):
    proc = torchrun(str(TESTS / "rollout_worker.py"), warm_model, str(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    for algo, keys in [
        ("grpo", RL_KEYS + ("rewards/shorter/mean", "kl")),  # beta 0.01: reference model under FSDP
        ("gspo", LOSS_KEYS),  # 2 steps per generation batch: round keys at step 1 only (below)
        ("rloo", RL_KEYS + ("rewards/shorter/mean", "kl")),
        ("online_dpo", PAIR_KEYS + ("scores/chosen", "scores/rejected", "scores/margin", "frac_ties")),
    ]:
        records = steps(tmp_path / algo)
        assert [r["step"] for r in records] == [1, 2], algo
        assert_logged(records, keys)
    assert_logged(steps(tmp_path / "gspo")[:1], ROUND_KEYS + ("rewards/shorter/mean",))

    # The same prompt, the same weights and settings on both ranks: different samples, because
    # train() seeds rank r with seed + r (identical seeds would give identical completions).
    texts = json.loads((tmp_path / "probe.json").read_text())["texts"]
    assert len(texts) == 2 and len(texts[0]) == len(texts[1]) == 4
    assert texts[0] != texts[1], texts


# -----------------------------------------------------------------------------
# bad input for RL: a clear error, or a counted skip


def rl_flags(warm_model: str, *reward_funcs: str, max_steps: int = 1) -> tuple[str, ...]:
    """A short GRPO run on 1 prompt x 4 completions of at most 8 tokens per step."""
    flags = ("--model", warm_model, "--max-steps", str(max_steps), "--batch-size", "4", "--num-generations", "4",
             "--max-completion-length", "8")  # fmt: skip
    if reward_funcs:
        flags += ("--reward-funcs", *reward_funcs, "--reward-weights", *["1.0"] * len(reward_funcs))
    return flags


def test_raising_reward_function_names_itself(warm_model, tmp_path):
    with pytest.raises(RuntimeError, match=r"reward function 'explode' raised KeyError.*return None"):
        run_train(tmp_path, "grpo", *rl_flags(warm_model, "toy_rewards:explode"))


def test_reward_function_with_wrong_number_of_values(warm_model, tmp_path):
    with pytest.raises(ValueError, match=r"reward function 'too_few' returned 1 values for 4 completions"):
        run_train(tmp_path, "grpo", *rl_flags(warm_model, "toy_rewards:too_few"))


def test_unreadable_prompt_image_names_the_sample(warm_model, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    rows = [{"prompt": "How many shapes are in the image?", "images": [str(corrupt)], "solution": "3"}] * 2
    data = write_jsonl(tmp_path / "data" / "rl.jsonl", rows)
    with pytest.raises(BadSampleError, match=r"sample [01] of split 'train': image 0 .*corrupt\.png.* cannot be read.*--skip-bad-samples"):
        run_train(tmp_path / "run", "grpo", *rl_flags(warm_model), "--dataset", str(data))


def test_unparseable_gold_answer_is_counted_not_fatal(warm_model, tmp_path):
    # Every gold answer is "\frac{" (math-verify parses it to nothing): accuracy returns None for
    # every completion, which is counted; the format reward still scores them.
    image = save_image(make_example("train", 0)["images"][0], tmp_path, "shapes")
    data = write_jsonl(tmp_path / "data" / "rl.jsonl", [{"prompt": "How many shapes are in the image?",
                                                          "images": [image], "solution": "$\\frac{$"}])  # fmt: skip
    metrics = run_train(tmp_path / "run", "grpo", *rl_flags(warm_model), "--dataset", str(data))
    assert metrics["rewards/accuracy/bad_gold_rate"] == 1.0
    assert metrics["rewards/accuracy/failure_rate"] == 1.0
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["rewards/format/mean"])


@pytest.mark.filterwarnings("ignore:Detected an existing checkpoint")  # the stop re-saves the step-2 state
def test_nan_loss_raises_before_the_update_and_the_checkpoint_resumes(warm_model, tmp_path, monkeypatch):
    def flags(max_steps):
        return (*rl_flags(warm_model, "toy_rewards:shorter", max_steps=max_steps), "--save-every", "1")

    run_train(tmp_path, "grpo", *flags(2))  # steps 1-2, a checkpoint after each
    saved = latest_checkpoint(tmp_path)
    assert saved.name == "step_000002"
    shutil.copytree(saved, tmp_path / "step2_before")

    real_loss = grpo.loss

    def nan_at_step_3(micro, run):
        value, metrics = real_loss(micro, run)
        return (value * float("nan") if run.step == 2 else value), metrics

    monkeypatch.setattr(grpo, "loss", nan_at_step_3)
    with pytest.raises(FloatingPointError, match=r"step 3: .*not finite.*no update was applied"):
        run_train(tmp_path, "grpo", *flags(4))
    monkeypatch.undo()
    # The latest checkpoint is still the step-2 state (the stop re-saved it): same weights and optimizer
    # state as before the failed step (an applied NaN update would have changed both), and nothing
    # was logged for that step.
    assert latest_checkpoint(tmp_path).name == "step_000002"
    before = dcp_state(tmp_path / "step2_before", tmp_path / "before.pt")
    after = dcp_state(saved, tmp_path / "after.pt")
    for part in ("model", "optim"):
        flat_before, flat_after = flatten(before[part]), flatten(after[part])
        assert flat_before.keys() == flat_after.keys()
        for key, value in flat_before.items():
            assert torch.equal(value, flat_after[key]) if torch.is_tensor(value) else value == flat_after[key], key
    assert [r["step"] for r in steps(tmp_path)] == [1, 2]

    run_train(tmp_path, "grpo", *flags(4))  # resumes from step 2
    records = steps(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert_logged(records, ("loss", "grad_norm"))


def dcp_state(checkpoint: Path, scratch: Path) -> dict:
    """A DCP checkpoint directory's full state dict, read without a process group."""
    dcp_to_torch_save(checkpoint, scratch)
    return torch.load(scratch, weights_only=False)


def flatten(tree, prefix: str = "") -> dict:
    """Nested dicts/lists -> {"a.b.0": leaf}."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in flatten(sub, f"{prefix}{key}.").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, sub in enumerate(tree) for k, v in flatten(sub, f"{prefix}{i}.").items()}
    return {prefix: tree}


# -----------------------------------------------------------------------------
# --algo presets


def test_gspo_preset_and_overrides():
    cfg = train_module.parse_config(["--algo", "gspo"])
    assert (cfg.algo, cfg.importance_sampling_level, cfg.epsilon, cfg.epsilon_high, cfg.beta, cfg.loss_type,
            cfg.steps_per_generation) == ("gspo", "sequence", 3e-4, 4e-4, 0.0, "grpo", 4)  # fmt: skip
    assert train_module.parse_config(["--algo", "gspo", "--epsilon", "0.2"]).epsilon == 0.2  # a flag beats the preset
    assert train_module.parse_config(["--epsilon", "0.1", "--algo=gspo"]).epsilon == 0.1  # wherever --algo is


def test_mpo_dpo_and_rl_presets():
    mpo_cfg = train_module.parse_config(["--algo", "mpo"])
    assert (mpo_cfg.loss_types, mpo_cfg.loss_weights) == (("sigmoid", "bco_pair", "sft"), (0.8, 0.2, 1.0))
    dpo_cfg = train_module.parse_config(["--algo", "dpo"])
    assert (dpo_cfg.loss_types, dpo_cfg.loss_weights, dpo_cfg.beta) == (("sigmoid",), (1.0,), 0.1)
    mixed = train_module.parse_config(["--algo", "mpo", "--loss-types", "sigmoid", "sft", "--loss-weights", "1", "0.5"])
    assert (mixed.loss_types, mixed.loss_weights) == (("sigmoid", "sft"), (1.0, 0.5))
    rloo_cfg = train_module.parse_config(["--algo", "rloo"])
    assert (rloo_cfg.num_generations, rloo_cfg.beta) == (2, 0.05)
    online = train_module.parse_config(["--algo", "online_dpo"])
    assert (online.num_generations, online.temperature, online.beta) == (2, 0.9, 0.1)
    grpo_cfg = train_module.parse_config(["--algo", "grpo"])
    assert (grpo_cfg.importance_sampling_level, grpo_cfg.beta, grpo_cfg.epsilon) == ("token", 0.0, 0.2)
