"""Every flag and input path a user sets, beside the defaults: each one trains correctly, or is refused.

  * generation does not depend on training-only flags (activation checkpointing, frozen vision):
    greedy completions token for token equal, 1 process and 2 FSDP ranks;
  * RL gradient accumulation: accum 2 x 1 step per generation == accum 1 with the batch doubled on
    the same prompts and completions (loss and every gradient), for grpo / dr_grpo / dapo, RLOO and
    online DPO; a group of equal rewards gives exactly zero advantages and zero gradient;
  * an over-long RL prompt on 2 ranks stops both, naming the sample, with a resumable checkpoint;
    --skip-bad-samples skips and counts it (summed over ranks); a bad held-out image stops both ranks,
    naming it, or is skipped and counted; so does a bad held-out SFT sample;
  * checkpoints: saved at the first generation boundary after each multiple of --save-every, never
    written into an existing directory; resume refuses a changed config or world size, on every rank;
  * held-out data is held out; --columns clashes, --model typos and offline hub ids fail clearly;
  * the flag matrix: every algorithm with the flags users set, two steps each, finite losses and a
    step-0 evaluation that training-only flags do not change.

Assertions read metrics.jsonl, return values and raised errors, never stdout.
"""

import dataclasses
import json
import math
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from nanoalign import grpo, online_dpo, rl, rloo
from nanoalign.checkpoint import latest_checkpoint, save_checkpoint
from nanoalign.config import APPLIES_TO, PRESETS, Config, check_config
from nanoalign.data import load_split, prepare_sample
from nanoalign.metrics import read_metrics
from nanoalign.model import load_processor
from nanoalign.rewards import verify_answers
from nanoalign.rollout import Rollout, completion_ids_of
from nanoalign.batch import process_prompts, render
from nanoalign.runtime import Run
from nanoalign.shapes import make_example, shapes_sample

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(TESTS))
import train as train_module  # noqa: E402
from conftest import one_thread, subprocess_env  # noqa: E402
from flags_worker import FLAG_SETS, greedy_completions  # noqa: E402
from parity_worker import sharded_policy  # noqa: E402
from test_algorithms import run_train, save_image, steps, toy_preferences, write_jsonl  # noqa: E402,F401


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


def torchrun(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


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
# RL gradient accumulation and degenerate groups

COMPLETIONS = ["The answer is \\boxed{3}.", "3", "<think>I count 4 shapes.</think> The answer is \\boxed{4}.",
               "The shape has five sides, so", "\\boxed{2}", "I see 3 circles. The answer is \\boxed{3}.",
               "four", "<think>count</think> \\boxed{1}"]  # fmt: skip


def fixed_rollouts(samples, run, num_generations):
    """rollout_chunks with fixed completions (different lengths, some without EOS), chunked like the
    real one, so every batch split sees exactly the same rows."""
    tok = run.processor.tokenizer
    end = sorted(run.stop_ids)[0]
    size = run.cfg.batch_size // num_generations
    rollouts = []
    for start in range(0, len(samples), size):
        chunk = samples[start : start + size]
        texts = [render(run.processor, s["prompt"], add_generation_prompt=True) for s in chunk for _ in range(num_generations)]
        enc = process_prompts(run.processor, texts, [s["images"] for s in chunk for _ in range(num_generations)], "left")
        ids, eos, decoded = [], [], []
        for s in chunk:
            for g in range(num_generations):
                text = COMPLETIONS[(3 * s["index"] + g) % len(COMPLETIONS)]
                with_eos = (s["index"] + g) % 3 != 0
                ids.append(tok(text, add_special_tokens=False)["input_ids"] + ([end] if with_eos else []))
                eos.append(with_eos)
                decoded.append(text)
        # As nanoalign's sampler returns them: with the distinct prompts, so training reads each once.
        distinct = process_prompts(run.processor, texts[::num_generations], [s["images"] for s in chunk], "left")
        rollout = Rollout(enc, ids, eos, decoded, shared_prompts=distinct)
        rollout.sample_ids = completion_ids_of(chunk, num_generations)
        rollouts.append(rollout)
    return rollouts


def one_step(module, model_dir, cfg, samples) -> tuple[float, dict]:
    """One optimizer step's summed loss and full gradients through the algorithm's prepare and loss."""
    from nanoalign.rewards import load_reward_funcs

    processor = load_processor(model_dir)
    policy = sharded_policy(model_dir, 1, torch.device("cpu"))
    ref = sharded_policy(model_dir, 1, torch.device("cpu")) if module.needs_reference(cfg) else None
    stop_ids = {processor.tokenizer.convert_tokens_to_ids("<|im_end|>")}
    run = Run(cfg, processor, policy, ref, 0, 1, torch.device("cpu"), stop_ids, processor.tokenizer.pad_token_id)
    run.reward_funcs = load_reward_funcs(list(cfg.reward_funcs))
    micro, _ = module.prepare(samples, run)
    assert len(micro) == rl.micro_batches_per_round(cfg) * (cfg.num_iterations if module is not online_dpo else 1)
    total = 0.0
    for m in micro[: cfg.grad_accum_steps]:  # the loop's first optimizer step
        loss, _ = module.loss(m, run)
        loss.backward()
        total += float(loss.detach())
    return total, {n: p.grad.full_tensor().clone() for n, p in policy.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "algo,overrides",
    [
        ("grpo", {"loss_type": "grpo"}),
        ("grpo", {"loss_type": "dr_grpo", "beta": 0.04}),
        ("grpo", {"loss_type": "dapo", "mask_truncated_completions": True}),
        ("gspo", {"loss_type": "dapo"}),
        ("rloo", {}),
        ("online_dpo", {}),
    ],
)
def test_rl_accumulation_equals_the_doubled_batch(algo, overrides, warm_model, dist_world, monkeypatch):
    # accum 2 x spg 1 (two micro-batches of B rows) must be the step of accum 1 x spg 1 on 2B rows of
    # the same prompts. Before: the loop took only spg micro-batches per step, so the gradient was
    # scaled by spg / accum (and dapo's accumulation did nothing).
    # bnpo is left out on purpose: TRL defines it as the token mean of each micro-batch, which two
    # micro-batches of different token counts do not share with their union.
    module = {"grpo": grpo, "gspo": grpo, "rloo": rloo, "online_dpo": online_dpo}[algo]
    monkeypatch.setattr(module, "rollout_chunks", fixed_rollouts, raising=False)
    monkeypatch.setattr(rl, "rollout_chunks", fixed_rollouts)  # generation_round's
    G = 2 if algo in ("rloo", "online_dpo") else 4
    base = dataclasses.replace(PRESETS[algo](), num_generations=G, max_length=512, steps_per_generation=1,
                               reward_funcs=("toy_rewards:shorter",), reward_weights=(1.0,), **overrides)  # fmt: skip
    accumulated = dataclasses.replace(base, batch_size=2 * G, grad_accum_steps=2)
    doubled = dataclasses.replace(base, batch_size=4 * G, grad_accum_steps=1)
    check_config(accumulated), check_config(doubled)
    assert module.samples_per_round(accumulated) == module.samples_per_round(doubled) == 4
    samples = [prepare_sample(shapes_sample("train", i, "rl"), "rl", f"sample {i}") | {"index": i} for i in range(4)]
    loss_a, grads_a = one_step(module, warm_model, accumulated, samples)
    loss_d, grads_d = one_step(module, warm_model, doubled, samples)
    assert grads_a.keys() == grads_d.keys() and grads_a
    assert sum(float(g.abs().sum()) for g in grads_d.values()) > 0  # a real signal to compare
    assert loss_a == pytest.approx(loss_d, rel=1e-5, abs=1e-7)
    for name in grads_d:
        assert_close(grads_a[name], grads_d[name], rtol=1e-4, atol=1e-7, msg=name)


def test_equal_rewards_give_exactly_zero_advantages_and_gradient():
    rewards = torch.full((8,), 1.2)  # float32: the mean is not exactly 1.2, the std is 1.3e-7, not 0
    for scale in ("group", "batch", "none"):
        assert torch.equal(grpo.group_advantages(rewards, 8, scale), torch.zeros(8)), scale
    assert torch.equal(rloo.rloo_advantages(rewards, 8), torch.zeros(8))
    # a group with signal beside it is untouched: (R - mean) / (std + 1e-4)
    two_groups = torch.tensor([1.2] * 4 + [0.0, 0.0, 1.0, 1.0])
    adv = grpo.group_advantages(two_groups, 4, "group")
    assert torch.equal(adv[:4], torch.zeros(4)) and adv[4] < 0 < adv[7]
    assert rl.constant_groups(two_groups.view(2, 4)).tolist() == [True, False]

    logps = torch.randn(8, 5, requires_grad=True)
    mask = torch.ones(8, 5)
    for loss_type in typing.get_args(Config.__annotations__["loss_type"]):
        loss, _ = grpo.grpo_loss(logps, logps.detach(), None, grpo.group_advantages(rewards, 8, "group"), mask,
                                 loss_type=loss_type, epsilon=0.2, epsilon_high=0.2, delta=None, beta=0.0,
                                 importance_sampling_level="token", normaliser=40.0)  # fmt: skip
        (grad,) = torch.autograd.grad(loss, logps)
        assert float(loss) == 0.0 and torch.equal(grad, torch.zeros_like(grad)), loss_type


def test_dapo_with_every_completion_masked_gives_zero_loss():
    # --mask-truncated-completions when no completion of the step ended: no counted token anywhere
    logps = torch.randn(4, 3, requires_grad=True)
    loss, _ = grpo.grpo_loss(logps, logps.detach(), None, torch.tensor([1.0, -1.0, 0.5, -0.5]), torch.zeros(4, 3),
                             loss_type="dapo", epsilon=0.2, epsilon_high=0.2, delta=None, beta=0.0,
                             importance_sampling_level="token", normaliser=0.0)  # fmt: skip
    (grad,) = torch.autograd.grad(loss, logps)
    assert float(loss) == 0.0 and torch.equal(grad, torch.zeros_like(grad))


# -----------------------------------------------------------------------------
# bad input on 2 ranks: an over-long RL prompt, a bad held-out image


@pytest.fixture(scope="module")
def rl_data(tmp_path_factory) -> Path:
    """An RL dataset (data/train.jsonl, data/eval.jsonl) of shapes questions with gold answers, in which
    the prompt rank 1 draws at step 2 is far longer than --max-length 120; eval row 5 (rank 1's share)
    has an unreadable image, in data_bad_eval/."""
    root = tmp_path_factory.mktemp("rl_data")
    num_train, per_rank = 32, 2  # --batch-size 8, G 4: 2 prompts per rank per step
    step2_rank1 = train_module.stream_indices(3 * per_rank, 1, num_train, 0)[0]  # stream position 6
    for split, shapes_split, num in (("train", "train", num_train), ("eval", "eval", 8)):
        rows = []
        for i in range(num):
            ex = make_example(shapes_split, i)
            question = ex["question"] + (" Think of every shape there is, one by one." * 40 if split == "train" and i == step2_rank1 else "")
            rows.append({"prompt": question, "images": [save_image(ex["images"][0], root, f"{split}_{i}")], "solution": str(ex["answer"])})
        write_jsonl(root / "data" / f"{split}.jsonl", rows)
        if split == "eval":
            (root / "bad.png").write_bytes(b"not a png")
            rows[5]["images"] = [str(root / "bad.png")]
            write_jsonl(root / "data_bad_eval" / "eval.jsonl", rows)
            (root / "data_bad_eval" / "train.jsonl").write_text((root / "data" / "train.jsonl").read_text())
    return root


def rl_argv(warm_model, data, out, *extra) -> list[str]:
    return [str(REPO / "train.py"), "--algo", "grpo", "--model", warm_model, "--dataset", str(data), "--out-dir", str(out),
            "--batch-size", "8", "--num-generations", "4", "--max-completion-length", "8", "--max-length", "120",
            "--warmup-steps", "1", "--save-every", "1", "--no-export", "--eval-every", "0", "--num-eval-samples", "4",
            "--reward-funcs", "toy_rewards:shorter", "--reward-weights", "1.0", *extra]  # fmt: skip


def test_overlong_rl_prompt_stops_both_ranks_then_is_skipped(warm_model, rl_data, tmp_path):
    proc = torchrun(*rl_argv(warm_model, rl_data / "data", tmp_path, "--max-steps", "3"))
    assert proc.returncode != 0
    assert re.search(r"sample \d+ of split 'train': the prompt is \d+ tokens long .*--skip-bad-samples", proc.stderr), proc.stderr[-3000:]
    assert "other rank(s) failed" in proc.stderr  # rank 0 stopped with it, not in a gloo error
    assert latest_checkpoint(tmp_path).name == "step_000001"  # step 1 is kept; nothing is lost
    assert [r["step"] for r in steps(tmp_path)] == [1]

    proc = torchrun(*rl_argv(warm_model, rl_data / "data", tmp_path, "--max-steps", "3", "--skip-bad-samples"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    records = steps(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]  # resumed after step 1
    assert records[1]["skipped_samples"] == 1  # one prompt skipped on one of the 2 ranks: a count, summed (was 0.5)
    assert all(math.isfinite(r["loss"]) and "truncated_rows" in r for r in records)


def test_bad_held_out_image_stops_both_ranks_naming_it(warm_model, rl_data, tmp_path):
    proc = torchrun(*rl_argv(warm_model, rl_data / "data_bad_eval", tmp_path, "--max-steps", "1", "--num-eval-samples", "8"))
    assert proc.returncode != 0
    assert "sample 5 of split 'eval': image 0" in proc.stderr and "cannot be read" in proc.stderr, proc.stderr[-3000:]
    assert "other rank(s) failed" in proc.stderr
    # --skip-bad-samples skips it, and the evaluation counts the skip
    proc = torchrun(*rl_argv(warm_model, rl_data / "data_bad_eval", tmp_path, "--max-steps", "0", "--num-eval-samples", "8",
                             "--skip-bad-samples"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["eval/skipped_samples"] == 1


def test_bad_held_out_sft_sample_stops_both_ranks_naming_it(tmp_path):
    # eval row 3 (rank 1's share of 4) puts its image after 300 words: its image tokens lie past
    # --max-length, found when the evaluation builds its batch (was: rank 1 alone raised, rank 0 hung
    # in the eval all-reduce until gloo dropped the connection)
    for split, num in (("train", 8), ("eval", 4)):
        rows = []
        for i in range(num):
            ex, bad = make_example(split, i), split == "eval" and i == 3
            text = {"type": "text", "text": ex["question"] + (" word" * 300 if bad else "")}
            user = [text, {"type": "image"}] if bad else [{"type": "image"}, text]
            answer = [{"type": "text", "text": str(ex["answer"])}]
            rows.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
                         "images": [save_image(ex["images"][0], tmp_path, f"{split}_{i}")]})  # fmt: skip
        write_jsonl(tmp_path / "data" / f"{split}.jsonl", rows)
    proc = torchrun(str(REPO / "train.py"), "--model", "tiny", "--dataset", str(tmp_path / "data"), "--out-dir", str(tmp_path / "out"),
                    "--max-steps", "1", "--batch-size", "2", "--max-length", "200", "--num-eval-samples", "4", "--no-export")  # fmt: skip
    assert proc.returncode != 0
    assert "sample 3 of split 'eval'" in proc.stderr and "image tokens lie past --max-length 200" in proc.stderr, proc.stderr[-3000:]
    assert "other rank(s) failed" in proc.stderr and "Connection closed" not in proc.stderr


# -----------------------------------------------------------------------------
# checkpoints and resume


def test_periodic_saves_wait_for_the_generation_boundary(warm_model, tmp_path, monkeypatch):
    saved = []
    real = train_module.save_checkpoint
    monkeypatch.setattr(train_module, "save_checkpoint", lambda out, step, *a: saved.append(step) or real(out, step, *a))
    run_train(tmp_path, "grpo", "--model", warm_model, "--max-steps", "11", "--steps-per-generation", "4",
              "--batch-size", "4", "--num-generations", "4", "--reward-funcs", "toy_rewards:shorter", "--reward-weights", "1.0",
              **{"save-every": 3, "max-completion-length": 4})  # fmt: skip
    # generation batches end at steps 4 and 8: the first boundaries at or after 3 and 6; 11 is the last step
    assert saved == [4, 8, 11]


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


def test_resume_refuses_a_changed_config(tiny_dirs, tmp_path):
    common = ("--model", "tiny", "--batch-size", "2", "--max-length", "256")
    run_train(tmp_path, "sft", *common, "--max-steps", "1")
    with pytest.raises(ValueError, match=r"--algo: 'sft' -> 'dpo'.*--lr: 0.002 -> 1e-05.*--no-resume"):
        run_train(tmp_path, "dpo", *common, "--max-steps", "2", "--lr", "1e-5", "--beta", "0.1")
    run_train(tmp_path, "sft", *common, "--max-steps", "2", "--log-every", "5")  # safe changes resume
    assert [r["step"] for r in steps(tmp_path)] == [1, 2]


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


# -----------------------------------------------------------------------------
# data, model and config inputs


def test_held_out_split_is_held_out(tmp_path):
    rows = [{"prompt": f"question {i}", "solution": str(i)} for i in range(6)]
    single = write_jsonl(tmp_path / "one.jsonl", rows)
    assert len(load_split(str(single), "train", "rl", 0)) == 6
    assert load_split(str(single), "eval", "rl", 0, held_out=True) is None  # never its training rows
    write_jsonl(tmp_path / "dir" / "train.jsonl", rows[:4])
    write_jsonl(tmp_path / "dir" / "eval.jsonl", rows[4:])  # `datasets` calls this split "test"
    held_out = load_split(str(tmp_path / "dir"), "eval", "rl", 0, held_out=True)
    assert [r["prompt"] for r in held_out] == ["question 4", "question 5"]
    with pytest.raises(ValueError, match="no split 'training'"):
        load_split(str(tmp_path / "dir"), "training", "rl", 0)


def test_a_single_data_file_trains_without_evaluation(warm_model, tmp_path, capsys):
    rows = [{"prompt": make_example("train", i)["question"], "solution": "3"} for i in range(8)]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    run_train(tmp_path / "out", "grpo", "--model", warm_model, "--dataset", str(data), "--max-steps", "1",
              "--batch-size", "4", "--num-generations", "4", "--max-completion-length", "4",
              **{"eval-split": "eval", "num-eval-samples": 4, "no-export": False})  # fmt: skip
    records = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1] and not any(k.startswith("eval/") for k in records[0])
    # where the model went is said without an accuracy eval too (the one line a user needs from stdout)
    assert f"exported model ({tmp_path / 'out' / 'final'})" in capsys.readouterr().out


def test_column_rename_onto_an_existing_column_says_what_to_do(tmp_path):
    rows = [{"prompt": "old", "problem": "new", "solution": "1"}]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(ValueError, match=r"already has a column 'prompt'.*prompt=problem original_prompt=prompt"):
        load_split(str(data), "train", "rl", 0, ("prompt=problem",))
    ds = load_split(str(data), "train", "rl", 0, ("prompt=problem", "original_prompt=prompt"))
    assert ds[0]["prompt"] == "new" and ds[0]["original_prompt"] == "old"


def test_llava_template_renders_a_system_turn_as_system(load_family):
    processor, _, _ = load_family("tiny-llava")
    text = render(processor, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], True)
    assert text == "SYSTEM: Be brief. USER: Hi ASSISTANT: "


def test_model_that_is_not_built_in_local_or_a_hub_id_fails_fast(dist_world, tmp_path, monkeypatch):
    cfg = lambda model: dataclasses.replace(Config(), model=model)  # noqa: E731
    with pytest.raises(ValueError, match=r"'tiny-sfft' is not a built-in model .*Did you mean 'tiny-sft'"):
        train_module.resolve_model(cfg("tiny-sfft"), 0, "cpu")
    with pytest.raises(ValueError, match="not a local checkpoint directory"):
        train_module.resolve_model(cfg(str(tmp_path / "runs" / "sft" / "final")), 0, "cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        train_module.resolve_model(cfg(str(tmp_path / "empty")), 0, "cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ValueError, match=r"--model someorg/no-such-vlm: could not get it from the Hugging Face hub"):
        train_module.resolve_model(cfg("someorg/no-such-vlm"), 0, "cpu")


@pytest.mark.parametrize("name", sorted(APPLIES_TO))
def test_a_flag_the_algorithm_never_reads_is_refused(name):
    default = getattr(Config(), name)
    value = {bool: not default, int: 3 if default == 2 else 2, float: 0.5, str: "server", tuple: ("x",), type(None): 1.0}[type(default)]
    if name == "vllm_is_correction":
        value = "token_mask"
    elif name in ("loss_type", "importance_sampling_level", "scale_rewards"):
        value = {"loss_type": "bnpo", "importance_sampling_level": "sequence", "scale_rewards": "none"}[name]
    for algo in ("sft", "dpo", "mpo", "grpo", "gspo", "rloo", "online_dpo"):
        cfg = dataclasses.replace(PRESETS[algo](), **{name: value})
        if algo in APPLIES_TO[name]:
            continue
        with pytest.raises(ValueError, match=f"--{name.replace('_', '-')} does nothing for --algo {algo}"):
            check_config(cfg)


def test_cross_field_rules_are_checked_at_config_time():
    cases = [
        (dict(algo="grpo", batch_size=6, num_generations=4), "multiple of --num-generations"),
        (dict(algo="grpo", steps_per_generation=3, grad_accum_steps=2), "divide one another"),
        (dict(algo="online_dpo", num_generations=4, batch_size=8), "--num-generations 2"),
        # G = 1: every advantage 0, loss and gradient 0 at every step; refused for every RL algorithm
        *[(dict(algo=algo, num_generations=1, batch_size=8), f"--num-generations must be >= 2 for --algo {algo}")
          for algo in ("grpo", "gspo", "rloo")],
        (dict(algo="grpo", temperature=0.0), "--temperature must be > 0, got 0.0: at 0 (greedy decoding)"),
        (dict(algo="sft", max_completion_length=0), "--max-completion-length must be >= 1, got 0"),  # the accuracy eval's
        # vLLM settings that the chosen --vllm-mode never reads
        (dict(algo="grpo", vllm_url="http://10.0.0.1:8000"), "--vllm-url does nothing with --vllm-mode none"),
        (dict(algo="grpo", vllm_sync_every=2), "--vllm-sync-every does nothing with --vllm-mode none"),
        (dict(algo="grpo", vllm_is_cap=2.0), "--vllm-is-cap does nothing with --vllm-mode none"),
        (dict(algo="grpo", vllm_mode="colocate", vllm_timeout=5.0), "--vllm-timeout does nothing with --vllm-mode colocate"),
        (dict(algo="grpo", reward_weights=(1.0,)), "--reward-weights has 1 values for 2"),
        (dict(algo="gspo", reward_funcs=(), reward_weights=()), "--reward-funcs is empty"),
        (dict(algo="sft", grad_accum_steps=0), "--grad-accum-steps must be >= 1"),
    ]
    for fields, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            check_config(dataclasses.replace(Config(), **fields))


def test_fewer_eval_samples_than_ranks_is_refused(tiny_dirs, tmp_path):
    # 0 per rank silently turned evaluation off (an empty "step 0 |" line); 2 ranks x 1 sample is the
    # same rule as this 1 rank x 0 samples
    with pytest.raises(ValueError, match=r"--num-eval-samples 0 .* leaves no held-out sample .* set it to at least 1"):
        run_train(tmp_path, "sft", "--model", "tiny", "--max-steps", "1", **{"eval-split": "eval", "num-eval-samples": 0})


def test_gold_warning_names_the_dataset_sample(caplog):
    scores, stats = verify_answers(["\\boxed{3}", "\\boxed{3}"], ["3", "\\frac{"], sample_ids=["a", "sample 7 (completion 1)"])
    assert scores == [1.0, None] and stats.num_bad_gold == 1
    assert "sample 7 (completion 1): gold" in caplog.text


def test_exported_accuracy_reaches_metrics_jsonl(warm_model):
    last = read_metrics(Path(warm_model).parent / "metrics.jsonl")[-1]  # the warm-up run exported and checked it
    # the export, reloaded (sharded, as a frozen model), answers exactly as the trained policy did
    assert last["step"] == 70 and last["final/exported_accuracy"] == last["eval/accuracy"]


def test_eval_loss_is_nan_when_no_held_out_token_is_left(tiny_dirs, tmp_path):
    with pytest.raises(ValueError, match="no assistant token to train on"):  # the training rows are cut too
        run_train(tmp_path, "sft", "--model", "tiny", "--max-steps", "1", "--batch-size", "2", "--max-length", "40",
                  **{"eval-split": "eval", "num-eval-samples": 4})  # fmt: skip
    (first,) = read_metrics(tmp_path / "metrics.jsonl")
    assert first["step"] == 0 and first["eval/loss"] is None  # NaN, written as null; was 0.0


def test_built_in_warm_start_does_not_shift_the_seed(warm_model, tmp_path, monkeypatch):
    # Whatever runs before the run's seeding (the built-in tiny-sft's stage, resolving the model) may
    # consume the RNG; the run seeds after it, so a fresh cache and a warm one give the same run.
    flags = ("--model", warm_model, "--max-steps", "1", "--batch-size", "4", "--num-generations", "4",
             "--reward-funcs", "toy_rewards:shorter", "--reward-weights", "1.0")  # fmt: skip
    first = run_train(tmp_path / "a", "grpo", *flags)
    real = train_module.resolve_model
    monkeypatch.setattr(train_module, "resolve_model", lambda *a: (torch.rand(1000), real(*a))[1])
    second = run_train(tmp_path / "b", "grpo", *flags)
    assert (first["loss"], first["reward"]) == (second["loss"], second["reward"])


def test_the_repository_cites_only_its_own_files():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    missing = []
    for name in tracked:
        if not name.endswith((".py", ".md", ".sh", ".toml")) or not (REPO / name).exists():
            continue
        text = (REPO / name).read_text()
        assert "REFERENCE" + ".md" not in text and "../" + "shared" not in text, name  # split: this file would match
        for cited in re.findall(r"\b((?:nanoalign|bench|tests|\.ci)/[\w/.-]*\w\.(?:py|md|sh|json))\b", text):
            if not (REPO / cited).exists() and not cited.startswith("bench/results/"):  # results: written by a run
                missing.append(f"{name} cites {cited}")
    assert not missing, missing


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
