"""What the trainer (vllm_server.py) and nanoalign's vLLM weight-transfer engine (vllm_engine.py, inside vLLM's
workers) share: the dtype weights travel in, how tensors are cut into buckets, and their private gloo group.
Hence it imports only torch.
"""

from datetime import timedelta

import torch
import torch.distributed as dist


def plan_buckets(dtype_names: list[str], shapes: list[list[int]], bucket_bytes: int) -> list[list[int]]:
    """Cut the announced tensors (indices, in order) into buckets of consecutive same-dtype tensors of at most
    bucket_bytes (a bigger one alone), each sent as one flat buffer; both sides cut at the same places."""
    buckets: list[list[int]] = []
    size = 0
    for i, (dtype_name, shape) in enumerate(zip(dtype_names, shapes)):
        nbytes = torch.Size(shape).numel() * getattr(torch, dtype_name).itemsize
        same_dtype = buckets and dtype_names[buckets[-1][0]] == dtype_name
        if same_dtype and size + nbytes <= bucket_bytes:
            buckets[-1].append(i)
            size += nbytes
        else:
            buckets.append([i])
            size = nbytes
    return buckets


def wire_dtype(param: torch.Tensor, engine_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a parameter is sent to an inference engine in: floating-point ones in the engine's
    dtype (None: their own), others (integer buffers registered as parameters) as they are."""
    return engine_dtype if engine_dtype is not None and param.is_floating_point() else param.dtype


def gloo_group(host: str, port: int, rank: int, world_size: int, timeout_s: float, store=None):
    """A gloo process group of its own (not the default group), rendezvousing at the TCPStore host:port."""
    timeout = timedelta(seconds=timeout_s)
    if store is None:
        store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    return dist.ProcessGroupGloo(store, rank, world_size, timeout)
