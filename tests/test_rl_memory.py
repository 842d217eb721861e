"""No-grad log-prob passes (old and reference log-probs, rl.token_logps) free the FSDP root's gathered
weights: the root keeps them after a forward for the backward that follows, and none follows."""

import torch
from torch.distributed.tensor import DTensor

from nanoalign.batch import Batch, process_prompts, render
from nanoalign.model import Policy, shard_policy
from nanoalign.rl import token_logps
from nanoalign.runtime import device_mesh
from nanoalign.shapes import user_turn


def test_token_logps_leave_the_fsdp_root_sharded(load_family, dist_world, make_image):
    processor, model, _ = load_family("tiny")
    _, world_size, device = dist_world
    policy = shard_policy(Policy(model.train()), device_mesh(world_size, device), bf16=False)
    text = render(processor, [user_turn("How many shapes are in the image?", 1)], add_generation_prompt=True)
    enc = process_prompts(processor, [text], [[make_image(0)]], padding_side="left")
    mm_inputs = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    batch = Batch(enc["input_ids"], enc["attention_mask"], enc["attention_mask"].float(), mm_inputs)

    def root_gathered() -> bool:  # sharded parameters are DTensors, gathered ones plain tensors
        return not isinstance(policy.hf.get_input_embeddings().weight, DTensor)

    assert not root_gathered()
    with torch.no_grad():
        expected = policy(**batch.model_inputs(), logps_mask=batch.mask)[0]
    assert root_gathered()  # what a bare no-grad forward leaves behind (1.2 GB at 3B widths in fp32)
    logps = token_logps(policy, batch)
    assert not root_gathered()
    assert torch.equal(logps, expected)
    policy(**batch.model_inputs(), logps_mask=batch.mask)[0].sum().backward()  # training still works after it
