"""Helper for tests/test_colocate.py: log-prob parity of colocated vLLM engines over several syncs.

    python tests/colocate_worker.py MODEL_DIR OUT_JSON                      # one process
    torchrun --standalone --nproc_per_node 2 tests/colocate_worker.py MODEL_DIR OUT_JSON

Every rank builds the tiny model perturbed by noise (not what its engine loaded from MODEL_DIR),
sharded with FSDP2, and a VLLMColocate engine. Then, for NUM_ROUNDS rounds: sample with the engine,
measure the gap to the trainer's log-probs (before the sync), sync, sample again and measure it
(after), and move every weight again (as an optimizer step would) for the next round. Rank 0 writes
[{"before", "after", "sync_s", "sync_mb"}, ...] per round, each gap the max over the ranks.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from test_vllm import SAMPLES, perturbed_policy, rollout_logp_gap  # noqa: E402

from nanoalign.model import load_processor  # noqa: E402
from nanoalign.runtime import init_distributed  # noqa: E402
from nanoalign.vllm_colocate import VLLMColocate  # noqa: E402

NUM_ROUNDS, NUM_SAMPLES, MAX_TOKENS = 3, 3, 12


def engine_gap(backend, policy, processor, chunks) -> float:
    """Max over ranks of the max |trainer - vLLM| log-prob gap of one round of samples (collective)."""
    rollouts = backend.sample(chunks, NUM_SAMPLES, max_tokens=MAX_TOKENS, temperature=1.0, top_p=1.0)
    gap = max(rollout_logp_gap(policy, processor, r, r.sampler_logps, temperature=1.0) for r in rollouts)
    gap = torch.tensor(gap)
    dist.all_reduce(gap, op=dist.ReduceOp.MAX)
    return gap.item()


def main(model_dir: str, out_json: str) -> None:
    rank, world_size, device = init_distributed()
    processor = load_processor(model_dir)
    policy = perturbed_policy(model_dir, seed=1, world_size=world_size)
    stop_ids = {processor.tokenizer.eos_token_id, processor.tokenizer.pad_token_id}
    backend = VLLMColocate(
        policy, processor, model_dir=model_dir, stop_ids=stop_ids, rank=rank, world_size=world_size, device=device,
        dtype="float32", seed=rank, sync_every=1, tensor_parallel_size=1, gpu_memory_utilization=0.1, max_model_len=512,
        enforce_eager=True, model_impl="auto", max_images=2,
    )  # fmt: skip
    # One chunk with a one-image prompt, one with a two-image prompt.
    chunks = [[{**s, "sample_id": f"sample {i}"}] for i, s in enumerate(SAMPLES)]
    generator = torch.Generator().manual_seed(100 + rank)
    rounds = []
    for step in range(NUM_ROUNDS):
        before = engine_gap(backend, policy, processor, chunks)
        metrics = backend.sync(step)
        after = engine_gap(backend, policy, processor, chunks)
        rounds.append({"before": before, "after": after, "sync_s": metrics["vllm/sync_s"], "sync_mb": metrics["vllm/sync_mb"]})
        with torch.no_grad():  # a new state of the weights, as after an optimizer step (each rank moves its shard)
            for p in policy.parameters():
                local = p.to_local() if hasattr(p, "to_local") else p
                local.add_(0.05 * torch.randn(local.shape, generator=generator))
    if rank == 0:
        Path(out_json).write_text(json.dumps(rounds))
    backend.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
