"""Process group (NCCL on GPUs, gloo on CPUs), collectives, and the handles every algorithm module gets (`Run`).
Without torchrun a one-process group is started, so FSDP2 and every collective behave identically.
"""

import math
import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from nanoalign.config import Config

# How long a collective may wait before the group gives up. NCCL's default (10 minutes) is shorter
# than rank 0's hub download of a 7B checkpoint (train.py's resolve_model), during which every other
# rank waits in a collective; an hour covers it (accelerate's default is 30 minutes, verl's 10).
COLLECTIVE_TIMEOUT = timedelta(hours=1)


def init_distributed() -> tuple[int, int, torch.device]:
    """Join (or create) the default process group. Returns (rank, world_size, device).

    On GPUs the device is chosen first and handed to the group (`device_id`), as torchtitan does:
    NCCL then binds each rank's communicator to its own GPU at once, instead of every rank creating
    a context on GPU 0 first and guessing the device at the first collective.
    """
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs = {"timeout": COLLECTIVE_TIMEOUT, "device_id": device if device.type == "cuda" else None}
        if "RANK" in os.environ:  # launched by torchrun: it set RANK, WORLD_SIZE, MASTER_ADDR/PORT
            dist.init_process_group(backend, **kwargs)
        else:  # a single process: an in-memory store is all a world of one needs
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    return dist.get_rank(), dist.get_world_size(), device


def end_distributed() -> None:
    """Every rank leaves together, then the process group ends: the last call of a torchrun script.

    A rank that exits right after a collective can abort at interpreter exit ("terminate called without an
    active exception"): gloo's worker thread still holds that collective's tensors and needs the GIL to
    release them, which finalisation no longer gives. Waiting in the barrier hands the worker the GIL first.
    """
    dist.barrier()
    dist.destroy_process_group()


def device_mesh(world_size: int, device: torch.device):
    return init_device_mesh(device.type, (world_size,))


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum a few numbers over ranks in one collective."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows (same shape on every rank) in rank order."""
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def mean_over_ranks(metrics: dict[str, float], device, counts=()) -> dict[str, float]:
    """Average each metric over the ranks that measured it (same keys on every rank; `counts` are summed). NaN means
    "nothing to measure here" (online DPO with every pair skipped): that rank is left out of the mean."""
    keys = sorted(metrics)
    values = [float(metrics[k]) for k in keys]
    measured = [0.0 if math.isnan(v) else 1.0 for v in values]
    sums = all_reduce_sum([v if m else 0.0 for v, m in zip(values, measured)] + measured, device)
    totals, nums = sums[: len(keys)], sums[len(keys) :]
    return {k: total if k in counts else total / num if num else float("nan") for k, total, num in zip(keys, totals, nums)}


@dataclass
class Run:
    """What an algorithm module needs from the loop: config, model handles, where it runs."""

    cfg: Config
    processor: object
    policy: torch.nn.Module  # the FSDP2-sharded nanoalign.model.Policy being trained
    ref_policy: torch.nn.Module | None  # frozen, sharded the same way; None when the algorithm needs none
    rank: int
    world_size: int
    device: torch.device
    stop_ids: set[int]  # token ids that end an assistant turn (EOS of the tokenizer and generation config)
    pad_id: int
    step: int = 0  # optimizer steps done so far (the loop keeps it current)
    train_data: object = None  # map-style datasets of raw rows (nanoalign/data.py)
    eval_data: object = None
    reward_funcs: list = field(default_factory=list)  # loaded once from cfg.reward_funcs (RL algorithms)
    ref_logps_table: dict = field(default_factory=dict)  # split -> (N, 2) reference sums (--precompute-ref-logps)
    rollouts: object = None  # the rollout backend (nanoalign/rollout.py): sample(...), sync(step), close()
    tables: dict = field(default_factory=dict)  # name -> rows (metrics.sample_table) the next logged step sends
    check_sample: object = None  # check_sample(sample) raises BadSampleError if it cannot fit (batch.check_prompt_fits)


class OtherRankFailed(RuntimeError):
    """Raised on the ranks that did not fail themselves, so every rank stops together."""


def agree_on_failure(error: Exception | None, device) -> None:
    """Collective: if any rank caught an error, every rank raises (the failing one its own). Call it where ranks may
    fail independently, before the next collective, so one failing rank never leaves the others waiting."""
    (num_failed,) = all_reduce_sum([1.0 if error is not None else 0.0], device)
    if num_failed:
        error = error or OtherRankFailed(f"{int(num_failed)} other rank(s) failed; their error is printed above")
        # Marked: every rank stops here together, so the loop may still run collectives (save) before re-raising.
        error.raised_on_every_rank = True
        raise error


def on_every_rank(fn, device):
    """fn() on every rank, agreeing on failure (agree_on_failure); fn itself must run no collective."""
    error = result = None
    try:
        result = fn()
    except Exception as err:  # handed to agree_on_failure, which re-raises it on this rank
        error = err
    agree_on_failure(error, device)
    return result
