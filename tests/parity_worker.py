"""Helper for tests/test_sft_train.py: one optimizer step's loss and full gradients, any world size.

    torchrun --standalone --nproc_per_node 2 tests/parity_worker.py MODEL_DIR OUT.pt sft:2:1 sft:1:2 mpo:2:1 sft:1:2:pf dpo:2:1::250

Each ALGO:BATCH_SIZE:GRAD_ACCUM spec (ALGO: sft, dpo or mpo) runs one step from the same initial
weights on the same global batch of 4 samples (`parity_samples`: conversations for sft, pairs for
dpo/mpo): rank r takes the r-th contiguous share (rank 0 samples [0, 1], rank 1 [2, 3] with 2 ranks),
the algorithm's prepare splits it into grad_accum micro-batches and computes the step's global
normalisers, its loss gives each micro-batch's loss, exactly as train.py uses them; dpo/mpo score
with a frozen reference model sharded the same way. Rank 0 saves {spec: {"loss", "grads",
"num_tokens"}} with the full (gathered) gradients, and what `mean_over_ranks` (train.py's metric
average) gives when one rank has nothing to measure. The test also imports `parity_step` to compute
the one-process reference in its own process.
"""

import dataclasses
import sys

import torch

from nanoalign import mpo, sft
from nanoalign.config import PRESETS
from nanoalign.data import prepare_sample
from bench.common import load_hf_model
from nanoalign.model import Policy, load_processor, shard_policy
from nanoalign.runtime import Run, device_mesh, end_distributed, init_distributed, mean_over_ranks
from nanoalign.shapes import shapes_sample

# Answers of clearly different lengths, so the rows (and any split of them) have different numbers
# of counted tokens: a per-micro-batch or per-rank token mean would then NOT equal the global one.
ANSWERS = [
    "4",
    "I count 2 shapes.",
    "<think>The shape has 5 sides.</think> The answer is \\boxed{5}.",
    "<think>I count 3 shapes.</think> The answer is \\boxed{3}. There are three circles in the image, all of one size.",
]


def parity_samples(fmt: str = "sft") -> list[dict]:
    """4 prepared samples (SFT conversations or preference pairs) of shapes images, the last one
    168x84 (so image token counts differ too), whose answers (chosen answers) are ANSWERS."""
    samples = []
    for i, answer in enumerate(ANSWERS):
        raw = shapes_sample("train", i, fmt)
        raw["messages" if fmt == "sft" else "chosen"][-1] = {"role": "assistant", "content": [{"type": "text", "text": answer}]}
        if i == 3:
            raw["images"] = [raw["images"][0].resize((168, 84))]
        samples.append(prepare_sample(raw, fmt, f"parity sample {i}"))
    return samples


def sharded_policy(model_dir: str, world_size: int, device, padding_free: bool = False) -> Policy:
    policy = Policy(load_hf_model(model_dir), logps_chunk_size=32, padding_free=padding_free)
    return shard_policy(policy, device_mesh(world_size, device), bf16=False)


def parity_step(model_dir: str, algo_name: str, batch_size: int, grad_accum: int, padding_free: bool = False,
                max_tokens: int = 0, build=sharded_policy) -> dict:  # fmt: skip
    """One step's (loss as train.py logs it, full gradients, global token count) on this rank's share."""
    rank, world_size, device = init_distributed()
    algo = {"sft": sft, "dpo": mpo, "mpo": mpo}[algo_name]
    cfg = dataclasses.replace(PRESETS[algo_name](), batch_size=batch_size, grad_accum_steps=grad_accum, max_length=512,
                              padding_free=padding_free, max_tokens_per_micro_batch=max_tokens)  # fmt: skip
    processor = load_processor(model_dir)
    policy = build(model_dir, world_size, device, padding_free)
    ref_policy = build(model_dir, world_size, device, padding_free) if algo.needs_reference(cfg) else None
    eos = policy.hf.generation_config.eos_token_id
    stop_ids = {processor.tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
    run = Run(cfg, processor, policy, ref_policy, rank, world_size, device, stop_ids, processor.tokenizer.pad_token_id)

    per_rank = algo.samples_per_round(cfg)
    samples = parity_samples(algo.DATA_FORMAT)
    assert per_rank * world_size == len(samples), "the specs must cover the 4 parity samples exactly"
    micro_batches, _ = algo.prepare(samples[rank * per_rank : (rank + 1) * per_rank], run)
    assert max_tokens or len(micro_batches) == grad_accum  # a token budget makes as many as it needs
    loss_sum = 0.0
    for micro in micro_batches:
        loss, _ = algo.loss(micro, run)
        loss.backward()
        loss_sum += float(loss.detach())
    loss_mean = mean_over_ranks({"loss": loss_sum * world_size}, device)["loss"]  # what train.py logs
    # collective; a parameter no sample reaches (LLaVA's vision layer after the one it reads) has no gradient on any rank
    grads = {name: p.grad.full_tensor().detach().clone() for name, p in policy.named_parameters() if p.grad is not None}
    rows_per_rank = [None] * world_size  # each rank's rows per micro-batch (a token budget decides them)
    torch.distributed.all_gather_object(rows_per_rank, [len(m.batch.input_ids) for m in micro_batches])
    step_tokens = micro_batches[0].normaliser if algo is sft else micro_batches[0].num_step_chosen_tokens
    return {"loss": loss_mean, "grads": grads, "num_tokens": step_tokens,
            "rank_tokens": [float(m.batch.mask.sum()) for m in micro_batches], "rows_per_rank": rows_per_rank}  # fmt: skip


def parse_spec(spec: str) -> tuple:
    """ALGO:BATCH:ACCUM, then optionally :pf (--padding-free) or : (padded), then :N (--max-tokens-per-micro-batch)
    -> parity_step's arguments after the model directory."""
    algo_name, batch_size, grad_accum, *extra = spec.split(":")
    return algo_name, int(batch_size), int(grad_accum), extra[:1] == ["pf"], int(extra[1]) if len(extra) > 1 else 0


if __name__ == "__main__":
    import torch.distributed as dist

    model_dir, out_path, *specs = sys.argv[1:]
    results = {}
    for spec in specs:
        results[spec] = parity_step(model_dir, *parse_spec(spec))
    # train.py's metric average over ranks: rank 0 has nothing to measure for "partly" (NaN)
    rank = dist.get_rank()
    results["mean_over_ranks"] = mean_over_ranks(
        {"partly": float("nan") if rank == 0 else 3.0, "nowhere": float("nan"), "everywhere": float(rank)}, "cpu"
    )
    if rank == 0:
        torch.save(results, out_path)
    end_distributed()
