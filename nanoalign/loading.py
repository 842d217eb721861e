"""Checkpoints in and out of FSDP2 shards, with no full model copy on any rank but one tensor on rank 0.

Loading a 7B model the plain way (from_pretrained on every rank, then fully_shard) costs every rank a full
fp32 copy on the host: 8 ranks x 28 GB. Here, as in torchtitan:

  1. every rank builds the model with its parameters on the meta device and its buffers real (rotary
     inv_freq and the like, computed by the modules' own __init__, are not in checkpoints);
  2. the FSDP2 plan is applied (model.shard_policy) and each rank allocates only its shards (`to_empty`);
  3. rank 0 reads the safetensors files one tensor at a time (single file or sharded with an index json)
     and scatters each tensor's rows: rank r receives rows [r * c, (r + 1) * c), c = ceil(n / world_size),
     which is how FSDP2 cuts a parameter (torch.chunk on dim 0), so the rows land in the shard as is.

Names are mapped by transformers' own renaming rules (e.g. Qwen2.5-VL's "model.layers.*" ->
"model.language_model.layers.*"); a checkpoint they do not cover exactly (a fused-weight conversion, missing
weights, only .bin files) is loaded by rank 0 with from_pretrained, then scattered the same way.
Export (and weight sync to vLLM) is the reverse: a gather per tensor to rank 0 only (`gather_full`), which
writes its bytes into the safetensors file (header known up front from the shapes) and drops it.

Simplifications: tensors are read and written in fp32, as the trainer keeps them; one-dimensional FSDP
meshes only (Shard(0) on every parameter: what shard_policy produces).
"""

import contextlib
import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor, Shard

from nanoalign.lora import is_adapter, merged_weight

# safetensors' dtype names (https://huggingface.co/docs/safetensors: an 8-byte header length, a JSON header
# {name: {dtype, shape, data_offsets}}, then the raw little-endian bytes)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
MAX_SHARD_BYTES = 5 * 2**30  # exported safetensors files are cut at 5 GiB, with an index json


# --------------------------------------------------------------------------- building on meta


@contextlib.contextmanager
def meta_parameters():
    """Create every nn.Parameter on the meta device as it is registered (as accelerate's init_empty_weights),
    so each module's random init costs nothing; buffers (rotary inv_freq) are computed as from_pretrained does."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def empty_hf_model(model_dir: str, attn_implementation: str = "sdpa"):
    """The checkpoint's own *ForConditionalGeneration class (AutoModelForImageTextToText), fp32,
    parameters on meta, buffers real, tied weights tied, its generation config loaded; the text and
    vision towers both use `attn_implementation` (config.py: --attn-implementation)."""
    from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig

    config = AutoConfig.from_pretrained(model_dir)
    with meta_parameters():
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32, attn_implementation=attn_implementation)
    try:
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    except OSError:  # no generation_config.json: from_pretrained keeps the one derived from config
        pass
    return model


# --------------------------------------------------------------------------- reading safetensors


def read_header(path: Path) -> tuple[dict, int]:
    """(header without __metadata__, byte offset where the tensor data starts)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def read_tensor(f, entry: dict, data_start: int) -> torch.Tensor:
    """One tensor, by a plain read (a mmap's pages would count in this process's RSS until the file is closed)."""
    begin, end = entry["data_offsets"]
    out = torch.empty(entry["shape"], dtype=SAFETENSORS_DTYPES[entry["dtype"]])
    f.seek(data_start + begin)
    if end > begin and f.readinto(out.view(-1).view(torch.uint8).numpy()) != end - begin:
        raise ValueError(f"{f.name}: the file ends inside a tensor (truncated download?); delete it and fetch it again")
    return out


def snapshot_dir(model: str) -> Path:
    """`model` itself if a directory, else its hub snapshot (HF_HUB_OFFLINE=1 reads the cache only)."""
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, allow_patterns=["*.safetensors", "*.safetensors.index.json", "*.json"]))


def safetensors_files(root: Path) -> dict[str, tuple[Path, dict, int]]:
    """{checkpoint name: (file, header entry, data start)} over model.safetensors or the files an
    index json lists; {} when the checkpoint has no safetensors files."""
    index = root / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    entries = {}
    for name in files:
        if not (root / name).exists():
            return {}
        header, data_start = read_header(root / name)
        entries.update({key: (root / name, entry, data_start) for key, entry in header.items()})
    return entries


def checkpoint_to_model_names(hf_model, checkpoint_names) -> dict[str, str] | None:
    """{model state-dict name: checkpoint name} by transformers' own renaming rules (those from_pretrained and
    PEFT call; 5.x), or None when a rule is more than a renaming (a fused or split weight)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # a transformers without them: from_pretrained on rank 0 is always right
        return None

    conversions = get_model_conversion_mapping(hf_model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    model_names = hf_model.state_dict()  # only the names are used
    mapping = {}
    for key in checkpoint_names:
        name, converter = rename_source_key(key, renamings, converters, hf_model.base_model_prefix, model_names)
        if name not in model_names and key in model_names:
            name, converter = key, None  # already in the model's own naming
        if converter is not None:
            return None
        if name in model_names:
            mapping[name] = key
    return mapping


class CheckpointReader:
    """Rank 0's source of full fp32 tensors, read from the safetensors files one at a time."""

    def __init__(self, model_dir: str, hf_model):
        self.entries = safetensors_files(snapshot_dir(model_dir))
        self.mapping = checkpoint_to_model_names(hf_model, self.entries) if self.entries else None
        self.files = {}

    def find(self, names: list[str]) -> str | None:
        """The checkpoint name of a model tensor known by `names` (tied weights: any of them)."""
        return next((self.mapping[n] for n in names if self.mapping and n in self.mapping), None)

    def __call__(self, key: str) -> torch.Tensor:
        path, entry, data_start = self.entries[key]
        if path not in self.files:
            self.files[path] = open(path, "rb")
        return read_tensor(self.files[path], entry, data_start).float()

    def close(self):
        for f in self.files.values():
            f.close()


# --------------------------------------------------------------------------- scatter into shards


def _rows_per_rank(num_rows: int, world_size: int) -> int:
    return math.ceil(num_rows / world_size) if num_rows else 0


def scatter_rows(full: torch.Tensor | None, dst: DTensor) -> None:
    """Fill this rank's shard of `dst` (Shard(0)) from rank 0's full tensor. Collective. A scatter, not a
    broadcast: rank r receives only its c = ceil(n / W) rows (pieces padded to c rows: a scatter's have one size)."""
    assert tuple(dst.placements) == (Shard(0),), f"expected an FSDP2 Shard(0) parameter, got {dst.placements}"
    group = dst.device_mesh.get_group()
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    local = dst.to_local()  # (rows of this rank, ...): a view into FSDP2's sharded storage
    rows = _rows_per_rank(dst.shape[0], world_size)
    received = torch.empty((rows, *dst.shape[1:]), dtype=dst.dtype, device=local.device)
    pieces = None
    if rank == 0:
        full = full.to(local.device, dst.dtype)
        padded = full.new_zeros((rows * world_size, *dst.shape[1:])) if rows * world_size != dst.shape[0] else full
        if padded is not full:
            padded[: dst.shape[0]] = full
        pieces = list(padded.split(rows)) if rows else [received] * world_size
    dist.scatter(received, pieces, src=0, group=group)
    local.copy_(received[: local.shape[0]])


def unique_tensors(hf_model) -> list[tuple[list[str], torch.Tensor]]:
    """The model's state-dict tensors once each, with every name they go by (tied weights share one)."""
    groups: dict[int, tuple[list[str], torch.Tensor]] = {}
    for name, tensor in hf_model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), ([], tensor))[0].append(name)
    return list(groups.values())


def base_tensors(hf_model) -> list[tuple[list[str], torch.Tensor]]:
    """unique_tensors without LoRA adapters: what a Hugging Face checkpoint of the model holds."""
    return [(names, t) for names, t in unique_tensors(hf_model) if not is_adapter(names[0])]


@torch.no_grad()
def materialize(policy: nn.Module, device) -> None:
    """Allocate this rank's (uninitialised) shards of a meta-built, FSDP2-sharded model on `device`; buffers
    computed at init (rotary inv_freq, ...) are kept aside and put back, as to_empty replaces every tensor."""
    hf = getattr(policy, "hf", policy)
    buffers = {name: b.detach().clone() for name, b in hf.named_buffers()}
    policy.to_empty(device=device)
    for name, b in hf.named_buffers():
        b.copy_(buffers[name])


@torch.no_grad()
def load_hf_weights(policy: nn.Module, model_dir: str, device) -> None:
    """Allocate this rank's shards of a meta-built, FSDP2-sharded model and fill them from the
    checkpoint (rank 0 reads, every rank receives its rows). Every rank must call it."""
    hf = getattr(policy, "hf", policy)
    materialize(policy, device)
    tensors = base_tensors(hf)  # LoRA adapters are not in the checkpoint: lora.init_adapters fills them
    rank = dist.get_rank()
    reason, source = None, None
    if rank == 0:
        reader = CheckpointReader(model_dir, hf)
        keys = [reader.find(names) for names, _ in tensors]
        params = {id(p) for p in hf.parameters()}
        missing = [names[0] for (names, t), key in zip(tensors, keys) if key is None and id(t) in params]
        if not reader.entries:
            reason = "no safetensors files"
        elif reader.mapping is None:
            reason = "a weight conversion that is more than a renaming"
        elif missing:
            reason = f"{len(missing)} parameters not found under any name (e.g. {missing[:3]})"
        source = lambda i, names: reader(keys[i]) if keys[i] is not None else None  # noqa: E731
    decision = [reason]
    dist.broadcast_object_list(decision, src=0)  # every rank takes the same path (the same collectives)
    if decision[0] is not None and rank == 0:
        print(f"{model_dir}: {reason}; rank 0 loads it with from_pretrained instead (one model copy on rank 0)", flush=True)
        from transformers import AutoModelForImageTextToText

        state = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).state_dict()
        source = lambda i, names: state.pop(names[0], None)  # noqa: E731  (freed once scattered)
    for i, (names, dst) in enumerate(tensors):
        full = source(i, names) if rank == 0 else None
        if isinstance(dst, DTensor):
            scatter_rows(full, dst)
        else:  # a persistent buffer, replicated: rank 0's value (the checkpoint's, else the init one)
            if full is not None:
                dst.copy_(full)
            dist.broadcast(dst, 0)
    if rank == 0 and decision[0] is None:
        reader.close()


# --------------------------------------------------------------------------- gather to rank 0


def gather_full(tensor: torch.Tensor) -> torch.Tensor | None:
    """The whole tensor on CPU on rank 0 (None elsewhere). A gather, not an all-gather (full_tensor()): the
    other ranks never hold more than their shard. Collective for DTensors; a replicated tensor needs none."""
    if not isinstance(tensor, DTensor):
        return tensor.detach().cpu() if not dist.is_initialized() or dist.get_rank() == 0 else None
    assert tuple(tensor.placements) == (Shard(0),), f"expected an FSDP2 Shard(0) parameter, got {tensor.placements}"
    group = tensor.device_mesh.get_group()
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    local = tensor.to_local().detach()
    if world_size == 1:
        return local.cpu()  # the shard is the whole tensor (on CPU: no copy; callers only read it)
    rows = _rows_per_rank(tensor.shape[0], world_size)
    if local.shape[0] != rows:  # the last ranks' shorter pieces, padded: a gather's pieces have one size
        local = torch.cat([local, local.new_zeros((rows - local.shape[0], *local.shape[1:]))])
    out = None
    if rank == 0:  # the pieces are received straight into their rows of one buffer
        out = torch.empty((rows * world_size, *tensor.shape[1:]), dtype=tensor.dtype, device=local.device)
    if rows:
        dist.gather(local.contiguous(), list(out.split(rows)) if rank == 0 else None, dst=0, group=group)
    return out[: tensor.shape[0]].cpu() if rank == 0 else None


# --------------------------------------------------------------------------- writing a checkpoint


def model_to_checkpoint_names(hf_model, names: list[str]) -> dict[str, str] | None:
    """{model name: the name save_pretrained writes} (the renaming rules reversed), or None if one is more."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # a transformers without it: save_pretrained from rank 0's copy
        return None

    placeholders = {name: torch.empty(0) for name in names}
    reverted = revert_weight_conversion(hf_model, dict(placeholders))
    by_id = {id(t): saved for saved, t in reverted.items()}
    if len(reverted) != len(names) or any(id(t) not in by_id for t in placeholders.values()):
        return None
    return {name: by_id[id(t)] for name, t in placeholders.items()}


def plan_files(entries: list[tuple[str, torch.dtype, list[int]]], max_bytes: int) -> list[list[int]]:
    """Cut the tensors (in order) into files of at most max_bytes (a bigger tensor gets its own)."""
    files, size = [[]], 0
    for i, (_, dtype, shape) in enumerate(entries):
        nbytes = math.prod(shape) * dtype.itemsize
        if files[-1] and size + nbytes > max_bytes:
            files.append([])
            size = 0
        files[-1].append(i)
        size += nbytes
    return files


def safetensors_header(entries: list[tuple[str, torch.dtype, list[int]]]) -> bytes:
    """The 8-byte length + JSON header for tensors written back to back in this order."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the format recommends
    return len(text).to_bytes(8, "little") + text


def export_hf(policy: nn.Module, processor, out_dir, rank: int, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write a Hugging Face checkpoint (safetensors, configs, processor); every rank calls it, rank 0 writes."""
    hf = getattr(policy, "hf", policy)
    tensors = base_tensors(hf)  # with LoRA: the base's tensors, adapters merged in (below)
    saved_names = model_to_checkpoint_names(hf, [names[0] for names, _ in tensors])
    if saved_names is None:  # a conversion that is not a renaming: save_pretrained writes it, from rank 0's copy
        # collective: every rank, same order; LoRA adapters merged into their layer's weight
        state = {names[0]: merged_weight(hf, names[0], tensor, gather_full) for names, tensor in tensors}
        if rank == 0:
            hf.save_pretrained(out_dir, state_dict=state)
            processor.save_pretrained(out_dir)
        return
    entries = [(saved_names[names[0]], t.dtype, list(t.shape)) for names, t in tensors]
    files = plan_files(entries, max_shard_bytes)
    file_names = ["model.safetensors"] if len(files) == 1 else [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    out = Path(out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob("model*.safetensors*"):  # an earlier export's files would mix with these
            stale.unlink()
    for file_name, indices in zip(file_names, files):
        f = open(out / file_name, "wb") if rank == 0 else None
        if f is not None:
            f.write(safetensors_header([entries[i] for i in indices]))
        for i in indices:
            full = merged_weight(hf, tensors[i][0][0], tensors[i][1], gather_full)  # collective: every rank, same order
            if f is not None:
                f.write(full.contiguous().view(-1).view(torch.uint8).numpy())  # the tensor's own bytes, no copy
            del full
        if f is not None:
            f.close()
    if rank == 0:
        if len(files) > 1:
            weight_map = {entries[i][0]: name for name, indices in zip(file_names, files) for i in indices}
            total = sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in entries)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        hf.config.architectures = [type(hf).__name__]  # what save_pretrained records
        hf.config.save_pretrained(out)
        hf.generation_config.save_pretrained(out)
        processor.save_pretrained(out)

