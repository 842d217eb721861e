"""LoRA (Hu et al. 2021, arXiv 2106.09685) for every algorithm: a frozen base, small trainable adapters.

An adapted linear layer computes

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T        A (r, in), B (out, r), r << min(in, out)

with W, b frozen. A starts as nn.Linear's own init (Kaiming uniform), B at zero, so before the first
update the adapted model IS the base model, to the last bit (`B A = 0`, and x A^T B^T adds exact zeros).
That is why the reference model of DPO, MPO and every KL term costs nothing here: it is the policy with
its adapters switched off (`without_adapters`), no second model is loaded.

Which layers (`adapt`): by default every nn.Linear of the language model (`hf_model.get_decoder()`:
attention and MLP projections of every decoder layer, whatever the family calls them); with
--lora-vision also the vision tower's and the merger's/projector's, i.e. every nn.Linear of the base
model (`hf_model.model`). lm_head is never adapted (as PEFT's "all-linear"). --lora-target-modules
narrows that set to the layers whose name ends with one of the given names (PEFT's rule).

Why written by hand (about 100 lines) and not with the `peft` library: PEFT replaces each adapted
nn.Linear by a wrapper (its weight moves to `q_proj.base_layer.weight`) and the model by a PeftModel
(`base_model.model.` before every name). Every name nanoalign's loading path maps from the checkpoint
(rank 0 reads and scatters into FSDP2 shards built on the meta device), the FSDP2 plan's lookups
(decoder layers, vision blocks) and the weight names sent to vLLM would then need PEFT's renaming in
and out. Here the adapters are plain submodules of the layer they adapt (`q_proj.lora_A`,
`q_proj.lora_B`) added by a forward hook, so the base weights keep their names, FSDP2 shards the
adapters with their decoder layer, and nothing else changes. What users load is still PEFT's format:
`save_adapter` writes adapter_config.json + adapter_model.safetensors with PEFT's key names
(`base_model.model.<layer>.lora_A.weight`), which `peft.PeftModel.from_pretrained` and vLLM's LoRA
support read (tests/test_lora.py loads it with PEFT).

Merged weights, W + (alpha / r) B A, are what vLLM receives at a sync (only the adapted layers: the
rest of the model never changes) and what `--lora-export merged` writes (`merged_weight`).
Simplifications: no bias training, DoRA or rsLoRA; adapters on nn.Linear layers only.
"""

import json
import math
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


def is_adapter(name: str) -> bool:
    """Whether a parameter name is a LoRA adapter's (not in the base checkpoint, not sent to vLLM)."""
    return ".lora_A." in name or ".lora_B." in name


def target_layers(hf_model, target_modules: tuple[str, ...] = (), vision: bool = False) -> dict[str, nn.Linear]:
    """{name in hf_model: layer} of the nn.Linear layers to adapt (the rules in the module docstring)."""
    scope = hf_model.model if vision else hf_model.get_decoder()
    prefix = next(name for name, module in hf_model.named_modules() if module is scope)
    layers = {f"{prefix}.{name}": m for name, m in scope.named_modules() if isinstance(m, nn.Linear)}
    if not target_modules:
        return layers
    def matches(name: str, target: str) -> bool:  # PEFT's rule: the whole name, or its last dotted parts
        return name == target or name.endswith("." + target)

    for target in target_modules:  # a name that matches nothing is a typo, not an empty adapter
        if not any(matches(name, target) for name in layers):
            raise ValueError(f"--lora-target-modules {target}: no linear layer of the {'model' if vision else 'language model'}"
                             f" is called that (e.g. {', '.join(sorted({n.rsplit('.', 1)[-1] for n in layers})[:8])})")  # fmt: skip
    return {name: m for name, m in layers.items() if any(matches(name, t) for t in target_modules)}


def _lora_forward(layer: nn.Linear, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: y = x W^T + b, plus (alpha / r) dropout(x) A^T B^T while the adapters are on."""
    if not layer.lora_enabled:
        return output
    return output + layer.lora_B(layer.lora_A(layer.lora_dropout(args[0]))) * layer.lora_scale


def add_adapters(hf_model, cfg) -> dict[str, nn.Linear]:
    """Give each target layer A (r, in) and B (out, r), fp32 like any trained weight, on a model whose base
    is frozen (model.freeze). Call it on the model built on the meta device, before FSDP2 wraps it (the
    adapters are then sharded with their layer); `init_adapters` fills them once the shards exist.
    Returns the adapted layers."""
    layers = target_layers(hf_model, cfg.lora_target_modules, cfg.lora_vision)
    for layer in layers.values():
        layer.lora_A = nn.Linear(layer.in_features, cfg.lora_rank, bias=False, device=layer.weight.device)
        layer.lora_B = nn.Linear(cfg.lora_rank, layer.out_features, bias=False, device=layer.weight.device)
        layer.lora_dropout = nn.Dropout(cfg.lora_dropout) if cfg.lora_dropout > 0 else nn.Identity()
        layer.lora_scale = cfg.lora_alpha / cfg.lora_rank
        layer.lora_enabled = True
        layer.register_forward_hook(_lora_forward)
    hf_model.lora_config = {"r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
                            "target_modules": sorted(layers)}  # fmt: skip
    return layers


def adapted_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """{name: layer} of the adapted layers of an HF model (names as in its state dict)."""
    return {name: m for name, m in model.named_modules() if hasattr(m, "lora_A")}


@torch.no_grad()
def init_adapters(hf_model, seed: int) -> None:
    """A = nn.Linear's init (Kaiming uniform, a = sqrt(5), as PEFT), drawn whole on every rank from one
    seeded generator so any number of ranks gets the same adapters; B = 0. Each rank keeps its rows."""
    generator = torch.Generator().manual_seed(seed)
    for layer in adapted_layers(hf_model).values():
        full = torch.empty(layer.lora_A.weight.shape)
        nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=generator)
        for param, value in ((layer.lora_A.weight, full), (layer.lora_B.weight, torch.zeros(layer.lora_B.weight.shape))):
            if isinstance(param, DTensor):  # every rank has the full value: no communication, just its rows
                value = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None).to_local()
                param = param.to_local()
            param.copy_(value.to(param.device, param.dtype))


class without_adapters:
    """The policy with its adapters switched off: the base model, i.e. the reference of DPO/MPO/KL terms.
    Call it like the policy (it is also a context manager that switches them off for a block)."""

    def __init__(self, policy):
        self.policy = policy

    def __enter__(self):
        for layer in adapted_layers(self.policy).values():
            layer.lora_enabled = False

    def __exit__(self, *exc):
        for layer in adapted_layers(self.policy).values():
            layer.lora_enabled = True

    def __call__(self, *args, **kwargs):
        with self:
            return self.policy(*args, **kwargs)


def sync_parameters(hf_model) -> list[tuple[str, torch.Tensor]]:
    """What a weight sync to vLLM sends: every parameter, or with LoRA only the adapted layers' weights
    (merged by `merged_weight`); the rest of the base never changes, and vLLM loaded it at start.
    Also the weights of an adapted layer's linear siblings (the default adapts them all anyway): vLLM
    fuses q/k/v and gate/up into one weight, and one it receives only part of is left part garbage."""
    layers = adapted_layers(hf_model)
    if not layers:
        return list(hf_model.named_parameters())
    parents = {name.rpartition(".")[0] for name in layers}
    return [(f"{name}.weight", m.weight) for name, m in hf_model.named_modules()
            if isinstance(m, nn.Linear) and name.rpartition(".")[0] in parents]  # fmt: skip


def merged_weight(hf_model, name: str, tensor: torch.Tensor, gather, dtype: torch.dtype | None = None):
    """gather(tensor) (the full tensor: all ranks, or rank 0 only and None elsewhere) in `dtype`, plus
    (alpha / r) B A when `name` is an adapted layer's weight (merged in the base's dtype, then cast).
    Collective when gather is."""
    layer_name, _, leaf = name.rpartition(".")
    if leaf != "weight" or not hasattr(layer := hf_model.get_submodule(layer_name), "lora_A"):
        return gather(tensor.detach().to(dtype or tensor.dtype))  # cast before the gather: fewer bytes moved
    full = gather(tensor)
    A, B = gather(layer.lora_A.weight), gather(layer.lora_B.weight)  # same order on every rank
    if full is None:
        return None
    return (full + layer.lora_scale * (B.to(full.device) @ A.to(full.device))).to(dtype or full.dtype)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (an all-gather for a DTensor; adapters are small)."""
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach()


def save_adapter(hf_model, out_dir, rank: int, base_model: str) -> None:
    """Write the adapters in PEFT's format: adapter_config.json + adapter_model.safetensors, keys
    `base_model.model.<layer>.lora_{A,B}.weight`. Every rank calls it (gathers); rank 0 writes."""
    from safetensors.torch import save_file

    state = {f"base_model.model.{name}": full_tensor(p).cpu().contiguous()
             for name, p in hf_model.named_parameters() if is_adapter(name)}  # fmt: skip
    if rank != 0:
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, out / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model, "bias": "none",
              "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
              "use_dora": False, "modules_to_save": None, **hf_model.lora_config}  # fmt: skip
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
