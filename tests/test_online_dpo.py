"""Tests for nanoalign/online_dpo.py: pair selection (ties, NaN, missing EOS) and the DPO loss."""

import dataclasses
import math

import pytest
import torch
from torch.testing import assert_close

from nanoalign.config import check_config, online_dpo_preset
from nanoalign.mpo import mpo_loss
from nanoalign.online_dpo import online_dpo_loss, select_pairs

NAN = float("nan")


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_select_pairs_higher_wins_ties_go_first_nan_handling():
    rewards = t(1.0, 2.0, 3.0, 3.0, NAN, 1.0, NAN, NAN)
    has_eos = torch.ones(8, dtype=torch.bool)
    chosen, rejected, m = select_pairs(rewards, has_eos)
    # (1, 2) -> row 1; tie (3, 3) -> first, row 2; (NaN, 1) -> the scored row 5; (NaN, NaN) -> invalid
    assert chosen[:3].tolist() == [1, 2, 5]
    assert rejected[:3].tolist() == [0, 3, 4]
    assert {chosen[3].item(), rejected[3].item()} == {6, 7}  # still indices of that pair, but not valid
    assert m["valid"].tolist() == [True, True, True, False]
    assert m["num_unrankable"] == 1
    assert m["num_half_scored"] == 1
    assert_close(m["frac_ties"], torch.tensor(1 / 3))  # 1 tie among 3 rankable pairs


def test_missing_eos_penalty():
    rewards, has_eos = t(1.0, 0.5), torch.tensor([False, True])
    chosen, rejected, _ = select_pairs(rewards, has_eos)
    assert (chosen.item(), rejected.item()) == (0, 1)  # no penalty: 1 > 0.5
    chosen, rejected, _ = select_pairs(rewards, has_eos, missing_eos_penalty=1.0)
    assert (chosen.item(), rejected.item()) == (1, 0)  # 1 - 1 = 0 < 0.5


def test_multiple_reward_functions_are_summed():
    rewards = t([1.0, 0.0], [0.0, 0.5], [NAN, 2.0], [1.0, NAN])  # R = [1, 0.5, 2, 1]
    chosen, rejected, m = select_pairs(rewards, torch.ones(4, dtype=torch.bool))
    assert chosen.tolist() == [0, 2] and rejected.tolist() == [1, 3]
    assert m["valid"].all()


def test_select_pairs_errors():
    with pytest.raises(ValueError, match="2 completions per prompt"):  # check_config's rule, before any pair
        check_config(dataclasses.replace(online_dpo_preset(), num_generations=3, batch_size=6))
    with pytest.raises(ValueError, match="has_eos"):
        select_pairs(t(1.0, 2.0), torch.ones(3, dtype=torch.bool))


def test_online_dpo_loss_is_the_dpo_sigmoid_loss():
    pc, pr, rc, rr = t(-1.0), t(-3.0), t(-2.0), t(-1.0)
    loss, m = online_dpo_loss(pc, pr, rc, rr, beta=0.1)
    # -log sigma(0.1 * ((-1 + 2) - (-3 + 1))) = log(1 + e^-0.3) = 0.554355
    assert_close(loss, torch.tensor(0.554355244468527, dtype=torch.float64))
    dpo_loss, dpo_metrics = mpo_loss(pc, pr, rc, rr, None, 0.1, ["sigmoid"], [1.0])
    assert_close(loss, dpo_loss)
    assert m.keys() == dpo_metrics.keys()
    assert_close(m["rewards/margins"], torch.tensor(0.3, dtype=torch.float64))


def test_gradient_pushes_higher_reward_completion_up():
    logps = t(-2.0, -2.0, -1.0, -3.0).requires_grad_(True)  # 2 prompts x 2 completions
    ref = logps.detach().clone()
    chosen, rejected, m = select_pairs(t(0.0, 1.0, 5.0, 2.0), torch.ones(4, dtype=torch.bool))
    keep = m["valid"]
    loss, _ = online_dpo_loss(logps[chosen[keep]], logps[rejected[keep]], ref[chosen[keep]], ref[rejected[keep]], 0.1)
    assert_close(loss, torch.tensor(math.log(2), dtype=torch.float64))  # policy == reference
    loss.backward()
    # higher reward: rows 1 and 2 (grad < 0, pushed up); lower: rows 0 and 3 (grad > 0)
    # magnitude beta * sigma(0) / P = 0.1 * 0.5 / 2 = 0.025
    assert_close(logps.grad, t(0.025, -0.025, -0.025, 0.025))
