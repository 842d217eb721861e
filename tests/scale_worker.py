"""Helper for tests/test_scale.py: the meta-device loader and rank-0 export on several ranks.

    torchrun --standalone --nproc_per_node 2 tests/scale_worker.py MODEL_DIR OUT_DIR

On every rank: (1) the policy built by model.build_policy (meta device, rank 0 reads, shards
scattered) holds exactly the shards of today's path (from_pretrained on every rank, then
fully_shard); (2) one SFT step and one MPO step (which loads a frozen reference the same way)
give the same loss and gradients on both paths; (3) export_hf writes the checkpoint from rank 0
alone, the other ranks' gathers give them nothing. Rank 0 saves what it measured to OUT_DIR/result.pt
and the exported checkpoint to OUT_DIR/export, for the test to compare.
"""

import dataclasses
import sys

import torch
import torch.distributed as dist

import parity_worker
from nanoalign import sft
from nanoalign.config import Config
from bench.common import hf_state_dict
from nanoalign.loading import export_hf, gather_full
from nanoalign.model import build_policy, load_processor
from nanoalign.runtime import Run, device_mesh, end_distributed, init_distributed



def new_path(model_dir: str, world_size: int, device, padding_free: bool = False, trainable: bool = True):
    cfg = dataclasses.replace(Config(), logps_chunk_size=32, padding_free=padding_free)
    return build_policy(model_dir, cfg, device_mesh(world_size, device), bf16=False, trainable=trainable)


def on_every_rank(flag: bool) -> bool:
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, flag)
    return all(flags)


def main(model_dir: str, out_dir: str) -> None:
    rank, world_size, device = init_distributed()
    old_path = parity_worker.sharded_policy  # today's: a full copy per rank, then fully_shard
    result = {"world_size": world_size}

    old, new = old_path(model_dir, world_size, device), new_path(model_dir, world_size, device)
    shards_equal = [torch.equal(p.to_local(), dict(new.named_parameters())[n].to_local()) for n, p in old.named_parameters()]
    result["shards_equal"] = on_every_rank(all(shards_equal))

    for spec in ("sft", "mpo"):  # mpo also loads the frozen reference model
        steps = {}
        for name, build in (("old", old_path), ("new", new_path)):
            step = parity_worker.parity_step(model_dir, spec, 2, 1, build=build)
            steps[name] = {"loss": step["loss"], "grads": step["grads"]}
        result[spec] = steps

    # Export from rank 0 alone; every other rank takes part in the gathers and receives nothing.
    received = [gather_full(p) is not None for p in new.parameters()]
    result["others_received_nothing"] = on_every_rank(rank == 0 or not any(received))
    state = hf_state_dict(new)  # collective
    result["others_state_dict_empty"] = on_every_rank(rank == 0 or not state)
    export_hf(new, load_processor(model_dir), f"{out_dir}/export", rank, max_shard_bytes=2**20)  # several files + index
    processor = load_processor(model_dir)
    run = Run(Config(), processor, new, None, rank, world_size, device, {processor.tokenizer.eos_token_id}, processor.tokenizer.pad_token_id)
    batch = sft.encode(parity_worker.parity_samples()[:2], run)
    with torch.no_grad():
        result["policy_logps"], _ = new(**batch.model_inputs())  # collective: every rank runs it
    result["model_inputs"] = batch.model_inputs()
    if rank == 0:
        torch.save(result, f"{out_dir}/result.pt")
    end_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
