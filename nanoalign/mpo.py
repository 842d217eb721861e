"""DPO and MPO: preference losses on per-sequence log-prob sums.

With r_c = logp_pi(chosen) - logp_ref(chosen) and r_r likewise (sums over completion tokens):

    sigmoid  (DPO):  L = -log sigma(beta (r_c - r_r))
    bco_pair (BCO):  L = -log sigma(beta r_c) - log sigma(-beta r_r)
    sft:             L = token-mean NLL of the chosen completions
    ipo:             L = ((r_c / |c| - r_r / |r|) - 1 / (2 beta))^2
    MPO:             loss = SUM_k w_k mean_batch(L_k),  e.g. ["sigmoid", "bco_pair", "sft"] x [0.8, 0.2, 1.0]

Papers:
    DPO https://arxiv.org/abs/2305.18290 (eq. 7)
    MPO https://arxiv.org/abs/2411.10442 (InternVL MPO, section 3.2: preference + quality + generation losses)
    BCO https://arxiv.org/abs/2404.04656 (binary classifier optimisation; pair form as in TRL)
    IPO https://arxiv.org/abs/2310.12036 (eq. 17)
The numbers follow Hugging Face TRL's DPOTrainer v1.9-v1.16 (README.md, "Differences from TRL").

Simplified / decided here:
    - pure functions on sequence log-prob sums; the caller runs the policy and the frozen reference, and
      passes the sft term (chosen_nll): only it has the per-token logits.
    - no label smoothing, no BCO running-mean reward shift (TRL dropped it in 0.29).
    - ipo divides each term by its own token count (TRL averages the log-probs of every term when "ipo" is
      requested); the reward metrics always use the sums.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanoalign.batch import Batch
from nanoalign.data import BadSampleError
from nanoalign.packing import budget_slices
from nanoalign.preference import completion_logps, encode_pairs, reference_logps
from nanoalign.runtime import agree_on_failure, all_reduce_sum, mean_over_ranks

LOSS_TYPES = ("sigmoid", "bco_pair", "sft", "ipo")  # Config.loss_types' Literal


def sigmoid_loss(chosen_logratios, rejected_logratios, beta: float) -> torch.Tensor:
    """DPO: -log sigma(beta (r_c - r_r)), per pair (B,)."""
    return -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))  # DPO eq. 7


def bco_pair_loss(chosen_logratios, rejected_logratios, beta: float) -> torch.Tensor:
    """BCO pair: chosen classified as good, rejected as bad, each on its own reward (B,)."""
    # Unlike sigmoid, this pins the absolute reward scale: r_c pushed > 0 and r_r < 0 separately.
    return -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)


def ipo_loss(chosen_logratios, rejected_logratios, beta: float, chosen_lengths, rejected_lengths) -> torch.Tensor:
    """IPO: squared distance of the length-normalised margin to 1/(2 beta), per pair (B,)."""
    # clamp: an empty completion has r = 0 (a sum over nothing), so 0/1 keeps it at 0 instead of NaN.
    margin = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
    return (margin - 1 / (2 * beta)) ** 2  # IPO eq. 17


def mpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_nll, beta: float,
             loss_types, loss_weights, *, chosen_lengths=None, rejected_lengths=None):  # fmt: skip
    """Weighted mix of preference losses: loss = SUM_k w_k mean_batch(L_k). Returns (loss, metrics).

    policy_* / ref_*: (B,) sums of completion-token log-probs (policy and frozen reference).
    chosen_nll: 0-dim token-mean NLL of the chosen completions, read by "sft".
    loss_types / loss_weights: names from LOSS_TYPES and one weight each (distinct, non-empty: check_config);
        DPO is ["sigmoid"], [1.0]. chosen_lengths / rejected_lengths: (B,) counted tokens, read by "ipo".
    Metrics (detached 0-dim): rewards/{chosen,rejected,accuracies,margins}, logps/{chosen,rejected}, and
    loss/<type> (unweighted batch mean of each term).
    """
    sums = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if policy_chosen_logps.dim() != 1 or any(x.shape != policy_chosen_logps.shape for x in sums):
        raise ValueError(f"policy/ref chosen/rejected logps must all be (B,) sums, got shapes {[tuple(x.shape) for x in sums]}")

    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,) r_c
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,) r_r
    per_type = {
        "sigmoid": lambda: sigmoid_loss(chosen_logratios, rejected_logratios, beta),
        "bco_pair": lambda: bco_pair_loss(chosen_logratios, rejected_logratios, beta),
        "sft": lambda: chosen_nll,  # the caller's token-mean NLL of the chosen completions
        "ipo": lambda: ipo_loss(chosen_logratios, rejected_logratios, beta, chosen_lengths, rejected_lengths),
    }

    metrics = {}
    loss = 0.0
    for loss_type, weight in zip(loss_types, loss_weights):
        term = per_type[loss_type]().mean()  # mean_batch(L_k); the sft scalar is its own mean
        loss = loss + weight * term  # loss = SUM_k w_k mean_batch(L_k)
        metrics[f"loss/{loss_type}"] = term.detach()

    chosen_rewards = (beta * chosen_logratios).detach()  # (B,) implicit reward beta r_c
    rejected_rewards = (beta * rejected_logratios).detach()  # (B,) beta r_r
    metrics["rewards/chosen"] = chosen_rewards.mean()
    metrics["rewards/rejected"] = rejected_rewards.mean()
    metrics["rewards/accuracies"] = (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean()
    metrics["rewards/margins"] = (chosen_rewards - rejected_rewards).mean()
    metrics["logps/chosen"] = policy_chosen_logps.detach().mean()
    metrics["logps/rejected"] = policy_rejected_logps.detach().mean()
    return loss, metrics


# ----- The algorithm module train.py drives (--algo dpo / --algo mpo). A micro-batch holds B pairs as 2B rows,
# [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}]: one forward scores both answers, each row with its images.

DATA_FORMAT = "preference"


@dataclass
class MicroBatch:
    batch: Batch  # 2B rows: B chosen, then the B rejected answers of the same prompts
    ref_logps: torch.Tensor  # (2B,) frozen reference's completion log-prob sums, same row order
    num_step_pairs: float  # pairs in the whole optimizer step, all ranks
    num_step_chosen_tokens: float  # counted chosen tokens in the whole optimizer step, all ranks


def needs_reference(cfg) -> bool:
    return not cfg.precompute_ref_logps  # precomputed: the table replaces the second model


def samples_per_round(cfg) -> int:
    return cfg.batch_size * cfg.grad_accum_steps


def prepare(samples: list[dict], run) -> tuple[list[MicroBatch], dict]:
    """Encode one optimizer step's pairs into micro-batches and score them with the reference."""
    size = run.cfg.batch_size
    slices = [slice(i, i + size) for i in range(0, len(samples), size)]
    if run.cfg.max_tokens_per_micro_batch:  # whole pairs: a sample's two rows, chosen and rejected
        slices = budget_slices(samples, run, lambda s: encode_pairs(s, run).attention_mask.sum(1).view(2, -1).T.tolist())
    error, batches = None, []
    try:
        batches = [encode_pairs(samples[s], run).to(run.device) for s in slices]
    except BadSampleError as err:
        error = err
    agree_on_failure(error, run.device)
    refs = [reference_logps(samples[s], b, run) for s, b in zip(slices, batches)]
    chosen_tokens = sum(float(b.mask.chunk(2)[0].sum()) for b in batches)
    num_pairs, num_chosen_tokens = all_reduce_sum([float(len(samples)), chosen_tokens], run.device)
    micro = [MicroBatch(b, r, num_pairs, num_chosen_tokens) for b, r in zip(batches, refs)]
    stats = {"truncated_rows": sum(b.num_truncated for b in batches)}  # rows whose answer was cut at --max-length
    return micro, stats


def loss(micro: MicroBatch, run) -> tuple[torch.Tensor, dict]:
    sums, logps = completion_logps(run.policy, micro.batch)
    chosen, rejected = sums.chunk(2)  # (B,) each
    ref_chosen, ref_rejected = micro.ref_logps.chunk(2)
    lengths = micro.batch.mask.sum(1).chunk(2)
    # Normalise by the whole step (all micro-batches, all ranks; FSDP sums gradients), as SFT does, so
    # accumulation and data parallelism give the big-batch gradient. mpo_loss averages the pair terms over this
    # micro-batch, so we scale its result by share = B / P_step; its sft term then needs
    # chosen_nll = (NLL sum / T_step) / share to come out as the step's token mean.
    share = chosen.shape[0] / micro.num_step_pairs
    nll_sum = -(logps.chunk(2)[0] * micro.batch.mask.chunk(2)[0]).sum()
    chosen_nll = nll_sum / micro.num_step_chosen_tokens / share
    value, metrics = mpo_loss(chosen, rejected, ref_chosen, ref_rejected, chosen_nll, run.cfg.beta, run.cfg.loss_types,
                              run.cfg.loss_weights, chosen_lengths=lengths[0], rejected_lengths=lengths[1])  # fmt: skip
    return value * share, {k: float(v) for k, v in metrics.items()}


@torch.no_grad()
def evaluate(samples: list[dict], run) -> dict:
    """Implicit-reward metrics on held-out pairs (rewards/accuracies is the headline)."""
    micro, _ = prepare(samples, run)  # one "step" over the held-out pairs
    totals: dict[str, float] = {}
    for m in micro:
        _, metrics = loss(m, run)
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + value / len(micro)
    return mean_over_ranks({f"eval/{k}": v for k, v in totals.items()}, run.device)
