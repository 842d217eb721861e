"""A gloo weight-transfer engine for vLLM, so a trainer can push weights into a vLLM server on CPUs.

vLLM's own engines are "nccl" and "ipc", neither of which runs without a GPU. At start-up every vLLM process
calls the `vllm.general_plugins` entry points; ours (`register`, see pyproject.toml) registers the class
below as backend "gloo" (`--weight-transfer-config '{"backend":"gloo"}'`, as `python -m nanoalign.serve`
passes on CPUs). This file runs INSIDE the server's workers; the trainer's half is `WeightSync`
(vllm_server.py). The protocol is the one vLLM's NCCL engine speaks, on gloo:

  init      the trainer (rank 0) opens a TCPStore and sends /init_weight_transfer_engine with its
            address; each vLLM worker joins a private gloo group as rank 1 + worker index.
  start     vLLM's layerwise-reload helpers prepare the model to receive checkpoint-format weights.
  update    /update_weights announces (names, dtypes, shapes); both sides cut it into the same buckets
            (`plan_buckets`), each one flat buffer broadcast from rank 0, split back here into HF-named
            tensors for the model's own `load_weights`.
  finish    vLLM's post-load processing (e.g. CPU weight repacking), and our repack of layers that share
            a weight (lm_head tied to embed_tokens), which vLLM's helpers skip (`refresh_tied_layers`).
A weight the served model cannot load does not stop the stream: the rest is received and dropped, the
old weights are put back, and /update_weights fails naming it, instead of a hung broadcast.

Simplifications: one receive posted ahead; every worker receives the whole model (its `load_weights` keeps
its tensor-parallel shard).
"""

import logging
from dataclasses import dataclass

import torch
from vllm.distributed.weight_transfer.base import WeightTransferEngine, WeightTransferInitInfo, WeightTransferUpdateInfo
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

from nanoalign.transfer import gloo_group, plan_buckets

BACKEND = "gloo"


@dataclass
class GlooInitInfo(WeightTransferInitInfo):
    """The body of /init_weight_transfer_engine, written by `WeightSync` on the trainer."""

    master_address: str  # the trainer's TCPStore, reachable from this server
    master_port: int
    rank_offset: int  # ranks before the first vLLM worker: 1 (the trainer)
    world_size: int  # trainer + every vLLM worker
    bucket_bytes: int  # both sides must cut buckets at the same places
    timeout_s: float  # a broadcast that waits longer fails instead of hanging


@dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    """The body of /update_weights: what will arrive, in order (the same fields as vLLM's NCCL engine)."""

    names: list[str]  # HF checkpoint names, e.g. model.language_model.layers.0.self_attn.q_proj.weight
    dtype_names: list[str]  # "float32", "bfloat16", ...
    shapes: list[list[int]]


class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo

    def __init__(self, config, vllm_config, device, model):
        super().__init__(config, vllm_config, device, model)
        self.group = None  # the gloo group with the trainer, once /init_weight_transfer_engine ran
        self.bucket_bytes = 0

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        # A unique rank per worker across data-parallel replicas, computed as vLLM's NCCL engine does.
        parallel = self.parallel_config
        rank = init_info.rank_offset + parallel.data_parallel_index * parallel.world_size + parallel.rank
        # A new trainer may connect after an old one went away: the old group is simply replaced.
        self.group = gloo_group(init_info.master_address, init_info.master_port, rank, init_info.world_size, init_info.timeout_s)
        self.bucket_bytes = init_info.bucket_bytes

    def start_weight_update(self) -> None:
        # Imported here, as vLLM's NCCL engine does: plugins load in every vLLM process, the loader runs in workers.
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("gloo weight transfer: /update_weights before /init_weight_transfer_engine")
        dtypes = [getattr(torch, name) for name in update_info.dtype_names]
        buckets = plan_buckets(update_info.dtype_names, update_info.shapes, self.bucket_bytes)

        def post(bucket: list[int]):  # allocate a bucket's flat buffer and post its (async) receive
            numel = sum(torch.Size(update_info.shapes[i]).numel() for i in bucket)
            flat = torch.empty(numel, dtype=dtypes[bucket[0]])  # (sum of numels,) one dtype per bucket
            return flat, self.group.broadcast(flat, 0)

        error = None  # the first bucket the model could not load
        pending = post(buckets[0]) if buckets else None
        for k, bucket in enumerate(buckets):
            flat, work = pending
            work.wait()  # gives up after the group's timeout (the trainer's --vllm-timeout)
            # Post the next receive before loading this bucket, so the trainer can send while we load.
            pending = post(buckets[k + 1]) if k + 1 < len(buckets) else None
            sizes = [torch.Size(update_info.shapes[i]).numel() for i in bucket]
            # A fresh buffer per bucket: layerwise reload keeps references to these views until
            # the layer they belong to is complete, so a reused buffer would be overwritten.
            named = [(update_info.names[i], t.view(update_info.shapes[i])) for i, t in zip(bucket, flat.split(sizes))]
            if error is not None:
                continue  # keep receiving: the trainer broadcasts every bucket whatever happens here
            try:
                self.model.load_weights(named)
            except Exception as err:  # noqa: BLE001 -- raising now would leave the trainer blocked in a broadcast
                error = (named, err)  # nobody receives: the rest is drained, then we raise below
        if error is not None:
            # Put back the layers that loaded nothing, so the server keeps serving its old weights;
            # after this raise vLLM ends the update itself (no /finish_weight_update needed).
            self.finish_weight_update()
            named, err = error
            tensors = ", ".join(f"{n} {tuple(t.shape)}" for n, t in named[:2]) + (", ..." if len(named) > 2 else "")
            raise ValueError(f"the served model ({self.model_config.model}) cannot load the trainer's weights [{tensors}]: "
                             f"{type(err).__name__}: {str(err)[:300]}. Serve the trainer's --model: python -m nanoalign.serve --model MODEL")  # fmt: skip

    def finish_weight_update(self) -> None:
        finish_reload(self.model, self.model_config, self.device)

    def shutdown(self) -> None:
        self.group = None  # dropping the last reference closes the gloo sockets


def loads_nothing_by_design(record: logging.LogRecord) -> bool:
    """Logging filter: False for vLLM's "<layer>: Failed to load weights" (at every sync, on every rank) about a
    layer that gets no weight by design: a rotary embedding and FusedMMInputNorm (the processor's mean/std)
    hold buffers computed at start; a tied lm_head gets its weight as the embedding's."""
    layer = str(record.args[0]) if isinstance(record.args, tuple) and record.args else ""
    by_design = layer.endswith("RotaryEmbedding") or layer in ("ParallelLMHead", "FusedMMInputNorm")
    return not (record.msg.endswith("Failed to load weights") and by_design)


def finish_reload(model: torch.nn.Module, model_config, device: torch.device) -> None:
    """vLLM's post-load processing after a weight sync (server and colocated), then on CPUs `refresh_tied_layers`."""
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

    reload_logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    reload_logger.addFilter(loads_nothing_by_design)
    try:
        finalize_layerwise_reload(model, model_config)
    finally:
        reload_logger.removeFilter(loads_nothing_by_design)
    if device.type == "cpu":
        refresh_tied_layers(model)


def refresh_tied_layers(model: torch.nn.Module) -> None:
    """Re-run post-load processing for layers that share a weight with an earlier layer. vLLM's layerwise reload
    processes a shared weight only for the layer that loaded it (embed_tokens); on CPUs a tied lm_head's matmul
    uses a kernel handle packed at load time, so it kept the OLD embedding (log-probs off by ~4). CPUs only,
    where processing an unquantized layer is a repack, safe to repeat."""
    seen: set[int] = set()
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        shared = any(id(p) in seen for p in params)
        seen.update(id(p) for p in params)
        quant_method = getattr(module, "quant_method", None)
        if shared and hasattr(quant_method, "process_weights_after_loading"):
            quant_method.process_weights_after_loading(module)


def register() -> None:
    """The `vllm.general_plugins` entry point: backend "gloo" in this vLLM process (a second call, e.g. two
    in-process engines, finds our own class registered)."""
    try:
        WeightTransferEngineFactory.register_engine(BACKEND, GlooWeightTransferEngine)
    except ValueError:  # already registered in this process
        pass
