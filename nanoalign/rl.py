"""What GRPO / GSPO, RLOO and Online DPO share: one generation round, reward statistics, the clipped ratio.

`generation_round` (called by each RL module's `prepare`) turns a round's prompts into MicroBatches:

    samples --run.rollouts.sample--> Rollouts (token ids as sampled)    rollout.py: the backends
            --score_rollouts------> (N, K) weighted rewards, gathered over ranks (rewards.py)
            --completion_batch----> training rows, mask = completion (batch.pack_rows)
            --token_logps---------> old (sampling-time) and reference log-probs, where needed
            --advantages----------> the method's: grpo.group_advantages, rloo.rloo_advantages,
                                    online_dpo.select_pairs (+1 chosen, -1 rejected)
            --normalisers---------> each micro-batch's loss normaliser, a count of its optimizer step

A round holds max(steps_per_generation, grad_accum_steps) micro-batches of batch_size rows, so an
optimizer step never waits on a second round.
"""

from dataclasses import dataclass

import torch
from torch.distributed.fsdp import FSDPModule

from nanoalign.batch import Batch, image_token_ids, pack_rows
from nanoalign.metrics import sample_table
from nanoalign.rollout import Rollout
from nanoalign.rewards import score_completions
from nanoalign.runtime import agree_on_failure, all_gather_rows, all_reduce_sum

STD_EPS = 1e-4  # added to the std before dividing, as TRL does
NOT_REWARD_COLUMNS = ("prompt", "images", "sample_id", "index", "split")


# ----- Rewards -> group statistics


def combine_rewards(rewards: torch.Tensor) -> torch.Tensor:
    """(N,) or (N, K) weighted rewards -> (N,) nansum over functions; NaN only where every function was NaN
    (so callers can tell "unscorable" from 0)."""
    if rewards.dim() == 1:
        return rewards
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (N,) or (N, K), got shape {tuple(rewards.shape)}")
    all_nan = torch.isnan(rewards).all(dim=1)  # (N,)
    total = torch.nansum(rewards, dim=1)  # (N,) R_i = SUM_k w_k r_ik
    return torch.where(all_nan, torch.full_like(total, float("nan")), total)


def nan_std(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Std (ddof=1) over the non-NaN entries along dim (kept). 0, not NaN, where fewer than 2 exist:
    dividing their centred value by (0 + 1e-4) then gives an exact 0 advantage."""
    valid = ~torch.isnan(x)
    count = valid.sum(dim=dim, keepdim=True)
    mean = torch.nansum(x, dim=dim, keepdim=True) / count.clamp(min=1)
    sq = torch.where(valid, (x - mean) ** 2, torch.zeros_like(x))
    var = sq.sum(dim=dim, keepdim=True) / (count - 1).clamp(min=1)
    return torch.where(count >= 2, var.sqrt(), torch.zeros_like(var))


def constant_groups(grouped: torch.Tensor) -> torch.Tensor:
    """(P, G) rewards -> (P,) True where the scorable rewards are all equal (or fewer than 2 exist).
    Such a group carries no signal and gets advantages of exactly 0: computed, R - mean(R) is rounding
    noise (8 x 1.2 in float32: std 1.3e-7) that the std division and Adam would turn into a full step."""
    valid = ~torch.isnan(grouped)
    highest = torch.where(valid, grouped, float("-inf")).amax(dim=1)
    lowest = torch.where(valid, grouped, float("inf")).amin(dim=1)
    return (highest == lowest) | (valid.sum(dim=1) < 2)


# ----- Ratios and the clipped surrogate (GRPO / GSPO and RLOO)


def clipped_surrogate(ratio, advantages, epsilon: float, epsilon_high: float, delta=None) -> torch.Tensor:
    """-min(w A, clamp(w, 1-eps, 1+eps_high) A), elementwise (broadcast). delta (INTELLECT-2) caps only
    the unclipped branch, as TRL does: it bounds a very off-policy token with A < 0, which PPO clipping does not."""
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)  # w2 = clamp(w, 1-eps, 1+eps_high)
    if delta is not None:
        ratio = torch.clamp(ratio, max=delta)  # w = min(w, delta)
    return -torch.min(ratio * advantages, clipped * advantages)  # L = -min(w A, w2 A)


def clip_fractions(ratio, advantages, weights, epsilon: float, epsilon_high: float) -> dict:
    """Weighted fraction of entries whose clipped branch is active (no gradient); weights 1 where an entry counts."""
    low = ((ratio < 1 - epsilon) & (advantages < 0)).to(weights.dtype)
    high = ((ratio > 1 + epsilon_high) & (advantages > 0)).to(weights.dtype)
    region = torch.clamp(low + high, max=1.0)  # low and high are disjoint; clamp only guards the invariant
    weights = torch.broadcast_to(weights, low.shape)
    denom = weights.sum().clamp(min=1)
    fractions = {"low": low, "high": high, "region": region}
    return {f"clip_ratio/{k}_mean": ((x * weights).sum() / denom).detach() for k, x in fractions.items()}


def check_token_inputs(logps, old_logps, advantages, mask) -> None:
    """(B, T) log-probs and mask, (B,) advantages (grpo_loss, rloo_loss)."""
    if logps.dim() != 2 or old_logps.shape != logps.shape or mask.shape != logps.shape:
        raise ValueError(f"logps {tuple(logps.shape)}, old_logps {tuple(old_logps.shape)} and mask {tuple(mask.shape)} must all be (B, T)")
    if advantages.shape != logps.shape[:1]:
        raise ValueError(f"advantages {tuple(advantages.shape)} must be (B,) with B={logps.shape[0]}")


# ----- One generation round: sample, score, batch


def micro_batches_per_round(cfg) -> int:
    """At least one optimizer step's worth: a step never waits on a second round (check_config: they divide)."""
    return max(cfg.steps_per_generation, cfg.grad_accum_steps)


def samples_per_round(cfg) -> int:
    """Prompts each rank draws per round: batch_size x micro_batches_per_round rows / G."""
    return cfg.batch_size * micro_batches_per_round(cfg) // cfg.num_generations


def keeps_old_logps(cfg) -> bool:
    """Old log-probs must be stored when the policy moves between sampling and a micro-batch's loss."""
    return cfg.num_iterations > 1 or cfg.steps_per_generation > cfg.grad_accum_steps


def rollout_chunks(samples: list[dict], run, num_generations: int) -> list[Rollout]:
    """G completions per prompt from the run's backend, one Rollout per micro-batch: each chunk holds whole
    groups (batch_size / G prompts), so a micro-batch's rows share one processor batch and its images."""
    cfg = run.cfg
    prompts_per_chunk = cfg.batch_size // num_generations
    chunks = [samples[i : i + prompts_per_chunk] for i in range(0, len(samples), prompts_per_chunk)]
    return run.rollouts.sample(chunks, num_generations, max_tokens=cfg.max_completion_length, temperature=cfg.temperature, top_p=cfg.top_p)


def score_rollouts(rollouts: list[Rollout], samples: list[dict], run, num_generations: int) -> tuple[torch.Tensor, dict]:
    """(N, K) weighted rewards (NaN = unscorable) for this rank's completions, and reward metrics.

    Reward functions get the completions, the samples' other columns (e.g. `solution`) repeated G times,
    and the prompts. A function that raises stops every rank with its message.
    """
    texts = [t for r in rollouts for t in r.texts]
    columns = {k: [s[k] for s in samples for _ in range(num_generations)] for k in samples[0] if k not in NOT_REWARD_COLUMNS}
    columns["prompts"] = [s["prompt"] for s in samples for _ in range(num_generations)]
    error, rewards, metrics = None, None, {}
    try:
        sample_ids = [i for r in rollouts for i in r.sample_ids] or None
        rewards, metrics = score_completions(run.reward_funcs, list(run.cfg.reward_weights), texts, columns, sample_ids)
    except (RuntimeError, ValueError) as err:
        error = err
    agree_on_failure(error, run.device)
    rows = [s for s in samples for _ in range(num_generations)]
    run.tables["train/rollouts"] = sample_table(rows, completion=texts, reward=combine_rewards(rewards).tolist())
    return rewards.to(run.device), metrics


def completion_batch(rollout: Rollout, run, mask_truncated: bool) -> Batch:
    """Training rows prompt + sampled completion, the loss mask on the completion. With mask_truncated
    (--mask-truncated-completions, as TRL's) a completion without EOS gets an all-zero mask."""
    image_ids = image_token_ids(run.processor)
    completions, masks, num_image_tokens = [], [], 0
    for ids, eos in zip(rollout.completion_ids, rollout.has_eos):
        # A (weak) policy can sample an image placeholder token; as input it would ask the model for
        # image features that do not exist. Cut the completion before it and train nothing on it.
        cut = next((i for i, tok in enumerate(ids) if tok in image_ids), None)
        if cut is not None:
            num_image_tokens += 1
            completions.append(ids[:cut])
            masks.append([0] * cut)
        else:
            completions.append(ids)
            masks.append([0 if (mask_truncated and not eos) else 1] * len(ids))
    sample_ids = rollout.sample_ids or [f"completion {i}" for i in range(len(masks))]
    batch = pack_rows(run.processor, rollout.prompt_enc, completions, masks, sample_ids, run.cfg.max_length, run.pad_id)
    batch.num_skipped += num_image_tokens
    batch.shared_prompts = rollout.shared_prompts
    return batch.to(run.device)


def completion_values(batch: Batch, rollout: Rollout, values: list[list[float]]) -> torch.Tensor:
    """Per-completion-token values (e.g. vLLM's log-probs) laid out like the batch's rows: (B, T)."""
    out = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
    prompt_lengths = rollout.prompt_enc["attention_mask"].sum(1).tolist()
    for row, (start, row_values) in enumerate(zip(prompt_lengths, values)):
        row_values = row_values[: max(0, out.shape[1] - start)]  # the row may have been cut at max_length
        out[row, start : start + len(row_values)] = torch.tensor(row_values)
    return out.to(batch.input_ids.device)


def per_step_totals(values: list[float], grad_accum_steps: int, device) -> list[float]:
    """One number per micro-batch (the same count on every rank) -> for each, the sum over its optimizer
    step (grad_accum_steps consecutive micro-batches) on every rank: a loss normaliser for the whole step."""
    totals = all_reduce_sum(values, device)
    steps = [sum(totals[i : i + grad_accum_steps]) for i in range(0, len(totals), grad_accum_steps)]
    return [steps[i // grad_accum_steps] for i in range(len(totals))]


@torch.no_grad()
def token_logps(policy, batch: Batch, temperature: float = 1.0) -> torch.Tensor:
    """(B, T) per-token log-probs without gradient: old (sampling-time) or reference log-probs."""
    logps = policy(**batch.model_inputs(), temperature=temperature, logps_mask=batch.mask)[0]
    # The FSDP root keeps its weights gathered after a forward for the backward that follows; none
    # follows here, so free them (embedding + lm_head: 1.2 GB in fp32 at Qwen2.5-VL-3B's widths,
    # else held until the next forward, and for the frozen reference for good).
    if isinstance(policy, FSDPModule):
        policy.reshard()
    return logps


@dataclass
class MicroBatch:
    batch: Batch  # prompt + completion rows (prompt-major, G per prompt); mask = completion tokens
    old_logps: torch.Tensor | None  # (B, T) sampling-time log-probs; None = the current policy's, detached
    ref_logps: torch.Tensor | None  # (B, T) the frozen reference's, when the method loads one
    sampler_logps: torch.Tensor | None  # (B, T) the sampler's own (vLLM), when the method compares them
    advantages: torch.Tensor | None = None  # (B,) from the method's advantage function
    normaliser: float = 0.0  # what its summed loss is divided by: a count of its whole optimizer step
    sampler_weights: torch.Tensor | None = None  # (B, T) or (B, 1) importance-sampling correction (GRPO)


def rank_rows(values: torch.Tensor, run) -> torch.Tensor:
    """This rank's rows of values gathered from every rank in rank order (all_gather_rows)."""
    n = values.shape[0] // run.world_size
    return values[run.rank * n : (run.rank + 1) * n]


def group_statistics(all_rewards: torch.Tensor, micro: list[MicroBatch], num_generations: int) -> dict:
    """Reward statistics over every rank's groups, and this rank's cut rows (GRPO/GSPO, RLOO)."""
    total = combine_rewards(all_rewards).view(-1, num_generations)  # (P_global, G)
    return {
        "skipped_rows": sum(m.batch.num_skipped for m in micro),  # completions that sampled an image token
        "truncated_rows": sum(m.batch.num_truncated for m in micro),  # rows cut at --max-length
        "reward": float(torch.nanmean(total)),
        "reward_std": float(nan_std(total, dim=1).mean()),  # mean over groups of the group std, as TRL logs it
        "frac_reward_zero_std": float(constant_groups(total).float().mean()),  # groups without signal
    }


def generation_round(samples, run, *, advantages, normalisers, keep_old_logps: bool, temperature: float,
                     compare_sampler: bool = False) -> tuple[list[MicroBatch], dict]:  # fmt: skip
    """One generation round: this rank's micro-batches, ready for the method's loss.

    advantages(all_rewards, rollouts, micro, run) -> (this rank's (N,) advantages, metrics); all_rewards: every
        rank's (N * world_size, K) weighted rewards. normalisers(micro, run) -> a loss normaliser per micro-batch.
    keep_old_logps: store the sampling policy's log-probs (at `temperature`, the loss's, as the reference's);
        compare_sampler: also for rollouts with the sampler's own (vLLM), laid out as sampler_logps.
    """
    cfg = run.cfg
    rollouts = rollout_chunks(samples, run, cfg.num_generations)
    rewards, metrics = score_rollouts(rollouts, samples, run, cfg.num_generations)
    all_rewards = all_gather_rows(rewards)  # (N_global, K): batch statistics see every rank
    lengths, eos = [len(ids) for r in rollouts for ids in r.completion_ids], [e for r in rollouts for e in r.has_eos]
    metrics.update({"completions/mean_length": sum(lengths) / len(lengths), "completions/clipped_ratio": 1 - sum(eos) / len(eos)})
    micro = []
    for rollout in rollouts:
        batch = completion_batch(rollout, run, cfg.mask_truncated_completions)
        from_sampler = compare_sampler and rollout.sampler_logps is not None
        old_logps = token_logps(run.policy, batch, temperature) if keep_old_logps or from_sampler else None
        ref_logps = token_logps(run.ref_policy, batch, temperature) if run.ref_policy is not None else None
        sampler_logps = completion_values(batch, rollout, rollout.sampler_logps) if from_sampler else None
        micro.append(MicroBatch(batch, old_logps, ref_logps, sampler_logps))
    mine, advantage_metrics = advantages(all_rewards, rollouts, micro, run)  # (N,)
    metrics.update(advantage_metrics)
    for m, adv in zip(micro, mine.to(run.device).split(cfg.batch_size)):
        m.advantages = adv
    for m, normaliser in zip(micro, normalisers(micro, run)):
        m.normaliser = normaliser
    return micro, metrics


def policy_logps(micro: MicroBatch, run) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The policy's (B, T) log-probs at the sampling temperature (with gradient), the old log-probs
    (when not kept: the current ones detached, ratio 1 with the gradient kept), and the mean entropy."""
    mask = micro.batch.mask
    logps, entropy = run.policy(**micro.batch.model_inputs(), temperature=run.cfg.temperature, with_entropy=True, logps_mask=mask)
    old_logps = micro.old_logps if micro.old_logps is not None else logps.detach()
    return logps, old_logps, masked_mean(entropy, mask)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    return float((values * mask).sum() / mask.sum().clamp(min=1))
