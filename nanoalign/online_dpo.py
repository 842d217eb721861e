"""Online DPO: sample two completions per prompt, rank them with the reward, apply the DPO loss.

For prompt p with completions (y_1, y_2) sampled from the current policy:

    R_j   = SUM_k w_k r_k(y_j) - penalty * [y_j has no EOS]
    chosen = argmax_j R_j (ties -> y_1),  rejected = the other
    L_p   = -log sigma(beta ((logp_pi(chosen) - logp_ref(chosen)) - (logp_pi(rejected) - logp_ref(rejected))))

Paper: https://arxiv.org/abs/2402.04792 (Guo et al., "Direct Language Model Alignment from Online AI
Feedback", algorithm 1), with a reward model/function in place of the LLM annotator, as in TRL's
OnlineDPOTrainer v1.9-v1.16.

Simplified / decided here:
    - pure functions: the caller samples, scores, and computes the log-prob sums (no temperature).
    - the loss is mpo.py's sigmoid loss, not a copy of it.
    - an unscorable completion (all reward functions NaN) ranks below any scored one; a pair with both
      unscorable cannot be ranked: it is flagged invalid so the caller skips it and counts the skip.
      (TRL's nansum would score NaN as 0.) So are pairs of two identical (or both empty) completions.
"""

from dataclasses import dataclass

import torch

from nanoalign.batch import Batch
from nanoalign.mpo import mpo_loss
from nanoalign.rl import (  # samples_per_round: part of the module interface train.py drives (G = 2)
    combine_rewards, completion_batch, completion_metrics, per_step_totals, rollout_chunks, samples_per_round,
    score_rollouts, token_logps,
)


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


# -----------------------------------------------------------------------------
# The algorithm module train.py drives (--algo online_dpo). Rollouts and rewards are the RL ones
# (nanoalign/rollout.py) with G = 2; the loss is mpo.py's sigmoid DPO loss.

DATA_FORMAT = "rl"
PAIR_METRICS = ("loss/sigmoid", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected")  # fmt: skip


@dataclass
class MicroBatch:
    batch: Batch  # 2 rows per prompt, adjacent, as sampled
    chosen: torch.Tensor  # (P_valid,) row index of each rankable pair's chosen completion
    rejected: torch.Tensor  # (P_valid,)
    ref_logps: torch.Tensor  # (2P,) reference completion log-prob sums (no temperature)
    normaliser: float  # rankable pairs in this micro-batch's optimizer step, all ranks


def needs_reference(cfg) -> bool:
    return True


def prepare(samples: list[dict], run) -> tuple[list[MicroBatch], dict]:
    cfg = run.cfg
    rollouts = rollout_chunks(samples, run, 2)
    rewards, metrics = score_rollouts(rollouts, samples, run, 2)
    metrics.update(completion_metrics(rollouts))
    micro, scores, num_skipped = [], {"chosen": [], "rejected": []}, 0
    for rollout, chunk_rewards in zip(rollouts, rewards.split(cfg.batch_size)):
        has_eos = torch.tensor(rollout.has_eos, device=run.device)
        chosen, rejected, pair_metrics = select_pairs(chunk_rewards, has_eos, missing_eos_penalty=cfg.missing_eos_penalty)
        # Two identical completions (common from a near-deterministic policy) are chosen = rejected: loss
        # ln 2 with exactly zero gradient, so kept they would only dilute the step's pair count.
        same = [a == b or not ta.strip() and not tb.strip() for a, b, ta, tb in
                zip(rollout.completion_ids[::2], rollout.completion_ids[1::2], rollout.texts[::2], rollout.texts[1::2])]  # fmt: skip
        valid = pair_metrics["valid"] & ~torch.tensor(same, device=run.device)  # unrankable, identical or both empty: skipped
        num_skipped += int((~valid).sum())
        totals = combine_rewards(chunk_rewards)  # (2P,)
        scores["chosen"] += totals[chosen[valid]].tolist()
        scores["rejected"] += totals[rejected[valid]].tolist()
        batch = completion_batch(rollout, run, mask_truncated=False)
        ref = (token_logps(run.ref_policy, batch) * batch.mask).sum(1)  # as TRL: no temperature
        micro.append(MicroBatch(batch, chosen[valid], rejected[valid], ref, 0.0))
    for m, num_pairs in zip(micro, per_step_totals([float(len(m.chosen)) for m in micro], cfg.grad_accum_steps, run.device)):
        m.normaliser = num_pairs
    if num_skipped and run.rank == 0:
        print(f"online_dpo: skipped {num_skipped} pair(s) on rank 0 whose completions were identical, both empty or unscorable", flush=True)
    chosen_scores, rejected_scores = torch.tensor(scores["chosen"]), torch.tensor(scores["rejected"])
    metrics.update({
        "skipped_pairs": float(num_skipped),
        "frac_ties": float((chosen_scores == rejected_scores).float().mean()) if len(chosen_scores) else 0.0,
        "scores/chosen": float(chosen_scores.nanmean()) if len(chosen_scores) else float("nan"),
        "scores/rejected": float(rejected_scores.nanmean()) if len(rejected_scores) else float("nan"),
        "reward": float(combine_rewards(rewards).nanmean()),
    })  # fmt: skip
    metrics["scores/margin"] = metrics["scores/chosen"] - metrics["scores/rejected"]
    return micro, metrics


def loss(micro: MicroBatch, run) -> tuple[torch.Tensor, dict]:
    logps, _ = run.policy(**micro.batch.model_inputs(), logps_mask=micro.batch.mask)
    sums = (logps * micro.batch.mask).sum(1)  # (2P,) SUM_t M l_t
    if len(micro.chosen) == 0:  # nothing rankable here; still backward so FSDP's gradient reduction runs
        return sums.sum() * 0.0, dict.fromkeys(PAIR_METRICS, float("nan"))  # same keys on every rank
    value, metrics = online_dpo_loss(
        sums[micro.chosen], sums[micro.rejected], micro.ref_logps[micro.chosen], micro.ref_logps[micro.rejected], run.cfg.beta
    )
    # The mean over this micro-batch's pairs -> its share of the step's pair mean (all micro-batches,
    # all ranks): SUM over its pairs / the step's pairs.
    return value * len(micro.chosen) / micro.normaliser, {k: float(v) for k, v in metrics.items()}


def evaluate(samples: list[dict], run) -> dict:
    return {}  # held-out accuracy is measured by train.py for every algorithm
