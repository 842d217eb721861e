"""Config and model inputs: flags an algorithm never reads and cross-field rules are refused at config
time, --model typos and offline hub ids fail clearly, the built-in warm start does not shift the seed."""

import dataclasses
import re

import pytest
import torch
from test_algorithms import run_train  # noqa: E402

import train as train_module  # noqa: E402
from nanoalign.config import APPLIES_TO, PRESETS, Config, check_config


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
        # nanoalign's sampler decodes whole groups, and only it reads --rollout-batch-size
        (dict(algo="grpo", rollout_batch_size=12), "--rollout-batch-size 12 must be 0 (all rows) or a positive multiple of --num-generations 8"),
        (dict(algo="grpo", rollout_batch_size=16, sampler="hf"), "--sampler hf samples one micro-batch at a time"),
        (dict(algo="grpo", rollout_batch_size=16, vllm_mode="server"), "--rollout-batch-size does nothing with --vllm-mode server"),
        (dict(algo="gspo", reward_funcs=(), reward_weights=()), "--reward-funcs is empty"),
        (dict(algo="sft", grad_accum_steps=0), "--grad-accum-steps must be >= 1"),
    ]
    for fields, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            check_config(dataclasses.replace(Config(), **fields))


@pytest.mark.usefixtures("single_thread")  # in-process training: one OpenMP thread (conftest.one_thread)
def test_fewer_eval_samples_than_ranks_is_refused(tiny_dirs, tmp_path):
    # 0 per rank silently turned evaluation off (an empty "step 0 |" line); 2 ranks x 1 sample is the
    # same rule as this 1 rank x 0 samples
    with pytest.raises(ValueError, match=r"--num-eval-samples 0 .* leaves no held-out sample .* set it to at least 1"):
        run_train(tmp_path, "sft", "--model", "tiny", "--max-steps", "1", **{"eval-split": "eval", "num-eval-samples": 0})


@pytest.mark.usefixtures("single_thread")  # in-process training: one OpenMP thread (conftest.one_thread)
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
