"""GRPO and GSPO: group-relative advantages and the clipped policy-gradient loss.

Objective, per completion i of a group of G sampled for one prompt, per counted token t:

    R_i   = SUM_k w_k r_ik                                  (reward functions, NaN = not scorable)
    A_i   = (R_i - mean_group(R)) / (std + 1e-4)            (std: group or batch, or no division)
    GRPO: log w_t = l_t - l_old_t                           (token-level importance ratio)
    GSPO: log w_i = SUM_t M (l_t - l_old_t) / max(SUM_t M, 1)   (length-normalised sequence ratio)
    w2    = clamp(w, 1 - eps, 1 + eps_high);  w = min(w, delta) if delta is set
    L_t   = -min(w A, w2 A) * rho_t + beta * (exp(l_ref - l) - (l_ref - l) - 1)
    loss  = aggregate(L, M) by loss_type: grpo | bnpo | dr_grpo | dapo

Papers:
    GRPO     https://arxiv.org/abs/2402.03300 (DeepSeekMath, eq. 3 and section 4.1.2)
    GSPO     https://arxiv.org/abs/2507.18071 (eq. 5-7)
    DAPO     https://arxiv.org/abs/2503.14476 (clip-higher eps_high, token-level normalisation)
    Dr. GRPO https://arxiv.org/abs/2503.20783 (constant normaliser, no std scaling)
    delta    https://arxiv.org/abs/2505.07291 (INTELLECT-2, two-sided clipping)
    k3 KL    http://joschu.net/blog/kl-approx.html
The numbers follow Hugging Face TRL's GRPOTrainer v1.9-v1.16 (README.md, "Differences from TRL").

Simplified / decided here:
    - pure functions: the caller gathers rewards across ranks and passes the step's `normaliser`.
    - a completion whose rewards are all NaN is left out of its group's statistics, advantage 0
      (TRL's nansum would count it as reward 0 in the group mean and std).
    - masked positions of logps / old_logps / ref_logps are 0 before any exp(): padding (even -inf)
      never leaks a NaN into the loss or the gradient.
    - GSPO clip metrics average over sequences with a counted token (TRL: all sequences).
"""

import torch

from nanoalign.rl import (  # samples_per_round: the loop's count of prompts per round, the same for every RL method
    STD_EPS, MicroBatch, check_token_inputs, clip_fractions, clipped_surrogate, combine_rewards, constant_groups,
    generation_round, group_statistics, keeps_old_logps, masked_mean, nan_std, per_step_totals, policy_logps, rank_rows,
    samples_per_round,
)


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str) -> torch.Tensor:
    """A_i = (R_i - mean_group(R)) / (std + 1e-4) -> (N,), never NaN.

    rewards: (N,) or (N, K) weighted rewards, NaN = not scorable, N = prompts x G with each group's G
        rows consecutive, gathered across ranks by the caller.
    scale_rewards: "group" (group std, ddof=1), "batch" (std of all non-NaN rewards) or "none" (Dr. GRPO).
    Unscorable rows and groups without signal (rl.constant_groups) get exactly 0.
    """
    R = combine_rewards(rewards)  # (N,)
    grouped = R.view(-1, num_generations)  # (P, G)
    # nanmean of an all-NaN group is NaN; its advantages become 0 below, which is what we want.
    advantages = grouped - torch.nanmean(grouped, dim=1, keepdim=True)  # (P, G) A = R - mean_group(R)
    if scale_rewards == "group":
        advantages = advantages / (nan_std(grouped, dim=1) + STD_EPS)  # A /= (std_group + 1e-4)
    elif scale_rewards == "batch":
        advantages = advantages / (nan_std(R, dim=0) + STD_EPS)  # A /= (std_batch + 1e-4)
    advantages = advantages.masked_fill(constant_groups(grouped).unsqueeze(1), 0.0)  # no signal: exactly 0
    return torch.nan_to_num(advantages.view(-1), nan=0.0)  # NaN advantages -> 0


def sampler_correction(old_logps, sampler_logps, mask, *, mode: str, cap: float) -> torch.Tensor:
    """Importance weight rho for the sampler (vLLM) not being exactly the trained policy (TRL's correction).

    d_t = (l_old_t - l_vllm_t) M; token modes rho_t = exp(d_t) (B, T); sequence modes rho = exp(SUM_t d_t) (B, 1).
    *_truncate: rho = min(rho, cap). *_mask: rho = 0 where rho > cap (TRL v1.x: no lower bound).
    Detached: a fixed per-sample weight of the policy term (`grpo_loss(..., sampler_weights=rho)`).
    """
    if old_logps.shape != sampler_logps.shape or old_logps.shape != mask.shape:
        raise ValueError(f"old_logps {tuple(old_logps.shape)}, sampler_logps {tuple(sampler_logps.shape)} and mask "
                         f"{tuple(mask.shape)} must all be (B, T)")  # fmt: skip
    with torch.no_grad():
        # where, not a product: the sampler may report NaN/-inf on padding, and NaN * 0 is NaN.
        d = torch.where(mask.bool(), old_logps - sampler_logps, torch.zeros_like(old_logps))  # (B, T) d_t
        if mode.startswith("sequence"):
            d = d.sum(dim=-1, keepdim=True)  # (B, 1) SUM_t d_t
        rho = torch.exp(d)  # rho = exp(d)
        if mode.endswith("_truncate"):
            rho = torch.clamp(rho, max=cap)  # truncated importance sampling: min(rho, C)
        else:
            rho = rho.masked_fill(rho > cap, 0.0)  # masked importance sampling: 0 above C
    return rho


def grpo_loss(logps, old_logps, ref_logps, advantages, mask, *, loss_type: str, epsilon: float, epsilon_high: float, delta,
              beta: float, importance_sampling_level: str, normaliser, sampler_weights=None):  # fmt: skip
    """Clipped GRPO / GSPO loss on one micro-batch. Returns (loss, metrics).

    logps, old_logps, ref_logps, mask: (B, T) completion-token log-probs (old: the sampling policy's; ref: read
        when beta > 0) and the 0/1 loss mask. advantages: (B,). importance_sampling_level: token = GRPO, sequence = GSPO.
    loss: grpo SUM_i [SUM_t M L / max(SUM_t M, 1)] / normaliser (each sequence's token mean); others SUM M L / normaliser.
    normaliser: a count of the whole optimizer step, all micro-batches and ranks (`step_normalisers`); TRL's on one
        micro-batch in one process: B (grpo), max(SUM M, 1) (bnpo), B * max_completion_length (dr_grpo), SUM M (dapo).
        0 (dapo, every token masked) leaves the sum, 0, undivided.
    sampler_weights: optional (B, T) or (B, 1) rho from `sampler_correction`; scales the policy term only.
    Metrics (detached 0-dim): clip_ratio/{low,high,region}_mean, and kl when beta > 0.
    """
    check_token_inputs(logps, old_logps, advantages, mask)
    if beta > 0 and ref_logps.shape != logps.shape:
        raise ValueError(f"ref_logps {tuple(ref_logps.shape)} must match logps {tuple(logps.shape)}")
    if sampler_weights is not None and sampler_weights.shape not in (logps.shape, logps.shape[:1] + (1,)):
        raise ValueError(f"sampler_weights {tuple(sampler_weights.shape)} must be (B, T) or (B, 1)")

    counted = mask.bool()
    mask = mask.to(logps.dtype)
    zeros = torch.zeros_like(logps)
    # Padding may hold anything (-inf included); torch.where gives those positions an exact 0
    # gradient without ever evaluating exp() on them.
    logps = torch.where(counted, logps, zeros)
    old_logps = torch.where(counted, old_logps, zeros)
    log_ratio = logps - old_logps  # (B, T) l_t - l_old_t
    lengths = mask.sum(dim=-1)  # (B,) SUM_t M
    if importance_sampling_level == "token":
        log_w = log_ratio  # (B, T) GRPO: log w_t = l_t - l_old_t
    else:
        # GSPO eq. 7: length-normalised sequence log-ratio, broadcast to every token, gradient kept.
        log_w = ((log_ratio * mask).sum(dim=-1) / lengths.clamp(min=1)).unsqueeze(-1)  # (B, 1)
    w = torch.exp(log_w)  # (B, T) or (B, 1)
    A = advantages.unsqueeze(-1)  # (B, 1)
    per_token_loss = clipped_surrogate(w, A, epsilon, epsilon_high, delta).expand_as(logps)  # (B, T)
    if sampler_weights is not None:
        per_token_loss = per_token_loss * sampler_weights.detach()  # policy term * rho, not the KL

    metrics = {}
    if beta > 0:
        ref_logps = torch.where(counted, ref_logps, zeros)
        ref_diff = ref_logps - logps  # (B, T) l_ref - l
        kl = torch.exp(ref_diff) - ref_diff - 1  # (B, T) k3: exp(l_ref - l) - (l_ref - l) - 1
        per_token_loss = per_token_loss + beta * kl  # L_t += beta * KL_t
        metrics["kl"] = ((kl * mask).sum() / mask.sum().clamp(min=1)).detach()

    masked_loss = per_token_loss * mask  # (B, T) M L
    if loss_type == "grpo":
        summed = (masked_loss.sum(dim=-1) / lengths.clamp(min=1)).sum()  # SUM_i [SUM_t M L / max(SUM_t M, 1)]
    else:
        summed = masked_loss.sum()  # SUM M L
    loss = summed / normaliser if float(normaliser) > 0 else summed

    # TRL measures clipping on the delta-capped ratio; the same unless delta < 1 + eps_high.
    w_capped = (w if delta is None else torch.clamp(w, max=delta)).detach()
    # GSPO has one ratio per sequence: each sequence with a counted token counts once.
    weights = mask if importance_sampling_level == "token" else (lengths > 0).to(mask.dtype).unsqueeze(-1)  # (B, T) or (B, 1)
    metrics.update(clip_fractions(w_capped, A, weights, epsilon, epsilon_high))
    return loss, metrics


# ----- The algorithm module train.py drives (--algo grpo / --algo gspo). prepare() is one generation round
# (rl.generation_round), repeated num_iterations times.

DATA_FORMAT = "rl"


def needs_reference(cfg) -> bool:
    return cfg.beta > 0


def advantages(all_rewards, rollouts, micro: list[MicroBatch], run) -> tuple[torch.Tensor, dict]:
    """This rank's group-relative advantages (groups never straddle ranks) and the round's statistics."""
    cfg = run.cfg
    A = group_advantages(all_rewards.cpu(), cfg.num_generations, cfg.scale_rewards)  # (N_global,)
    return rank_rows(A, run), group_statistics(all_rewards, micro, cfg.num_generations)


def step_normalisers(micro: list[MicroBatch], run) -> list[float]:
    """Each micro-batch's `grpo_loss` normaliser: the count of its whole optimizer step, all ranks.

    grpo: sequences; dr_grpo: sequences x max_completion_length; dapo: counted tokens. bnpo is TRL's
    token mean of each micro-batch on its own, averaged over the step's micro-batches and ranks:
    its own tokens x grad_accum_steps x world_size.
    """
    cfg = run.cfg
    masks = [m.batch.mask for m in micro]
    if cfg.loss_type == "bnpo":
        return [max(float(mask.sum()), 1.0) * cfg.grad_accum_steps * run.world_size for mask in masks]
    counts = [float(mask.sum()) if cfg.loss_type == "dapo" else float(mask.shape[0]) for mask in masks]
    totals = per_step_totals(counts, cfg.grad_accum_steps, run.device)
    return [t * cfg.max_completion_length for t in totals] if cfg.loss_type == "dr_grpo" else totals


def prepare(samples: list[dict], run) -> tuple[list[MicroBatch], dict]:
    cfg = run.cfg
    micro, metrics = generation_round(samples, run, advantages=advantages, normalisers=step_normalisers,
                                      keep_old_logps=keeps_old_logps(cfg), temperature=cfg.temperature,
                                      compare_sampler=True)  # fmt: skip
    logp_diffs = []
    for m in micro:
        if m.sampler_logps is not None and cfg.vllm_is_correction != "none":  # vLLM's rollouts: correct for it
            m.sampler_weights = sampler_correction(m.old_logps, m.sampler_logps, m.batch.mask, mode=cfg.vllm_is_correction,
                                                   cap=cfg.vllm_is_cap)  # fmt: skip
            logp_diffs.append(masked_mean((m.old_logps - m.sampler_logps).abs(), m.batch.mask))  # trainer vs sampler
    if logp_diffs:
        metrics["vllm/logp_abs_diff"] = sum(logp_diffs) / len(logp_diffs)
    return micro * cfg.num_iterations, metrics


def loss(micro: MicroBatch, run) -> tuple[torch.Tensor, dict]:
    cfg = run.cfg
    logps, old_logps, entropy = policy_logps(micro, run)
    value, metrics = grpo_loss(logps, old_logps, micro.ref_logps, micro.advantages, micro.batch.mask, loss_type=cfg.loss_type,
                               epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, delta=cfg.delta, beta=cfg.beta,
                               importance_sampling_level=cfg.importance_sampling_level, normaliser=micro.normaliser,
                               sampler_weights=micro.sampler_weights)  # fmt: skip
    return value, {**{k: float(v) for k, v in metrics.items()}, "entropy": entropy}
