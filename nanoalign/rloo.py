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
    - NaN (unscorable) completions get advantage 0 and are left out of their group's baseline, which
      becomes the mean of the other *scorable* completions; a scorable completion with no scorable
      sibling has no baseline and gets advantage 0. (TRL's nansum would score them as 0.)
    - a group whose scorable rewards are all equal gets advantages of exactly 0 (TRL: rounding noise).
    - normalize: the batch mean and std (ddof=1) are taken over completions with a defined advantage.
"""

from dataclasses import dataclass

import torch

from nanoalign.batch import Batch
from nanoalign.rl import (  # samples_per_round: part of the module interface train.py drives
    STD_EPS, check_groups, check_token_inputs, clip_fractions, clipped_surrogate, combine_rewards, constant_groups,
    generation_round, keeps_old_logps, masked_mean, per_step_totals, samples_per_round, token_logps,
)
from nanoalign.runtime import all_gather_rows


def rloo_advantages(rewards, num_generations: int, *, kl=None, beta: float = 0.0, normalize: bool = False):
    """Leave-one-out advantages (the objective above). Returns (N,), never NaN.

    rewards: (N,) or (N, K) weighted rewards, NaN = not scorable, groups of num_generations (>= 2,
        check_config's rule for rloo) consecutive rows. kl: (N,) SUM_t M (l_old - l_ref) per completion, used when beta != 0.
    normalize: (A - mean) / (std + 1e-4) over the batch (TRL's normalize_advantages).
    """
    R = combine_rewards(rewards)  # (N,)
    check_groups(R.numel(), num_generations)
    if beta != 0:
        if kl is None or kl.shape != R.shape:
            raise ValueError(f"beta={beta} != 0 needs kl, one (N,)={tuple(R.shape)} KL sum per completion")
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
    """Clipped RLOO loss with one importance ratio per sequence. Returns (loss, metrics).

    logps, old_logps, mask: (B, T); advantages: (B,) from `rloo_advantages`.
    loss = SUM_i L_i / normaliser: the sequences of the whole optimizer step (every micro-batch, every
    rank); B for TRL's mean_i L_i on one micro-batch in one process.
    Metrics (detached 0-dim): clip_ratio/{low,high,region}_mean over sequences with a counted token.
    """
    check_token_inputs(logps, old_logps, advantages, mask)
    counted = mask.bool()
    mask = mask.to(logps.dtype)
    zeros = torch.zeros_like(logps)
    # where, not a product: padding may hold -inf, and -inf * 0 is NaN in both value and gradient.
    log_ratio = torch.where(counted, logps - old_logps, zeros)  # (B, T) M (l_t - l_old_t)
    rho = torch.exp(log_ratio.sum(dim=-1))  # (B,) rho_i = exp(SUM_t M l_t - SUM_t M l_old_t)
    per_sequence_loss = clipped_surrogate(rho, advantages, epsilon, epsilon_high)  # (B,) L_i
    loss = per_sequence_loss.sum() / normaliser  # SUM_i L_i / N_step
    has_tokens = (mask.sum(dim=-1) > 0).to(mask.dtype)  # (B,)
    metrics = clip_fractions(rho.detach(), advantages, has_tokens, epsilon, epsilon_high)
    return loss, metrics


# -----------------------------------------------------------------------------
# The algorithm module train.py drives (--algo rloo). Rollouts, rewards and batching are the shared
# generation round (rl.generation_round); only the advantages (leave-one-out, KL in the reward) and the loss differ.

DATA_FORMAT = "rl"


@dataclass
class MicroBatch:
    batch: Batch
    advantages: torch.Tensor  # (B,)
    old_logps: torch.Tensor | None  # (B, T) sampling-time log-probs; None = current policy, detached
    normaliser: float  # sequences in this micro-batch's optimizer step, all ranks


def needs_reference(cfg) -> bool:
    return cfg.beta != 0


def prepare(samples: list[dict], run) -> tuple[list[MicroBatch], dict]:
    cfg = run.cfg
    _, batches, rewards, all_rewards, metrics = generation_round(samples, run)
    keep_old = cfg.beta != 0 or keeps_old_logps(cfg)
    old = [token_logps(run.policy, b, cfg.temperature) if keep_old else None for b in batches]
    kl = None
    if cfg.beta != 0:  # KL goes into the reward: R_i -= beta * SUM_t M (l_old - l_ref)  (the objective above)
        ref = [token_logps(run.ref_policy, b, cfg.temperature) for b in batches]
        local_kl = torch.cat([((o - r) * b.mask).sum(1) for o, r, b in zip(old, ref, batches)])  # (N,)
        kl = all_gather_rows(local_kl).cpu()
        metrics["kl"] = float(kl.mean())
    advantages = rloo_advantages(all_rewards.cpu(), cfg.num_generations, kl=kl, beta=cfg.beta, normalize=cfg.normalize_advantages)
    start = run.rank * rewards.shape[0]
    mine = advantages[start : start + rewards.shape[0]].to(run.device).split(cfg.batch_size)
    step_rows = per_step_totals([float(b.mask.shape[0]) for b in batches], cfg.grad_accum_steps, run.device)
    micro = [MicroBatch(b, adv, o, n) for b, adv, o, n in zip(batches, mine, old, step_rows)]
    return micro * cfg.num_iterations, metrics


def loss(micro: MicroBatch, run) -> tuple[torch.Tensor, dict]:
    cfg = run.cfg
    logps, entropy = run.policy(
        **micro.batch.model_inputs(), temperature=cfg.temperature, with_entropy=True, logps_mask=micro.batch.mask
    )
    old_logps = micro.old_logps if micro.old_logps is not None else logps.detach()
    value, metrics = rloo_loss(logps, old_logps, micro.advantages, micro.batch.mask, epsilon=cfg.epsilon,
                               epsilon_high=cfg.epsilon_high, normaliser=micro.normaliser)  # fmt: skip
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics["entropy"] = masked_mean(entropy, micro.batch.mask)
    return value, metrics


def evaluate(samples: list[dict], run) -> dict:
    return {}  # held-out accuracy is measured by train.py for every algorithm
