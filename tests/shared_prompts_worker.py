"""Helper for tests/test_sampler.py: the shared-prompt forward (model.shared_prompt_hidden) on FSDP2 ranks.

    torchrun --standalone --nproc_per_node 2 tests/shared_prompts_worker.py MODEL_DIR OUT.pt

Each rank builds RL rows for its own 2 shapes prompts x 2 fixed completions of different lengths,
then runs one forward + backward of the sharded Policy twice from zero gradients: with the rows'
shared prompts (each prompt read once, the completions on its repeated KV cache: two forwards of
every FSDP unit before one backward) and with whole rows. Rank 0 saves both paths' log-probs and
full (gathered) gradients.
"""

import sys
from types import SimpleNamespace

import torch

from nanoalign.batch import process_prompts, render
from nanoalign.data import prepare_sample
from nanoalign.model import load_processor
from nanoalign.rl import completion_batch
from nanoalign.rollout import Rollout
from nanoalign.runtime import end_distributed, init_distributed
from nanoalign.shapes import shapes_sample
from parity_worker import sharded_policy  # tests/ is on PYTHONPATH (subprocess_env)

COMPLETIONS = ["<think>I count 2 red shapes.</think> The answer is \\boxed{2}.", "4"]


def main(model_dir: str, out: str) -> None:
    rank, world_size, device = init_distributed()
    processor = load_processor(model_dir)
    samples = [prepare_sample(shapes_sample("train", i, "rl"), "rl", f"sample {i}") for i in (2 * rank, 2 * rank + 1)]
    texts = [render(processor, s["prompt"], add_generation_prompt=True) for s in samples]
    images = [s["images"] for s in samples]
    distinct = process_prompts(processor, texts, images, padding_side="left")
    rows = process_prompts(processor, [t for t in texts for _ in COMPLETIONS], [i for i in images for _ in COMPLETIONS], padding_side="left")
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = [processor.tokenizer(c, add_special_tokens=False)["input_ids"] + [end] for _ in samples for c in COMPLETIONS]
    rollout = Rollout(rows, ids, [True] * len(ids), texts=[], shared_prompts=distinct)
    run = SimpleNamespace(processor=processor, cfg=SimpleNamespace(max_length=1024), pad_id=processor.tokenizer.pad_token_id, device=device)
    batch = completion_batch(rollout, run, mask_truncated=False)
    policy = sharded_policy(model_dir, world_size, device)
    result = {}
    for path, inputs in (("shared", batch.model_inputs()), ("whole", {k: v for k, v in batch.model_inputs().items() if k != "shared_prompts"})):
        policy.zero_grad()
        logps, _ = policy(**inputs, logps_mask=batch.mask)
        (logps * batch.mask).sum().backward()
        grads = {n: p.grad.full_tensor().clone() for n, p in policy.named_parameters() if p.grad is not None}
        result[path] = {"logps": logps.detach(), "grads": grads}
    if rank == 0:
        torch.save({"world_size": world_size, **result}, out)
    end_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
