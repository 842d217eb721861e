"""Tests for nanoalign/grpo.py: advantages, each aggregation, GSPO, clipping, KL and sampler correction."""

import math

import pytest
import torch
from torch.testing import assert_close

from bench.common import trl_normaliser
from nanoalign.grpo import group_advantages, grpo_loss, sampler_correction
from nanoalign.rl import combine_rewards
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
    with pytest.raises(ValueError, match="multiple of num_generations"):
        group_advantages(t(1.0, 2.0, 3.0), num_generations=2, scale_rewards="group")
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


def test_loss_type_inputs_are_required():
    logps, old = on_policy_logps()
    with pytest.raises(ValueError, match="normaliser"):
        loss_fn(logps, old, ADV, MASK, loss_type="dr_grpo")  # no max_completion_length: no normaliser
    with pytest.raises(ValueError, match="normaliser"):
        loss_fn(logps, old, ADV, MASK, loss_type="dapo")  # no token count
    with pytest.raises(ValueError, match="normaliser"):
        loss_fn(logps, old, ADV, MASK, normaliser=-1.0)
    # loss_type and importance_sampling_level are Config's Literals: refused where the flags are parsed
    with pytest.raises(SystemExit):
        parse_config(["--algo", "grpo", "--loss-type", "ppo"])
    with pytest.raises(SystemExit):
        parse_config(["--algo", "grpo", "--importance-sampling-level", "tokens"])
    with pytest.raises(ValueError, match="ref_logps"):
        loss_fn(logps, old, ADV, MASK, beta=0.1)


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
    with pytest.raises(ValueError, match="cap"):
        sampler_correction(OLD_S, SAMPLER, MASK_S, mode="token_truncate", cap=0.0)


def test_sampler_weights_scale_policy_term_not_kl():
    logps, old, mask = t([0.0]), t([0.0]), t([1.0])
    ref = t([math.log(2.0)])
    loss, _ = loss_fn(logps, old, t(1.0), mask, beta=0.1, ref_logps=ref, sampler_weights=t([0.5]))
    # -1 * 1 * rho + beta * KL = -0.5 + 0.1 * (1 - log 2) = -0.469315
    assert_close(loss, torch.tensor(-0.5 + 0.1 * (1 - math.log(2)), dtype=torch.float64))
