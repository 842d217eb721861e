"""Helper for tests/test_flags.py: greedy generations under training-only flags, any world size.

    torchrun --standalone --nproc_per_node 2 tests/flags_worker.py MODEL_DIR OUT.json

For each entry of FLAG_SETS it builds the policy exactly as train.py does (build_policy: FSDP2,
train mode, dropout off, the flags applied), then greedy-decodes this rank's share of the held-out
shapes prompts in-process, as the accuracy eval and RL rollouts do. Rank 0 writes
{flag set: [rank 0's completions, rank 1's, ...]} (token ids). The test also imports
`greedy_completions` to run the same thing in one process.
"""

import dataclasses
import json
import sys
from pathlib import Path

import torch.distributed as dist

from nanoalign.config import PRESETS  # noqa: E402
from nanoalign.data import prepare_sample  # noqa: E402
from nanoalign.model import build_policy, load_processor  # noqa: E402
from nanoalign.rollout import generating, sample_completions  # noqa: E402
from nanoalign.runtime import device_mesh, end_distributed, init_distributed  # noqa: E402
from nanoalign.shapes import shapes_sample  # noqa: E402

# Flags that change how training runs, never what the model computes: generation must not see them.
FLAG_SETS = {
    "plain": {},
    "activation_checkpointing": {"activation_checkpointing": True},
    "freeze_vision": {"freeze_vision": True},
    "both": {"activation_checkpointing": True, "freeze_vision": True},
}
NUM_PROMPTS = 4  # per rank


def greedy_completions(model_dir: str, flags: dict) -> list[list[int]]:
    """This rank's greedy completions (token ids) of its NUM_PROMPTS held-out prompts."""
    rank, world_size, device = init_distributed()
    cfg = dataclasses.replace(PRESETS["grpo"](), **flags)
    policy = build_policy(model_dir, cfg, device_mesh(world_size, device), bf16=False, trainable=True)
    assert policy.training  # as in train.py: the policy trains in train mode
    processor = load_processor(model_dir)
    samples = [prepare_sample(shapes_sample("eval", i, "rl"), "rl", f"eval {i}")
               for i in range(rank * NUM_PROMPTS, (rank + 1) * NUM_PROMPTS)]  # fmt: skip
    eos = policy.hf.generation_config.eos_token_id
    stop_ids = {processor.tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
    with generating(policy):
        rollout = sample_completions(
            policy, processor, [s["prompt"] for s in samples], [s["images"] for s in samples], num_generations=1,
            max_new_tokens=24, greedy=True, stop_ids=stop_ids, pad_id=processor.tokenizer.pad_token_id, device=device,
        )  # fmt: skip
    assert policy.training  # generation put it back in train mode
    return rollout.completion_ids


if __name__ == "__main__":
    model_dir, out_path = sys.argv[1:]
    results = {}
    for name, flags in FLAG_SETS.items():
        mine = greedy_completions(model_dir, flags)
        every_rank = [None] * dist.get_world_size()
        dist.all_gather_object(every_rank, mine)
        results[name] = every_rank
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(results))
    end_distributed()
