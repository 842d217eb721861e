"""Tests for nanoalign/rloo.py: leave-one-out baseline, KL in the reward, normalisation, the loss."""

import dataclasses
import math

import pytest
import torch
from torch.testing import assert_close

from nanoalign.config import check_config, rloo_preset
from nanoalign.rloo import rloo_advantages, rloo_loss

NAN = float("nan")


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_leave_one_out_baseline():
    adv = rloo_advantages(t(1.0, 2.0, 3.0, 5.0, 5.0, 8.0), num_generations=3)
    # group 0, sum 6: 1 - (6-1)/2 = -1.5, 2 - (6-2)/2 = 0, 3 - (6-3)/2 = 1.5
    # group 1, sum 18: 5 - (18-5)/2 = -1.5 (twice), 8 - (18-8)/2 = 3
    assert_close(adv, t(-1.5, 0.0, 1.5, -1.5, -1.5, 3.0))


def test_multiple_reward_functions_are_summed():
    adv = rloo_advantages(t([1.0, 0.0], [1.0, 1.0]), num_generations=2)
    assert_close(adv, t(-1.0, 1.0))  # R = [1, 2]: 1 - 2, 2 - 1


def test_kl_goes_into_the_reward():
    rewards, kl = t(1.0, 2.0), t(2.0, 0.0)
    assert_close(rloo_advantages(rewards, 2), t(-1.0, 1.0))  # beta = 0 ignores kl
    # R = [1 - 0.5*2, 2 - 0.5*0] = [0, 2] -> A = [0 - 2, 2 - 0]
    assert_close(rloo_advantages(rewards, 2, kl=kl, beta=0.5), t(-2.0, 2.0))


def test_normalize():
    adv = rloo_advantages(t(1.0, 2.0, 3.0, 5.0, 5.0, 8.0), num_generations=3, normalize=True)
    # A = [-1.5, 0, 1.5, -1.5, -1.5, 3]: mean 0, std (ddof=1) = sqrt(18/5) = 1.897367
    s = math.sqrt(3.6) + 1e-4
    assert_close(adv, t(-1.5 / s, 0.0, 1.5 / s, -1.5 / s, -1.5 / s, 3.0 / s))


def test_nan_rewards_are_left_out_of_the_baseline():
    adv = rloo_advantages(t(1.0, NAN, 3.0, 4.0, NAN, 2.0, NAN, NAN), num_generations=4)
    # group 0, scorable [1, 3, 4], sum 8: 1 - 7/2 = -2.5, NaN -> 0, 3 - 5/2 = 0.5, 4 - 4/2 = 2
    # group 1: only one scorable completion -> no baseline -> 0; NaN rows -> 0
    assert_close(adv, t(-2.5, 0.0, 0.5, 2.0, 0.0, 0.0, 0.0, 0.0))
    normalized = rloo_advantages(t(1.0, NAN, 3.0, 4.0, NAN, 2.0, NAN, NAN), num_generations=4, normalize=True)
    # stats over the 3 defined advantages only: mean 0, std (ddof=1) = sqrt((6.25 + 0.25 + 4) / 2) = 2.291288
    s = math.sqrt(5.25) + 1e-4
    assert_close(normalized, t(-2.5 / s, 0.0, 0.5 / s, 2.0 / s, 0.0, 0.0, 0.0, 0.0))  # undefined rows stay 0


def test_group_size_errors():
    with pytest.raises(ValueError, match="num-generations must be >= 2 for --algo rloo"):  # check_config's rule, before any advantage
        check_config(dataclasses.replace(rloo_preset(), num_generations=1))
    with pytest.raises(ValueError, match="multiple of --num-generations"):  # check_config's rule: whole groups
        check_config(dataclasses.replace(rloo_preset(), batch_size=3))


def test_on_policy_loss_and_gradient():
    logps = t([-0.5, -1.0], [-0.2, -math.inf]).requires_grad_(True)
    mask = t([1.0, 1.0], [1.0, 0.0])
    loss, m = rloo_loss(logps, logps.detach(), t(1.0, -2.0), mask, epsilon=0.2, epsilon_high=0.2, normaliser=2)  # TRL: the mean
    # rho = 1: L = -A = [-1, 2] -> mean 0.5
    assert_close(loss, torch.tensor(0.5, dtype=torch.float64))
    loss.backward()
    # d rho_i / d l_t = rho_i M_t, so grad = -A_i M_t / B: row 0 -1/2, row 1 +2/2, padding exactly 0
    assert_close(logps.grad, t([-0.5, -0.5], [1.0, 0.0]))
    assert m["clip_ratio/region_mean"] == 0


def test_sequence_ratio_clipping_and_metrics():
    old = t([0.0, 0.0], [0.0, 0.0])
    logps = t([math.log(1.1), math.log(1.2)], [math.log(0.5), 5.0]).requires_grad_(True)
    mask = t([1.0, 1.0], [1.0, 0.0])
    loss, m = rloo_loss(logps, old, t(1.0, -1.0), mask, epsilon=0.2, epsilon_high=0.2, normaliser=2)
    # rho_0 = 1.1 * 1.2 = 1.32, A = 1: -min(1.32, 1.2) = -1.2   (high-clipped)
    # rho_1 = 0.5 (masked token ignored), A = -1: -min(-0.5, -0.8) = 0.8   (low-clipped)
    assert_close(loss, torch.tensor((-1.2 + 0.8) / 2, dtype=torch.float64))
    assert_close(m["clip_ratio/low_mean"], torch.tensor(0.5, dtype=torch.float64))
    assert_close(m["clip_ratio/high_mean"], torch.tensor(0.5, dtype=torch.float64))
    assert_close(m["clip_ratio/region_mean"], torch.tensor(1.0, dtype=torch.float64))
    loss.backward()
    assert_close(logps.grad, torch.zeros_like(logps))  # both sequences clipped: no gradient
