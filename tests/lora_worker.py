"""Helper for tests/test_lora.py: one LoRA optimizer step's loss and adapter gradients, any world size.

    torchrun --standalone --nproc_per_node 2 tests/lora_worker.py MODEL_DIR OUT.pt sft dpo

For each algorithm (sft, or dpo: its reference is the policy with the adapters off) the LoRA policy is
built as train.py builds it (model.build_policy: adapters on every linear layer, vision tower and
merger included), its B matrices set to seeded noise (at B = 0, A gets no gradient and the policy is
the reference), then one step on the 4 parity samples (tests/parity_worker.py), rank r taking the r-th
share. Rank 0 saves {algo: {"loss", "grads": full adapter gradients, "base_grads": base parameters that
got a gradient}}. The test also imports `lora_step` and `lora_policy` to run them in its own process.
"""

import dataclasses
import sys

import torch
from parity_worker import parity_samples
from torch.distributed.tensor import DTensor, distribute_tensor

from nanoalign import lora, mpo, sft
from nanoalign.config import PRESETS
from nanoalign.model import build_policy, load_processor, stop_and_pad_ids
from nanoalign.runtime import Run, device_mesh, end_distributed, init_distributed, mean_over_ranks

RANK = 4


@torch.no_grad()
def set_B(policy, seed: int, scale: float = 0.05) -> None:
    """Every B matrix := scale * N(0, 1), drawn whole from one seeded generator (same on any world size)."""
    generator = torch.Generator().manual_seed(seed)
    for layer in lora.adapted_layers(policy.hf).values():
        param = layer.lora_B.weight
        value = scale * torch.randn(param.shape, generator=generator)
        if isinstance(param, DTensor):
            value, param = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None).to_local(), param.to_local()
        param.copy_(value)


def lora_policy(model_dir: str, algo_name: str, world_size: int, device, **overrides):
    """(cfg, LoRA policy as train.py builds it) for `algo_name`'s preset on the 4 parity samples."""
    cfg = dataclasses.replace(PRESETS[algo_name](), batch_size=4 // world_size, max_length=512, logps_chunk_size=32,
                              lora_rank=RANK, lora_alpha=8.0, lora_vision=True, **overrides)  # fmt: skip
    return cfg, build_policy(model_dir, cfg, device_mesh(world_size, device), bf16=False, trainable=True)


def lora_step(model_dir: str, algo_name: str) -> dict:
    rank, world_size, device = init_distributed()
    algo = {"sft": sft, "dpo": mpo}[algo_name]
    cfg, policy = lora_policy(model_dir, algo_name, world_size, device)
    set_B(policy, seed=1)
    processor = load_processor(model_dir)
    stop_ids, pad_id = stop_and_pad_ids(processor, policy.hf)
    ref_policy = lora.without_adapters(policy) if algo.needs_reference(cfg) else None
    run = Run(cfg, processor, policy, ref_policy, rank, world_size, device, stop_ids, pad_id)
    samples = parity_samples(algo.DATA_FORMAT)
    per_rank = algo.samples_per_round(cfg)
    micro_batches, _ = algo.prepare(samples[rank * per_rank : (rank + 1) * per_rank], run)
    loss_sum = 0.0
    for micro in micro_batches:
        loss, _ = algo.loss(micro, run)
        loss.backward()
        loss_sum += float(loss.detach())
    grads = {name: lora.full_tensor(p.grad).clone() for name, p in policy.hf.named_parameters() if lora.is_adapter(name)}
    base_grads = [name for name, p in policy.hf.named_parameters() if not lora.is_adapter(name) and p.grad is not None]
    return {"loss": mean_over_ranks({"loss": loss_sum * world_size}, device)["loss"], "grads": grads, "base_grads": base_grads}


if __name__ == "__main__":
    import torch.distributed as dist

    model_dir, out_path, *algos = sys.argv[1:]
    results = {algo: lora_step(model_dir, algo) for algo in algos}
    if dist.get_rank() == 0:
        torch.save(results, out_path)
    end_distributed()
