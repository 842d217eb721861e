"""Tests for nanoalign/grpo.py: advantages, each aggregation, GSPO, clipping, KL and sampler correction."""

import dataclasses
import math
import typing

import pytest
import torch
from parity_worker import sharded_policy  # noqa: E402
from torch.testing import assert_close

from bench.common import trl_normaliser
from nanoalign import grpo, online_dpo, rl, rloo
from nanoalign.batch import process_prompts, render
from nanoalign.config import PRESETS, Config, check_config
from nanoalign.data import prepare_sample
from nanoalign.grpo import group_advantages, grpo_loss, sampler_correction
from nanoalign.model import load_processor
from nanoalign.rl import combine_rewards
from nanoalign.rollout import Rollout, completion_ids_of
from nanoalign.runtime import Run
from nanoalign.shapes import shapes_sample
from train import parse_config

NAN = float("nan")


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def loss_fn(logps, old_logps, advantages, mask, **overrides):
    """grpo_loss with TRL's arguments: max_completion_length (dr_grpo), num_items (dapo)."""
    kwargs = dict(
        ref_logps=None,
        loss_type="grpo",
        epsilon=0.2,
        epsilon_high=0.2,
        delta=None,
        beta=0.0,
        importance_sampling_level="token",
        max_completion_length=None,
        num_items=None,
    )
    kwargs.update(overrides)
    ref_logps = kwargs.pop("ref_logps")
    normaliser = trl_normaliser(kwargs["loss_type"], mask, kwargs.pop("max_completion_length"), kwargs.pop("num_items"))
    kwargs.setdefault("normaliser", normaliser)
    return grpo_loss(logps, old_logps, ref_logps, advantages, mask, **kwargs)


# -----------------------------------------------------------------------------
# group_advantages


def test_group_scaling():
    # groups [1, 2] and [3, 4]: A = R - group mean = [-0.5, 0.5, -0.5, 0.5]; group std (ddof=1) = sqrt(0.5)
    adv = group_advantages(t(1.0, 2.0, 3.0, 4.0), num_generations=2, scale_rewards="group")
    a = 0.5 / (math.sqrt(0.5) + 1e-4)  # 0.707007
    assert_close(adv, t(-a, a, -a, a))


def test_batch_scaling():
    # batch std (ddof=1) of [1, 2, 3, 4] = sqrt(5/3) = 1.290994;  0.5 / 1.291094 = 0.387268
    adv = group_advantages(t(1.0, 2.0, 3.0, 4.0), num_generations=2, scale_rewards="batch")
    a = 0.5 / (math.sqrt(5 / 3) + 1e-4)
    assert_close(adv, t(-a, a, -a, a))


def test_no_scaling():
    adv = group_advantages(t(1.0, 2.0, 3.0, 5.0), num_generations=2, scale_rewards="none")
    assert_close(adv, t(-0.5, 0.5, -1.0, 1.0))  # R - group mean, no division


def test_identical_rewards_give_zero_advantage():
    adv = group_advantages(t(1.0, 1.0, 1.0), num_generations=3, scale_rewards="group")
    assert_close(adv, t(0.0, 0.0, 0.0))  # std 0: 0 / (0 + 1e-4) = 0


def test_multiple_reward_functions_and_none():
    # columns = two weighted reward functions; NaN = that function returned None for that sample
    rewards = t([1.0, NAN], [NAN, NAN], [0.5, 1.5], [3.0, 1.0], [NAN, 1.0], [3.0, NAN])
    assert_close(combine_rewards(rewards), t(1.0, NAN, 2.0, 4.0, 1.0, 3.0), equal_nan=True)  # nansum per row
    adv = group_advantages(rewards, num_generations=2, scale_rewards="group")
    # group 0: R = [1, NaN] -> one valid value: A = [1 - 1, NaN -> 0] = [0, 0]
    # group 1: R = [2, 4] -> A = [-1, 1] / (sqrt(2) + 1e-4) = -/+0.707057
    # group 2: R = [1, 3] -> same as group 1
    a = 1.0 / (math.sqrt(2) + 1e-4)
    assert_close(adv, t(0.0, 0.0, -a, a, -a, a))


def test_all_none_group_and_nan_aware_std():
    # group 0 all None -> 0; group 1: [1, NaN, 3] -> mean 2, A = [-1, 0, 1], std of [1, 3] = sqrt(2)
    rewards = t(NAN, NAN, NAN, 1.0, NAN, 3.0)
    a = 1.0 / (math.sqrt(2) + 1e-4)
    for scale, expected in [("group", t(0.0, 0.0, 0.0, -a, 0.0, a)), ("none", t(0.0, 0.0, 0.0, -1.0, 0.0, 1.0))]:
        adv = group_advantages(rewards, num_generations=3, scale_rewards=scale)
        assert torch.isfinite(adv).all()
        assert_close(adv, expected)
    # batch std over the non-NaN rewards [1, 3] = sqrt(2) too
    assert_close(group_advantages(rewards, num_generations=3, scale_rewards="batch"), t(0.0, 0.0, 0.0, -a, 0.0, a))
    all_none = group_advantages(t(NAN, NAN), num_generations=2, scale_rewards="batch")
    assert_close(all_none, t(0.0, 0.0))  # no valid reward anywhere: advantage 0, never NaN


def test_group_advantages_errors():
    # whole groups per batch are check_config's rule (test_config: "multiple of --num-generations");
    # the names of --scale-rewards are Config's Literal: refused where the flags are parsed
    with pytest.raises(SystemExit):
        parse_config(["--algo", "grpo", "--scale-rewards", "std"])


# -----------------------------------------------------------------------------
# grpo_loss: aggregation, gradients, masking

# Two completions: 3 counted tokens and 1 counted token; padding holds -inf on purpose.
MASK = t([1.0, 1.0, 1.0], [1.0, 0.0, 0.0])
ADV = t(1.0, -2.0)


def on_policy_logps():
    logps = t([-0.5, -1.0, -2.0], [-0.3, -math.inf, -math.inf]).requires_grad_(True)
    return logps, logps.detach()


# ratio = 1, so L_t = -A_i: row 0 tokens -1, row 1 token +2.
@pytest.mark.parametrize(
    "loss_type, extra, expected_loss, expected_grad",
    [
        # mean_i[SUM_t M L / |o_i|] = mean(-3/3, 2/1) = 0.5;  grad = -A M / (|o_i| B) = -1/6 and 2/2
        ("grpo", {}, 0.5, t([-1 / 6, -1 / 6, -1 / 6], [1.0, 0.0, 0.0])),
        # SUM M L / SUM M = (-3 + 2) / 4 = -0.25;  grad = -A M / 4
        ("bnpo", {}, -0.25, t([-0.25, -0.25, -0.25], [0.5, 0.0, 0.0])),
        # SUM M L / (B * max_len) = -1 / (2 * 5) = -0.1;  grad = -A M / 10
        ("dr_grpo", {"max_completion_length": 5}, -0.1, t([-0.1, -0.1, -0.1], [0.2, 0.0, 0.0])),
        # SUM M L / num_items = -1 / 8 = -0.125;  grad = -A M / 8
        ("dapo", {"num_items": 8}, -0.125, t([-0.125, -0.125, -0.125], [0.25, 0.0, 0.0])),
    ],
)
def test_aggregation_and_on_policy_gradient(loss_type, extra, expected_loss, expected_grad):
    logps, old = on_policy_logps()
    loss, metrics = loss_fn(logps, old, ADV, MASK, loss_type=loss_type, **extra)
    assert_close(loss, torch.tensor(expected_loss, dtype=torch.float64))
    loss.backward()
    assert_close(logps.grad, expected_grad)  # masked (-inf) tokens: exactly 0, not NaN
    assert metrics["clip_ratio/region_mean"] == 0  # ratio 1 is never clipped
    assert "kl" not in metrics


def test_loss_type_inputs_are_guaranteed_by_the_config():
    # loss_type and importance_sampling_level are Config's Literals: refused where the flags are parsed
    with pytest.raises(SystemExit):
        parse_config(["--algo", "grpo", "--loss-type", "ppo"])
    with pytest.raises(SystemExit):
        parse_config(["--algo", "grpo", "--importance-sampling-level", "tokens"])
    # beta > 0 loads the frozen reference, whose log-probs grpo_loss's KL term reads
    assert grpo.needs_reference(dataclasses.replace(PRESETS["grpo"](), beta=0.1))
    assert not grpo.needs_reference(PRESETS["grpo"]())


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_gspo_equals_grpo_with_one_token_per_completion(loss_type):
    gen = torch.Generator().manual_seed(0)
    logps = -torch.rand(3, 4, generator=gen, dtype=torch.float64) * 2
    # log-ratios in [-0.5, 0.5]: some tokens land outside [0.8, 1.2] and are clipped
    old = logps + (torch.rand(3, 4, generator=gen, dtype=torch.float64) - 0.5)
    ref = logps + (torch.rand(3, 4, generator=gen, dtype=torch.float64) - 0.5)
    mask = torch.zeros(3, 4, dtype=torch.float64)
    mask[0, 1] = mask[1, 3] = mask[2, 0] = 1.0  # one counted token per completion, different positions
    adv = t(1.0, -1.0, 0.5)
    extra = dict(loss_type=loss_type, max_completion_length=4, num_items=3, beta=0.05, ref_logps=ref, delta=1.4)
    results = []
    for level in ("token", "sequence"):
        x = logps.clone().requires_grad_(True)
        loss, metrics = loss_fn(x, old, adv, mask, importance_sampling_level=level, **extra)
        loss.backward()
        results.append((loss, x.grad, metrics))
    (loss_tok, grad_tok, m_tok), (loss_seq, grad_seq, m_seq) = results
    assert_close(loss_seq, loss_tok)
    assert_close(grad_seq, grad_tok)
    assert grad_tok.abs().sum() > 0  # the comparison is not vacuous
    for key in m_tok:
        assert_close(m_seq[key], m_tok[key])


def test_gspo_ratio_is_length_normalised_and_differentiable():
    # row 0 log-ratios [log 1.1, log 1.3] -> log w = mean = log sqrt(1.43); A = 1, inside the clip range
    old = t([0.0, 0.0])
    logps = t([math.log(1.1), math.log(1.3)]).requires_grad_(True)
    loss, _ = loss_fn(logps, old, t(1.0), t([1.0, 1.0]), importance_sampling_level="sequence", epsilon_high=0.5)
    w = math.sqrt(1.1 * 1.3)  # 1.195826
    assert_close(loss, torch.tensor(-w, dtype=torch.float64))  # grpo: (-w - w) / 2 tokens
    loss.backward()
    # dL/dl_t = -A * w * (1/2) per token (through the mean), summed over the 2 broadcast tokens / 2
    assert_close(logps.grad, t([-w / 2, -w / 2]))


def test_clip_metrics_hand_example():
    old = t([0.0, 0.0], [0.0, 0.0])
    logps = t([math.log(0.7), math.log(1.3)], [math.log(1.5), math.log(0.5)])
    mask = t([1.0, 1.0], [1.0, 0.0])
    adv = t(-1.0, 1.0)
    _, m = loss_fn(logps, old, adv, mask)
    # counted tokens: (0.7, A<0) low-clipped; (1.3, A<0) not clipped; (1.5, A>0) high-clipped
    assert_close(m["clip_ratio/low_mean"], torch.tensor(1 / 3, dtype=torch.float64))
    assert_close(m["clip_ratio/high_mean"], torch.tensor(1 / 3, dtype=torch.float64))
    assert_close(m["clip_ratio/region_mean"], torch.tensor(2 / 3, dtype=torch.float64))
    _, m_seq = loss_fn(logps, old, adv, mask, importance_sampling_level="sequence")
    # sequence ratios: sqrt(0.7 * 1.3) = 0.954 (inside), 1.5 with A>0 (high): 1 of 2 sequences
    assert_close(m_seq["clip_ratio/low_mean"], torch.tensor(0.0, dtype=torch.float64))
    assert_close(m_seq["clip_ratio/high_mean"], torch.tensor(0.5, dtype=torch.float64))
    assert_close(m_seq["clip_ratio/region_mean"], torch.tensor(0.5, dtype=torch.float64))


def test_clipped_tokens_get_no_gradient():
    # w = 1.5 > 1.2 with A > 0: -min(1.5, 1.2) -> the clipped constant branch wins
    logps = t([math.log(1.5)]).requires_grad_(True)
    loss, _ = loss_fn(logps, t([0.0]), t(1.0), t([1.0]))
    assert_close(loss, torch.tensor(-1.2, dtype=torch.float64))
    loss.backward()
    assert_close(logps.grad, t([0.0]))


def test_delta_caps_the_unclipped_branch():
    logps = t([math.log(3.0)]).requires_grad_(True)
    old, mask = t([0.0]), t([1.0])
    # A = -1, w = 3: without delta -min(-3, -1.2) = 3, grad = -A * w = 3
    loss, _ = loss_fn(logps, old, t(-1.0), mask)
    assert_close(loss, torch.tensor(3.0, dtype=torch.float64))
    (grad,) = torch.autograd.grad(loss, logps)
    assert_close(grad, t([3.0]))
    # delta = 2: w = min(3, 2) = 2 -> -min(-2, -1.2) = 2, and the capped ratio carries no gradient
    loss, _ = loss_fn(logps, old, t(-1.0), mask, delta=2.0)
    assert_close(loss, torch.tensor(2.0, dtype=torch.float64))
    (grad,) = torch.autograd.grad(loss, logps)
    assert_close(grad, t([0.0]))
    # A = +1: delta does not touch the clipped branch: -min(2, 1.2) = -1.2
    loss, _ = loss_fn(logps, old, t(1.0), mask, delta=2.0)
    assert_close(loss, torch.tensor(-1.2, dtype=torch.float64))


def test_k3_kl_value_and_beta_zero_ignores_reference():
    logps, old = t([0.0, 0.0]), t([0.0, 0.0])
    ref = t([math.log(2.0), 123.0])  # second token is masked: its (huge) ref value must not matter
    mask = t([1.0, 0.0])
    loss, m = loss_fn(logps, old, t(0.0), mask, beta=0.1, ref_logps=ref, loss_type="bnpo")
    # A = 0 -> policy term 0; KL = exp(log 2) - log 2 - 1 = 1 - log 2 = 0.306853; loss = 0.1 * KL
    assert_close(m["kl"], torch.tensor(1 - math.log(2), dtype=torch.float64))
    assert_close(loss, torch.tensor(0.1 * (1 - math.log(2)), dtype=torch.float64))
    # beta = 0: the reference is never read (None or garbage give the same loss) and kl is not logged
    loss_none, m_none = loss_fn(logps, old, t(1.0), mask, beta=0.0, ref_logps=None)
    loss_nan, _ = loss_fn(logps, old, t(1.0), mask, beta=0.0, ref_logps=t([NAN, NAN]))
    assert_close(loss_none, torch.tensor(-1.0, dtype=torch.float64))  # -min(1 * 1, 1 * 1)
    assert_close(loss_nan, loss_none)
    assert "kl" not in m_none


def test_kl_gradient_pulls_towards_reference():
    logps = t([0.0]).requires_grad_(True)
    loss, _ = loss_fn(logps, t([0.0]), t(0.0), t([1.0]), beta=1.0, ref_logps=t([math.log(2.0)]))
    loss.backward()
    # d/dl [exp(ref - l) - (ref - l) - 1] = -exp(ref - l) + 1 = -2 + 1 = -1 -> l moves up towards ref
    assert_close(logps.grad, t([-1.0]))


# -----------------------------------------------------------------------------
# sampler correction

# d_t = old - sampler = [log 2, log 3, (masked) log 5]
OLD_S = t([0.0, 0.0, 0.0])
SAMPLER = t([-math.log(2.0), -math.log(3.0), -math.log(5.0)])
MASK_S = t([1.0, 1.0, 0.0])


@pytest.mark.parametrize(
    "mode, cap, expected",
    [
        ("token_truncate", 2.5, t([2.0, 2.5, 1.0])),  # exp(d) = [2, 3, 1] -> min(., 2.5)
        ("token_mask", 2.5, t([2.0, 0.0, 1.0])),  # 3 > 2.5 -> 0
        ("sequence_truncate", 3.0, t([3.0])),  # exp(log 2 + log 3) = 6 -> 3
        ("sequence_mask", 3.0, t([0.0])),  # 6 > 3 -> 0
        ("sequence_mask", 10.0, t([6.0])),  # inside [0, 10]
    ],
)
def test_sampler_correction_modes(mode, cap, expected):
    old = OLD_S.clone().requires_grad_(True)
    rho = sampler_correction(old, SAMPLER, MASK_S, mode=mode, cap=cap)
    assert_close(rho, expected)
    assert not rho.requires_grad


def test_sampler_correction_errors():
    with pytest.raises(SystemExit):  # the modes are Config's Literal: refused where the flags are parsed
        parse_config(["--algo", "grpo", "--vllm-is-correction", "sequence"])
    with pytest.raises(ValueError, match="--vllm-is-cap must be > 0"):  # check_config's rule
        check_config(dataclasses.replace(PRESETS["grpo"](), vllm_mode="server", vllm_is_cap=0.0))


def test_sampler_weights_scale_policy_term_not_kl():
    logps, old, mask = t([0.0]), t([0.0]), t([1.0])
    ref = t([math.log(2.0)])
    loss, _ = loss_fn(logps, old, t(1.0), mask, beta=0.1, ref_logps=ref, sampler_weights=t([0.5]))
    # -1 * 1 * rho + beta * KL = -0.5 + 0.1 * (1 - log 2) = -0.469315
    assert_close(loss, torch.tensor(-0.5 + 0.1 * (1 - math.log(2)), dtype=torch.float64))


# -----------------------------------------------------------------------------
# RL gradient accumulation and degenerate groups

COMPLETIONS = ["The answer is \\boxed{3}.", "3", "<think>I count 4 shapes.</think> The answer is \\boxed{4}.",
               "The shape has five sides, so", "\\boxed{2}", "I see 3 circles. The answer is \\boxed{3}.",
               "four", "<think>count</think> \\boxed{1}"]  # fmt: skip


class FixedRollouts:
    """A rollout backend with fixed completions (different lengths, some without EOS), so every batch
    split sees exactly the same rows."""

    def __init__(self, processor, stop_ids):
        self.processor, self.end = processor, sorted(stop_ids)[0]

    def sample(self, chunks, n, **sampling):
        return [self.rollout(chunk, n) for chunk in chunks]

    def rollout(self, chunk, n):
        processor = self.processor
        texts = [render(processor, s["prompt"], add_generation_prompt=True) for s in chunk for _ in range(n)]
        enc = process_prompts(processor, texts, [s["images"] for s in chunk for _ in range(n)], "left")
        ids, eos, decoded = [], [], []
        for s in chunk:
            for g in range(n):
                text = COMPLETIONS[(3 * s["index"] + g) % len(COMPLETIONS)]
                with_eos = (s["index"] + g) % 3 != 0
                ids.append(processor.tokenizer(text, add_special_tokens=False)["input_ids"] + ([self.end] if with_eos else []))
                eos.append(with_eos)
                decoded.append(text)
        # As nanoalign's sampler returns them: with the distinct prompts, so training reads each once.
        distinct = process_prompts(processor, texts[::n], [s["images"] for s in chunk], "left")
        rollout = Rollout(enc, ids, eos, decoded, shared_prompts=distinct)
        rollout.sample_ids = completion_ids_of(chunk, n)
        return rollout


def one_step(module, model_dir, cfg, samples, backend=None) -> tuple[float, dict]:
    """One optimizer step's summed loss and full gradients through the algorithm's prepare and loss,
    on the rollouts of `backend` (a FixedRollouts class)."""
    from nanoalign.rewards import load_reward_funcs

    processor = load_processor(model_dir)
    policy = sharded_policy(model_dir, 1, torch.device("cpu"), cfg.padding_free)
    ref = sharded_policy(model_dir, 1, torch.device("cpu"), cfg.padding_free) if module.needs_reference(cfg) else None
    stop_ids = {processor.tokenizer.convert_tokens_to_ids("<|im_end|>")}
    run = Run(cfg, processor, policy, ref, 0, 1, torch.device("cpu"), stop_ids, processor.tokenizer.pad_token_id,
              reward_funcs=load_reward_funcs(list(cfg.reward_funcs)), rollouts=(backend or FixedRollouts)(processor, stop_ids))
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
@pytest.mark.usefixtures("single_thread")  # in-process training: one OpenMP thread (conftest.one_thread)
def test_rl_accumulation_equals_the_doubled_batch(algo, overrides, warm_model, dist_world):
    # accum 2 x spg 1 (two micro-batches of B rows) must be the step of accum 1 x spg 1 on 2B rows of
    # the same prompts. Before: the loop took only spg micro-batches per step, so the gradient was
    # scaled by spg / accum (and dapo's accumulation did nothing).
    # bnpo is left out on purpose: TRL defines it as the token mean of each micro-batch, which two
    # micro-batches of different token counts do not share with their union.
    module = {"grpo": grpo, "gspo": grpo, "rloo": rloo, "online_dpo": online_dpo}[algo]
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
