"""Online DPO: sample two completions per prompt, rank them with the reward, apply the DPO loss.

For prompt p with completions (y_1, y_2) sampled from the current policy:

    R_j   = SUM_k w_k r_k(y_j) - penalty * [y_j has no EOS]
    chosen = argmax_j R_j (ties -> y_1),  rejected = the other
    L_p   = -log sigma(beta ((logp_pi(chosen) - logp_ref(chosen)) - (logp_pi(rejected) - logp_ref(rejected))))

Paper: https://arxiv.org/abs/2402.04792 (Guo et al., "Direct Language Model Alignment from Online AI
Feedback", algorithm 1), with a reward model/function in place of the LLM annotator, as in TRL's
OnlineDPOTrainer v1.9-v1.16 (REFERENCE.md, "Online DPO").

Simplified / decided here:
    - pure functions: the caller samples, scores, and computes the log-prob sums (no temperature).
    - the loss is mpo.py's sigmoid loss, not a copy of it.
    - an unscorable completion (all reward functions NaN) ranks below any scored one; a pair with both
      unscorable cannot be ranked: it is flagged invalid so the caller skips it and counts the skip.
      (TRL's nansum would score NaN as 0.)
"""

import torch

from nanoalign.grpo import combine_rewards
from nanoalign.mpo import mpo_loss


def select_pairs(rewards, has_eos, *, missing_eos_penalty=None):
    """Pick (chosen, rejected) for each prompt. Returns (chosen_index, rejected_index, metrics).

    rewards: (2P,) or (2P, K) weighted rewards, NaN = not scorable; rows 2p and 2p+1 are the two
        completions of prompt p. has_eos: (2P,) bool, False for completions cut at the length limit.
    missing_eos_penalty: subtracted from the reward of completions without EOS (None = off).
    chosen_index, rejected_index: (P,) long row indices into the 2P completions.
    metrics: "valid" (P,) bool, False where both completions are unscorable (skip those pairs);
        "num_unrankable", "num_half_scored" (exactly one scorable) and "frac_ties" (among valid pairs),
        as detached 0-dim float tensors.
    """
    R = combine_rewards(rewards)  # (2P,)
    if R.numel() % 2 != 0:
        raise ValueError(f"online DPO needs 2 completions per prompt, got {R.numel()} rewards (odd)")
    if has_eos.shape != R.shape:
        raise ValueError(f"has_eos {tuple(has_eos.shape)} must be (2P,)={tuple(R.shape)}, one flag per completion")
    if missing_eos_penalty is not None:
        R = R - missing_eos_penalty * (~has_eos.bool()).to(R.dtype)  # R -= p for completions without EOS

    pairs = R.view(-1, 2)  # (P, 2)
    first, second = pairs[:, 0], pairs[:, 1]
    nan_first, nan_second = torch.isnan(first), torch.isnan(second)
    valid = ~(nan_first & nan_second)  # (P,) at least one completion is scorable
    # ">=" sends ties to the first completion. Any comparison with NaN is False, so (NaN, x) already
    # picks the second; "| nan_second" makes (x, NaN) pick the first: scored beats unscorable.
    first_wins = (first >= second) | nan_second  # (P,)
    offsets = torch.arange(pairs.shape[0], device=R.device) * 2  # (P,) row of each pair's first completion
    chosen_index = torch.where(first_wins, offsets, offsets + 1)  # (P,)
    rejected_index = torch.where(first_wins, offsets + 1, offsets)  # (P,)

    ties = (first == second) & valid  # NaN == NaN is False, so unrankable pairs are never ties
    metrics = {
        "valid": valid,
        "num_unrankable": (~valid).sum().float(),
        "num_half_scored": (nan_first ^ nan_second).sum().float(),
        "frac_ties": ties.sum().float() / valid.sum().clamp(min=1).float(),
    }
    return chosen_index, rejected_index, metrics


def online_dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float):
    """DPO sigmoid loss on the selected pairs: mpo_loss with ["sigmoid"], [1.0]. Returns (loss, metrics).

    All inputs (P,) sums of completion-token log-probs (invalid pairs already dropped by the caller).
    """
    return mpo_loss(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        None,  # chosen_nll: no sft term in online DPO
        beta,
        ["sigmoid"],
        [1.0],
    )
