"""Supervised fine-tuning: maximise the likelihood of the assistant turns.

    L = - SUM_{rows, t} M_t l_t  /  N          l_t = log p(token_t | tokens_<t, images)

M_t = 1 on assistant tokens only (batch.py) and N = the counted tokens of the whole optimizer step, every
micro-batch on every rank, so accumulation and data parallelism give exactly the gradient of one big batch.
Differences from TRL: TRL's VLM SFT trains on image tokens and refuses assistant-only loss for VLMs.
"""

from dataclasses import dataclass

import torch

from nanoalign.batch import Batch, encode_conversations
from nanoalign.data import BadSampleError
from nanoalign.packing import budget_slices
from nanoalign.runtime import Run, agree_on_failure, all_reduce_sum

DATA_FORMAT = "sft"


def sft_loss(logps: torch.Tensor, mask: torch.Tensor, num_tokens: float) -> tuple[torch.Tensor, dict]:
    """Summed NLL of the counted tokens / `num_tokens` (the step's). logps, mask: (B, T). Returns (loss, metrics), metrics
    "nll_sum" and "num_tokens" of this micro-batch (exact token means over any set of micro-batches)."""
    nll_sum = -(logps * mask).sum()
    return nll_sum / num_tokens, {"nll_sum": nll_sum.detach(), "num_tokens": mask.sum().detach()}


@dataclass
class MicroBatch:
    batch: Batch
    normaliser: float  # counted tokens over all micro-batches of the step, all ranks


def needs_reference(cfg) -> bool:
    return False


def samples_per_round(cfg) -> int:
    return cfg.batch_size * cfg.grad_accum_steps


def encode(samples: list[dict], run: Run) -> Batch:
    return encode_conversations(run.processor, [s["messages"] for s in samples], [s["images"] for s in samples],
                                [s["sample_id"] for s in samples], max_length=run.cfg.max_length, stop_ids=run.stop_ids)  # fmt: skip


def encode_batches(samples: list[dict], run: Run, slices: list[slice] | None = None) -> list[Batch]:
    """Samples -> batches of batch_size rows (or the given slices of samples). A bad sample on any rank
    stops every rank, with its name."""
    size = run.cfg.batch_size
    slices = slices or [slice(i, i + size) for i in range(0, len(samples), size)]
    error, batches = None, []
    try:
        batches = [encode(samples[s], run) for s in slices]
    except BadSampleError as err:
        error = err
    agree_on_failure(error, run.device)
    return batches


def prepare(samples: list[dict], run: Run) -> tuple[list[MicroBatch], dict]:
    """Encode one optimizer step's samples into grad_accum_steps micro-batches (or token-budget ones)."""
    slices = None
    if run.cfg.max_tokens_per_micro_batch:
        slices = budget_slices(samples, run, lambda s: [[n] for n in encode(s, run).attention_mask.sum(1).tolist()])
    batches = encode_batches(samples, run, slices)
    # One all-reduce per step gives every rank the global token count (the normaliser N above).
    (num_tokens,) = all_reduce_sum([sum(float(b.mask.sum()) for b in batches)], run.device)
    if num_tokens == 0:
        raise ValueError("no assistant token to train on in this step: every row was skipped or truncated away; "
                         "raise --max-length or check the data")  # fmt: skip
    stats = {"truncated_rows": sum(b.num_truncated for b in batches)}  # rows whose answer was cut at --max-length
    return [MicroBatch(b.to(run.device), num_tokens) for b in batches], stats


def loss(micro: MicroBatch, run: Run) -> tuple[torch.Tensor, dict]:
    logps, _ = run.policy(**micro.batch.model_inputs(), logps_mask=micro.batch.mask)
    value, stats = sft_loss(logps, micro.batch.mask, micro.normaliser)
    return value, {"num_tokens": float(stats["num_tokens"])}


@torch.no_grad()
def evaluate(samples: list[dict], run: Run) -> dict:
    """Token-mean NLL of the held-out assistant turns (this rank's share; train.py sums over ranks)."""
    nll_sum = num_tokens = 0.0
    for i in range(0, len(samples), run.cfg.batch_size):  # one batch at a time (every rank has as many)
        (batch,) = encode_batches(samples[i : i + run.cfg.batch_size], run)
        batch = batch.to(run.device)
        logps, _ = run.policy(**batch.model_inputs(), logps_mask=batch.mask)
        _, stats = sft_loss(logps, batch.mask, 1.0)
        nll_sum, num_tokens = nll_sum + float(stats["nll_sum"]), num_tokens + float(stats["num_tokens"])
    (nll_sum, num_tokens) = all_reduce_sum([nll_sum, num_tokens], run.device)
    if num_tokens == 0:  # NaN (null in metrics.jsonl), not a perfect 0.0
        if run.rank == 0:
            print(f"eval/loss is NaN: no held-out assistant token is left under --max-length {run.cfg.max_length} "
                  "(every eval row was cut before its answer); raise --max-length", flush=True)  # fmt: skip
        return {"eval/loss": float("nan")}
    return {"eval/loss": nll_sum / num_tokens}
