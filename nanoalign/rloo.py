"""RLOO: REINFORCE with a leave-one-out baseline and a clipped sequence-level ratio.

For the G completions of one prompt (G >= 2):

    R_i   = SUM_k w_k r_ik - beta * SUM_t M (l_old_t - l_ref_t)      (KL folded into the reward)
    A_i   = R_i - (SUM_{j in group} R_j - R_i) / (G - 1)              (mean of the *other* completions)
    rho_i = exp(SUM_t M l_t - SUM_t M l_old_t)                       (sequence-level ratio, not normalised)
    L_i   = -min(rho_i A_i, clamp(rho_i, 1 - eps, 1 + eps_high) A_i);  loss = mean_i L_i (over the step)

Papers:
    RLOO for LLMs https://arxiv.org/abs/2402.14740 (Ahmadian et al., eq. 6)
    leave-one-out baseline https://openreview.net/forum?id=r1lgTGL5DE (Kool et al., "Buy 4 REINFORCE samples")
The numbers follow Hugging Face TRL's RLOOTrainer v1.9-v1.16.

Simplified / decided here:
    - pure functions; the caller gathers rewards and KL across ranks before `rloo_advantages`.
    - NaN (unscorable) completions get advantage 0 and are left out of the baseline, the mean of the other
      *scorable* ones; one with no scorable sibling has no baseline: advantage 0 (TRL's nansum: reward 0).
    - a group whose scorable rewards are all equal gets advantages of exactly 0 (TRL: rounding noise).
    - normalize: the batch mean and std (ddof=1) are over completions with a defined advantage.
"""

import torch

from nanoalign.rl import (  # samples_per_round: the loop's count of prompts per round, the same for every RL method
    STD_EPS, MicroBatch, check_token_inputs, clip_fractions, clipped_surrogate, combine_rewards, constant_groups,
    generation_round, group_statistics, keeps_old_logps, per_step_totals, policy_logps, rank_rows, samples_per_round,
)
from nanoalign.runtime import all_gather_rows


def rloo_advantages(rewards, num_generations: int, *, kl=None, beta: float = 0.0, normalize: bool = False):
    """Leave-one-out advantages (the objective above) -> (N,), never NaN.

    rewards: (N,) or (N, K) weighted rewards, NaN = not scorable, in groups of num_generations consecutive
        rows. kl: (N,) SUM_t M (l_old - l_ref) per completion, read when beta != 0.
    normalize: (A - mean) / (std + 1e-4) over the batch (TRL's normalize_advantages).
    """
    R = combine_rewards(rewards)  # (N,)
    if beta != 0:
        R = R - beta * kl  # R_i -= beta * SUM_t M (l_old - l_ref)
    grouped = R.view(-1, num_generations)  # (P, G)
    valid = ~torch.isnan(grouped)  # (P, G)
    group_sum = torch.nansum(grouped, dim=1, keepdim=True)  # (P, 1) SUM over scorable completions
    num_others = valid.sum(dim=1, keepdim=True) - 1  # (P, 1) scorable siblings of a scorable row
    baseline = (group_sum - grouped) / num_others.clamp(min=1)  # (P, G) (SUM_j R_j - R_i) / (G - 1)
    advantages = grouped - baseline  # A_i = R_i - baseline_i
    # rows that have both a reward and a baseline, in a group with signal: in a group of equal rewards
    # the leave-one-out difference is float rounding noise, not a preference (rl.constant_groups)
    defined = valid & (num_others >= 1) & ~constant_groups(grouped).unsqueeze(1)  # (P, G)
    advantages = torch.where(defined, advantages, torch.zeros_like(advantages)).view(-1)  # (N,)
    defined = defined.view(-1)

    if normalize and defined.any():
        A = advantages[defined]
        # torch.std of one element is NaN (ddof=1); 0 keeps a lone advantage at (A - A)/1e-4 = 0.
        std = A.std() if A.numel() > 1 else torch.zeros((), dtype=A.dtype)
        normalized = (advantages - A.mean()) / (std + STD_EPS)  # (A - mean) / (std + 1e-4)
        advantages = torch.where(defined, normalized, torch.zeros_like(advantages))
    return advantages


def rloo_loss(logps, old_logps, advantages, mask, *, epsilon: float, epsilon_high: float, normaliser: float):
    """Clipped RLOO loss, one importance ratio per sequence. Returns (loss, metrics).

    logps, old_logps, mask: (B, T); advantages: (B,) from `rloo_advantages`. loss = SUM_i L_i / normaliser,
    the sequences of the whole optimizer step (B for TRL's mean_i L_i on one micro-batch in one process).
    Metrics (detached 0-dim): clip_ratio/{low,high,region}_mean over sequences with a counted token.
    """
    check_token_inputs(logps, old_logps, advantages, mask)
    # where, not a product: padding may hold -inf, and -inf * 0 is NaN in both value and gradient.
    log_ratio = torch.where(mask.bool(), logps - old_logps, torch.zeros_like(logps))  # (B, T) M (l_t - l_old_t)
    rho = torch.exp(log_ratio.sum(dim=-1))  # (B,) rho_i = exp(SUM_t M l_t - SUM_t M l_old_t)
    loss = clipped_surrogate(rho, advantages, epsilon, epsilon_high).sum() / normaliser  # SUM_i L_i / N_step
    has_tokens = (mask.sum(dim=-1) > 0).to(logps.dtype)  # (B,)
    return loss, clip_fractions(rho.detach(), advantages, has_tokens, epsilon, epsilon_high)


# ----- The algorithm module train.py drives (--algo rloo): the shared generation round (rl.generation_round)
# with leave-one-out advantages (KL in the reward) and this loss.

DATA_FORMAT = "rl"


def needs_reference(cfg) -> bool:
    return cfg.beta != 0


def advantages(all_rewards, rollouts, micro: list[MicroBatch], run) -> tuple[torch.Tensor, dict]:
    """This rank's leave-one-out advantages, the KL in the reward gathered over ranks (the objective above)."""
    cfg = run.cfg
    metrics = group_statistics(all_rewards, micro, cfg.num_generations)
    kl = None
    if cfg.beta != 0:  # R_i -= beta * SUM_t M (l_old - l_ref)
        local_kl = torch.cat([((m.old_logps - m.ref_logps) * m.batch.mask).sum(1) for m in micro])  # (N,)
        kl = all_gather_rows(local_kl).cpu()
        metrics["kl"] = float(kl.mean())
    A = rloo_advantages(all_rewards.cpu(), cfg.num_generations, kl=kl, beta=cfg.beta, normalize=cfg.normalize_advantages)
    return rank_rows(A, run), metrics


def step_sequences(micro: list[MicroBatch], run) -> list[float]:
    """Each micro-batch's normaliser: the sequences of its optimizer step, all ranks."""
    return per_step_totals([float(m.batch.mask.shape[0]) for m in micro], run.cfg.grad_accum_steps, run.device)


def prepare(samples: list[dict], run) -> tuple[list[MicroBatch], dict]:
    cfg = run.cfg
    micro, metrics = generation_round(samples, run, advantages=advantages, normalisers=step_sequences,
                                      keep_old_logps=cfg.beta != 0 or keeps_old_logps(cfg), temperature=cfg.temperature)  # fmt: skip
    return micro * cfg.num_iterations, metrics


def loss(micro: MicroBatch, run) -> tuple[torch.Tensor, dict]:
    logps, old_logps, entropy = policy_logps(micro, run)
    value, metrics = rloo_loss(logps, old_logps, micro.advantages, micro.batch.mask, epsilon=run.cfg.epsilon,
                               epsilon_high=run.cfg.epsilon_high, normaliser=micro.normaliser)  # fmt: skip
    return value, {**{k: float(v) for k, v in metrics.items()}, "entropy": entropy}
