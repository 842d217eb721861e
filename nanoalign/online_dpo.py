"""Online DPO: sample two completions per prompt, rank them with the reward, apply the DPO loss.

For prompt p with completions (y_1, y_2) sampled from the current policy:

    R_j   = SUM_k w_k r_k(y_j) - penalty * [y_j has no EOS]
    chosen = argmax_j R_j (ties -> y_1),  rejected = the other
    L_p   = -log sigma(beta ((logp_pi(chosen) - logp_ref(chosen)) - (logp_pi(rejected) - logp_ref(rejected))))

Paper: https://arxiv.org/abs/2402.04792 (Guo et al., "Direct Language Model Alignment from Online AI
Feedback", algorithm 1), with a reward model/function in place of the LLM annotator, as in TRL's
OnlineDPOTrainer v1.9-v1.16.

Simplified / decided here:
    - pure functions: the caller samples, scores, and computes the log-prob sums (no temperature); the loss
      is mpo.py's sigmoid loss, not a copy.
    - an unscorable completion (all rewards NaN) ranks below any scored one (TRL's nansum: reward 0); a pair
      with both unscorable, or two identical (or both empty) completions, is skipped and counted.
"""

import torch

from nanoalign.mpo import mpo_loss
from nanoalign.rl import (  # samples_per_round: the loop's count of prompts per round, the same for every RL method
    combine_rewards, generation_round, per_step_totals, rank_rows, samples_per_round,
)


def select_pairs(rewards, has_eos, *, missing_eos_penalty=None):
    """Pick (chosen, rejected) for each prompt. Returns (chosen_index, rejected_index, metrics).

    rewards: (2P,) or (2P, K) weighted rewards, NaN = not scorable; rows 2p and 2p+1 are prompt p's pair.
    has_eos: (2P,) bool. missing_eos_penalty: subtracted from the reward of completions without EOS.
    chosen_index, rejected_index: (P,) row indices. metrics: "valid" (P,) bool, False where both are
        unscorable (skip those pairs); "num_unrankable", "num_half_scored" (exactly one scorable) and
        "frac_ties" (among valid pairs) as detached 0-dim floats.
    """
    R = combine_rewards(rewards)  # (2P,)
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
    metrics = {"valid": valid, "num_unrankable": (~valid).sum().float(), "num_half_scored": (nan_first ^ nan_second).sum().float(),
               "frac_ties": ties.sum().float() / valid.sum().clamp(min=1).float()}  # fmt: skip
    return chosen_index, rejected_index, metrics


def online_dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float):
    """DPO sigmoid loss (mpo_loss with ["sigmoid"], [1.0], no sft term) on (P,) log-prob sums of the
    selected pairs. Returns (loss, metrics)."""
    return mpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, None, beta, ["sigmoid"], [1.0])


# ----- The algorithm module train.py drives (--algo online_dpo): the RL generation round with G = 2, whose
# "advantages" are the pair selection (+1 chosen, -1 rejected, 0 for an unrankable pair's two rows).

DATA_FORMAT = "rl"
PAIR_METRICS = ("loss/sigmoid", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected")  # fmt: skip


def needs_reference(cfg) -> bool:
    return True


def pair_advantages(all_rewards, rollouts, micro, run) -> tuple[torch.Tensor, dict]:
    """This rank's pairs, selected: (N,) +1 chosen, -1 rejected, 0 skipped; and the pair metrics."""
    rewards = rank_rows(all_rewards, run)  # (N, K) this rank's completions, pairs adjacent
    marks, scores, num_skipped = [], {"chosen": [], "rejected": []}, 0
    for rollout, chunk_rewards in zip(rollouts, rewards.split(run.cfg.batch_size)):
        has_eos = torch.tensor(rollout.has_eos, device=chunk_rewards.device)
        chosen, rejected, pair_metrics = select_pairs(chunk_rewards, has_eos, missing_eos_penalty=run.cfg.missing_eos_penalty)
        # Two identical completions (common from a near-deterministic policy) are chosen = rejected: loss
        # ln 2 with exactly zero gradient, so kept they would only dilute the step's pair count.
        same = [a == b or not ta.strip() and not tb.strip() for a, b, ta, tb in
                zip(rollout.completion_ids[::2], rollout.completion_ids[1::2], rollout.texts[::2], rollout.texts[1::2])]  # fmt: skip
        valid = pair_metrics["valid"] & ~torch.tensor(same, device=has_eos.device)  # unrankable, identical or both empty: skipped
        num_skipped += int((~valid).sum())
        totals = combine_rewards(chunk_rewards)  # (2P,)
        scores["chosen"] += totals[chosen[valid]].tolist()
        scores["rejected"] += totals[rejected[valid]].tolist()
        mark = torch.zeros(len(totals))
        mark[chosen[valid]], mark[rejected[valid]] = 1.0, -1.0
        marks.append(mark)
    chosen_scores, rejected_scores = torch.tensor(scores["chosen"]), torch.tensor(scores["rejected"])
    metrics = {
        "skipped_pairs": float(num_skipped),  # both completions identical, empty or unscorable
        "frac_ties": float((chosen_scores == rejected_scores).float().mean()) if len(chosen_scores) else 0.0,
        "scores/chosen": float(chosen_scores.nanmean()) if len(chosen_scores) else float("nan"),
        "scores/rejected": float(rejected_scores.nanmean()) if len(rejected_scores) else float("nan"),
        "reward": float(combine_rewards(rewards).nanmean()),
    }
    metrics["scores/margin"] = metrics["scores/chosen"] - metrics["scores/rejected"]
    return torch.cat(marks), metrics


def step_pairs(micro, run) -> list[float]:
    """Each micro-batch's normaliser: the rankable pairs of its optimizer step, all ranks."""
    return per_step_totals([float((m.advantages > 0).sum()) for m in micro], run.cfg.grad_accum_steps, run.device)


def prepare(samples: list[dict], run) -> tuple[list, dict]:
    # As TRL's: the log-probs of online DPO are taken without the sampling temperature.
    return generation_round(samples, run, advantages=pair_advantages, normalisers=step_pairs, keep_old_logps=False,
                            temperature=1.0)  # fmt: skip


def loss(micro, run) -> tuple[torch.Tensor, dict]:
    logps, _ = run.policy(**micro.batch.model_inputs(), logps_mask=micro.batch.mask)
    sums = (logps * micro.batch.mask).sum(1)  # (2P,) SUM_t M l_t
    ref_sums = (micro.ref_logps * micro.batch.mask).sum(1)  # (2P,)
    # Row indices in pair order: each pair holds one chosen and one rejected row of its own two.
    chosen, rejected = (micro.advantages > 0).nonzero().squeeze(1), (micro.advantages < 0).nonzero().squeeze(1)
    if len(chosen) == 0:  # nothing rankable here; still backward so FSDP's gradient reduction runs
        return sums.sum() * 0.0, dict.fromkeys(PAIR_METRICS, float("nan"))  # same keys on every rank
    value, metrics = online_dpo_loss(sums[chosen], sums[rejected], ref_sums[chosen], ref_sums[rejected], run.cfg.beta)
    # The mean over this micro-batch's pairs -> its share of the step's pair mean (all micro-batches,
    # all ranks): SUM over its pairs / the step's pairs.
    return value * len(chosen) / micro.normaliser, {k: float(v) for k, v in metrics.items()}
