"""Tests for nanoalign/mpo.py: hand-derived values for each loss type, the mix, metrics and gradients."""

import dataclasses
import math

import pytest
import torch
from torch.testing import assert_close

from nanoalign.config import check_config, mpo_preset
from nanoalign.mpo import bco_pair_loss, ipo_loss, mpo_loss, sigmoid_loss
from train import parse_config

BETA = 0.1


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def pair_inputs():
    # pair 0: r_c = -1 - (-2) = 1, r_r = -3 - (-1) = -2;  pair 1: policy == reference, r_c = r_r = 0
    return t(-1.0, -5.0), t(-3.0, -7.0), t(-2.0, -5.0), t(-1.0, -7.0)


def test_sigmoid_is_log2_when_policy_equals_reference():
    logps_c, logps_r = t(-4.0, -10.0, -0.5), t(-6.0, -1.0, -3.0)
    loss, metrics = mpo_loss(logps_c, logps_r, logps_c.clone(), logps_r.clone(), None, BETA, ["sigmoid"], [1.0])
    assert_close(loss, torch.tensor(math.log(2), dtype=torch.float64))  # -log sigma(0) = log 2 = 0.693147
    assert_close(metrics["rewards/margins"], torch.tensor(0.0, dtype=torch.float64))
    assert_close(metrics["rewards/accuracies"], torch.tensor(0.0, dtype=torch.float64))  # 0 > 0 is False


def test_sigmoid_and_bco_pair_per_pair_values():
    r_c, r_r = t(1.0), t(-2.0)
    # -log sigma(0.1 * (1 - (-2))) = log(1 + e^-0.3) = 0.554355
    assert_close(sigmoid_loss(r_c, r_r, BETA), t(0.554355244468527))
    # -log sigma(0.1 * 1) - log sigma(-0.1 * -2) = log(1 + e^-0.1) + log(1 + e^-0.2) = 0.644397 + 0.598139
    assert_close(bco_pair_loss(r_c, r_r, BETA), t(1.2425355294551625))


def test_weighted_mpo_mix_and_metrics():
    pc, pr, rc, rr = pair_inputs()
    nll = torch.tensor(2.0, dtype=torch.float64)
    loss, m = mpo_loss(pc, pr, rc, rr, nll, BETA, ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0])
    # sigmoid mean = (0.554355 + log 2) / 2 = 0.623751; bco mean = (1.242536 + 2 log 2) / 2 = 1.314415
    # 0.8 * 0.623751 + 0.2 * 1.314415 + 1.0 * 2.0 = 2.761884
    assert_close(loss, torch.tensor(2.761883959068894, dtype=torch.float64))
    assert_close(m["loss/sigmoid"], torch.tensor(0.6237512125142362, dtype=torch.float64))
    assert_close(m["loss/bco_pair"], torch.tensor(1.3144149452875267, dtype=torch.float64))
    assert_close(m["loss/sft"], nll)
    assert_close(m["rewards/chosen"], torch.tensor(0.05, dtype=torch.float64))  # mean(0.1*1, 0.1*0)
    assert_close(m["rewards/rejected"], torch.tensor(-0.1, dtype=torch.float64))  # mean(0.1*-2, 0)
    assert_close(m["rewards/margins"], torch.tensor(0.15, dtype=torch.float64))  # mean(0.3, 0)
    assert_close(m["rewards/accuracies"], torch.tensor(0.5, dtype=torch.float64))  # [0.1 > -0.2, 0 > 0]
    assert_close(m["logps/chosen"], torch.tensor(-3.0, dtype=torch.float64))  # mean(-1, -5)
    assert_close(m["logps/rejected"], torch.tensor(-5.0, dtype=torch.float64))  # mean(-3, -7)
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())


def test_ipo_value_and_requires_lengths():
    # r_c / |c| - r_r / |r| = 1/2 - (-2)/4 = 1;  (1 - 1/(2*0.1))^2 = (1 - 5)^2 = 16
    assert_close(ipo_loss(t(1.0), t(-2.0), BETA, t(2.0), t(4.0)), t(16.0))
    pc, pr, rc, rr = pair_inputs()
    lengths = dict(chosen_lengths=t(2.0, 3.0), rejected_lengths=t(4.0, 3.0))
    loss, _ = mpo_loss(pc, pr, rc, rr, None, BETA, ["ipo"], [1.0], **lengths)
    assert_close(loss, torch.tensor((16.0 + 25.0) / 2, dtype=torch.float64))  # pair 1: (0 - 5)^2 = 25


def test_gradients_push_chosen_up_and_rejected_down():
    pc, pr, rc, rr = pair_inputs()
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    loss, _ = mpo_loss(pc, pr, rc, rr, None, BETA, ["sigmoid", "bco_pair"], [0.8, 0.2])
    loss.backward()
    # gradient descent moves x by -grad: chosen goes up (grad < 0), rejected goes down (grad > 0)
    assert (pc.grad < 0).all() and (pr.grad > 0).all()
    # d/dr_c of -log sigma(beta(r_c - r_r)) at policy == ref is -beta * sigma(0) / B = -0.1 * 0.5 / 2 for sigmoid;
    # bco adds -beta * sigma(0) / B; total for pair 1: -(0.8 * 0.025 + 0.2 * 0.025) = -0.025
    assert_close(pc.grad[1], torch.tensor(-0.025, dtype=torch.float64))


@pytest.mark.parametrize("types, weights", [((), ()), (("sigmoid", "sigmoid"), (0.5, 0.5))])
def test_config_mistakes_raise(types, weights):
    with pytest.raises(ValueError, match="is empty or repeats a name"):  # check_config's rule, before any loss
        check_config(dataclasses.replace(mpo_preset(), loss_types=types, loss_weights=weights))


def test_loss_type_names_and_weights_are_checked_with_the_flags():
    with pytest.raises(SystemExit):  # "hinge" is outside Config.loss_types' Literal: refused where flags are parsed
        parse_config(["--algo", "mpo", "--loss-types", "sigmoid", "hinge", "--loss-weights", "1.0", "1.0"])
    with pytest.raises(ValueError, match="give one each"):  # one weight per loss type: check_config's rule
        check_config(dataclasses.replace(mpo_preset(), loss_types=("sigmoid", "bco_pair"), loss_weights=(1.0,)))


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match=r"\(B,\)"):
        mpo_loss(t(1.0, 2.0), t(1.0), t(1.0, 2.0), t(1.0, 2.0), None, BETA, ["sigmoid"], [1.0])
