"""The shared-prompt forward under activation checkpointing (nanoalign/prompt_cache.py): each prompt is
still read once, and log-probs and every gradient equal the whole-row forward's, with or without
checkpointing (a recomputed layer that wrote the cache again would attend over the wrong keys)."""

from types import SimpleNamespace

import pytest
import torch
from test_sampler import PROMPTS, encode, sample_kwargs, sharpen
from torch.testing import assert_close

from nanoalign.model import Policy, decoder_layers, vision_module
from nanoalign.prompt_cache import serves
from nanoalign.rl import completion_batch
from nanoalign.rollout import Rollout
from nanoalign.sampler import sample
from nanoalign.shapes import user_turn

G = 3


def step(policy, inputs, batch, weights):
    policy.hf.zero_grad()
    logps, _ = policy(**inputs, temperature=0.7, logps_mask=batch.mask)
    (logps * weights).sum().backward()
    return logps.detach(), {n: p.grad.clone() for n, p in policy.hf.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["tiny", "tiny-llava"])
def test_checkpointed_shared_prompt_forward_equals_whole_rows(name, load_family, make_image):
    processor, model, stop_ids = load_family(name)
    model = sharpen(model, 3.0)
    prompts = [[user_turn(q, len(imgs))] for q, imgs in PROMPTS], [[make_image(s, size) for s, size in imgs] for _, imgs in PROMPTS]
    model.train()
    distinct, rows = encode(processor, prompts, G)
    samples = sample(model, distinct, num_samples=G, generator=torch.Generator().manual_seed(0), **sample_kwargs(processor, stop_ids))
    ids = [row[: max(1, len(row) - 2 * i)] for i, row in enumerate(samples.ids)]  # different lengths: right padding
    run = SimpleNamespace(processor=processor, cfg=SimpleNamespace(max_length=1024), pad_id=processor.tokenizer.pad_token_id, device="cpu")
    batch = completion_batch(Rollout(rows, ids, [False] * len(ids), texts=[], shared_prompts=distinct), run, mask_truncated=False)
    shared_inputs = batch.model_inputs()
    whole_inputs = {k: v for k, v in shared_inputs.items() if k != "shared_prompts"}
    weights = torch.rand(batch.mask.shape, generator=torch.Generator().manual_seed(1)) * batch.mask
    policy = Policy(model)
    images_seen = []  # the rows of pixels the vision tower gets per call
    hooks = [vision_module(model).register_forward_pre_hook(
        lambda m, args, kwargs: images_seen.append((args[0] if args else next(iter(kwargs.values()))).shape[0]), with_kwargs=True)]  # fmt: skip
    whole, whole_grads = step(policy, whole_inputs, batch, weights)  # no checkpointing, every row whole: the reference

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_gradient_checkpointing and serves(model)
    recomputed = []
    hooks.append(decoder_layers(model)[0].register_forward_pre_hook(lambda m, a: recomputed.append(torch.is_grad_enabled())))
    try:
        shared, shared_grads = step(policy, shared_inputs, batch, weights)
    finally:
        model.gradient_checkpointing_disable()
        for hook in hooks:
            hook.remove()
    # The first layer ran for the prompts and for the completions, and both again in backward.
    assert len(recomputed) == 4, recomputed
    assert images_seen[1] * G == images_seen[0]  # each image through the vision tower once, not G times
    assert not any(getattr(layer, "_can_checkpoint_with_cache", False) for layer in decoder_layers(model))  # restored
    assert_close(shared, whole, atol=2e-5, rtol=0)
    assert shared_grads.keys() == whole_grads.keys() and any("visual" in n or "vision" in n for n in shared_grads)
    for n, grad in whole_grads.items():
        assert_close(shared_grads[n], grad, atol=1e-4 * float(grad.abs().max()) + 1e-6, rtol=0, msg=n)
