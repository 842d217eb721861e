"""Tests for nanoalign/model.py: chunked log-probs against the naive full log-softmax (values,
gradients, temperature, entropy), the Policy against the HF model's own logits, and the FSDP plan."""

import pytest
import torch
from torch.distributed.fsdp import FSDPModule
from torch.testing import assert_close

from bench.common import hf_state_dict
from nanoalign.batch import encode_conversations
from nanoalign.model import (
    Policy,
    chunked_logps,
    decoder_layers,
    gathered_for_generation,
    shard_policy,
    vision_blocks,
)


def naive_logps(hidden, weight, targets, temperature):
    """The reference: full (B, T, V) logits, log_softmax, gather."""
    logprobs = torch.log_softmax((hidden @ weight.T).float() / temperature, dim=-1)
    logps = logprobs.gather(-1, targets[..., None]).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logps, entropy


def inputs(B=3, T=7, H=16, V=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=g)
    upstream = torch.randn(B, T, generator=g)  # a non-uniform incoming gradient dL/dlogps
    return hidden, weight, targets, upstream


@pytest.mark.parametrize(
    "chunk_size, temperature",
    [
        (1024, 1.0),  # one chunk holds all 21 positions
        (4, 1.0),  # 21 positions = 5 chunks of 4 + 1: the last chunk is partial
        (5, 0.7),  # temperature below 1
        (1, 1.3),  # one position per chunk, temperature above 1
        (21, 2.0),  # chunk == N exactly
    ],
)
def test_chunked_logps_match_naive_values_and_gradients(chunk_size, temperature):
    hidden, weight, targets, upstream = inputs()
    logps, entropy = chunked_logps(hidden, weight, targets, temperature, chunk_size, with_entropy=True)
    (logps * upstream).sum().backward()
    grad_hidden, grad_weight = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    ref_logps, ref_entropy = naive_logps(hidden, weight, targets, temperature)
    (ref_logps * upstream).sum().backward()

    assert logps.shape == entropy.shape == (3, 7) and logps.dtype == torch.float32
    assert_close(logps, ref_logps)
    assert_close(entropy, ref_entropy)
    assert_close(grad_hidden, hidden.grad)
    assert_close(grad_weight, weight.grad)
    assert not entropy.requires_grad  # entropy is a metric, never trained through
    assert (logps <= 0).all()


def test_chunked_logps_hand_values():
    # One position, vocabulary of 2, weight rows e1 and e2, hidden (ln 3, 0): logits (ln 3, 0).
    # p = (3/4, 1/4): log p(0) = ln 0.75 = -0.287682, log p(1) = ln 0.25 = -1.386294;
    # entropy = -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.562335.
    # At temperature 2: logits (ln 3 / 2, 0) = (ln sqrt 3, 0), p(0) = sqrt3 / (sqrt3 + 1) = 0.633975.
    hidden = torch.tensor([[[torch.log(torch.tensor(3.0)).item(), 0.0]] * 2])  # (1, 2, 2)
    weight = torch.eye(2)
    targets = torch.tensor([[0, 1]])
    logps, entropy = chunked_logps(hidden, weight, targets, 1.0, 1, with_entropy=True)
    assert_close(logps, torch.tensor([[-0.287682, -1.386294]]), atol=1e-6, rtol=0)
    assert_close(entropy, torch.tensor([[0.562335, 0.562335]]), atol=1e-6, rtol=0)
    logps_t2, _ = chunked_logps(hidden, weight, targets, 2.0, 1)
    assert_close(logps_t2[0, 0], torch.log(torch.tensor(0.633975)), atol=1e-6, rtol=0)


def test_chunked_logps_gradient_flags():
    # Frozen weight (e.g. a frozen lm_head): only the hidden gradient is computed, and it is unchanged.
    hidden, weight, targets, upstream = inputs(seed=1)
    frozen = weight.detach()
    logps, entropy = chunked_logps(hidden, frozen, targets, 1.0, 3)
    assert entropy.abs().sum() == 0  # not asked for
    (logps * upstream).sum().backward()
    hidden_ref = hidden.detach().requires_grad_()
    ref, _ = naive_logps(hidden_ref, frozen, targets, 1.0)
    (ref * upstream).sum().backward()
    assert_close(hidden.grad, hidden_ref.grad)


def test_policy_logps_equal_hf_logits(load_family, make_image):
    # Policy.forward (base model + chunked lm_head) must give log_softmax(HF logits / T) at the next
    # token, shifted so logps[:, t] is the log-prob of token t, with logps[:, 0] = 0.
    processor, model, stop_ids = load_family("tiny")
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many shapes are in the image?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "The answer is \\boxed{2}."}]},
    ]
    batch = encode_conversations(
        processor, [messages, messages[:1] + [{"role": "assistant", "content": "3"}]],
        [[make_image(0)], [make_image(1, (84, 56))]], ["a", "b"], max_length=512, stop_ids=stop_ids,
    )  # fmt: skip
    policy = Policy(model, logps_chunk_size=13)
    temperature = 0.8
    with torch.no_grad():
        logps, entropy = policy(**batch.model_inputs(), temperature=temperature, with_entropy=True)
        logits = model(**batch.model_inputs()).logits[:, :-1].float() / temperature
    logprobs = torch.log_softmax(logits, -1)
    expected = logprobs.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    assert logps.shape == batch.input_ids.shape
    assert (logps[:, 0] == 0).all() and (entropy[:, 0] == 0).all()
    assert_close(logps[:, 1:], expected, atol=1e-5, rtol=1e-5)
    assert_close(entropy[:, 1:], -(logprobs.exp() * logprobs).sum(-1), atol=1e-5, rtol=1e-5)
    assert policy(**batch.model_inputs())[1] is None  # entropy only when asked for


def test_shard_policy_plan_and_full_state_dict(load_family, dist_world):
    # torchtitan's plan: each vision block and each decoder layer is its own FSDP unit, then the root.
    # hf_state_dict gathers full tensors back under the checkpoint's own names.
    _, model, _ = load_family("tiny")
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    policy = shard_policy(Policy(model), _mesh(dist_world), bf16=False)
    assert isinstance(policy, FSDPModule)
    units = vision_blocks(policy.hf) + decoder_layers(policy.hf)
    assert len(units) == 2 + 4  # tiny: vision depth 2, 4 decoder layers
    assert all(isinstance(u, FSDPModule) for u in units)
    state = hf_state_dict(policy)
    assert state.keys() == reference.keys()
    for key in reference:
        assert torch.equal(state[key], reference[key]), key


def test_gathered_generation_matches_plain_model(load_family, make_image, dist_world):
    # Generating from the sharded policy inside gathered_for_generation gives the plain model's
    # greedy tokens; inside, every unit holds full weights; afterwards they are sharded again and
    # the decoder layers go back to resharding after each forward.
    from torch.distributed.tensor import DTensor

    from nanoalign.batch import process_prompts, render

    processor, plain, _ = load_family("tiny")
    prompt = render(processor, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}], True)
    enc = process_prompts(processor, [prompt, prompt], [[make_image(0)], [make_image(1, (56, 84))]], padding_side="left")
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    with torch.no_grad():
        expected = plain.generate(**enc, **kwargs)

    _, model, _ = load_family("tiny")
    policy = shard_policy(Policy(model), _mesh(dist_world), bf16=False)
    layer_weight = lambda: decoder_layers(policy.hf)[0].mlp.up_proj.weight  # noqa: E731
    assert isinstance(layer_weight(), DTensor)
    with torch.no_grad(), gathered_for_generation(policy):
        assert not isinstance(layer_weight(), DTensor)  # gathered for the whole block
        generated = policy.generate(**enc, **kwargs)
    assert torch.equal(generated, expected)
    assert isinstance(layer_weight(), DTensor)
    with torch.no_grad():
        policy(**{k: v for k, v in enc.items()})
    assert isinstance(layer_weight(), DTensor)  # resharded after forward again


def _mesh(dist_world):
    from nanoalign.runtime import device_mesh

    _, world_size, device = dist_world
    return device_mesh(world_size, device)


def test_activation_checkpointing_recomputes_layers_and_keeps_gradients(load_family, make_image, dist_world):
    # With --activation-checkpointing every decoder layer runs its forward twice (once more in
    # backward, to rebuild what was not stored) and the loss and gradients do not change.
    def step(checkpointing: bool):
        processor, model, stop_ids = load_family("tiny")
        model.train()  # what train.py does: HF checkpoints only in training mode
        policy = shard_policy(Policy(model), _mesh(dist_world), bf16=False, activation_checkpointing=checkpointing)
        calls, layer = [], decoder_layers(policy.hf)[0]
        layer_forward = layer.forward  # count forward runs (the recompute in backward skips module hooks)
        layer.forward = lambda *args, **kwargs: calls.append(1) or layer_forward(*args, **kwargs)
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many shapes are in the image?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "The answer is \\boxed{2}."}]},
        ]
        batch = encode_conversations(processor, [messages], [[make_image(0)]], ["a"], max_length=512, stop_ids=stop_ids)
        logps, _ = policy(**batch.model_inputs())
        loss = -(logps * batch.mask).sum()
        loss.backward()
        grads = {n: p.grad.full_tensor().clone() for n, p in policy.named_parameters()}
        return loss.detach(), grads, len(calls)

    loss, grads, calls = step(checkpointing=False)
    loss_ac, grads_ac, calls_ac = step(checkpointing=True)
    assert (calls, calls_ac) == (1, 2)  # recomputed in backward
    assert_close(loss_ac, loss)
    for name in grads:
        assert_close(grads_ac[name], grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_freeze_vision_trains_only_the_language_side(tmp_path, tiny_dirs):
    # --freeze-vision: the vision tower gets no gradient and keeps its weights; the rest trains.
    import train
    from bench.common import load_hf_model
    from nanoalign.config import Config

    out = tmp_path / "run"
    train.train(Config(model="tiny", out_dir=str(out), max_steps=2, batch_size=2, eval_split="", save_every=0, freeze_vision=True))
    before, after = load_hf_model(str(tiny_dirs["tiny"])).state_dict(), load_hf_model(str(out / "final")).state_dict()
    vision = [k for k in before if k.startswith("model.visual.")]
    text = [k for k in before if k.startswith("model.language_model.layers.")]
    assert vision and text
    assert all(torch.equal(before[k], after[k]) for k in vision)
    assert all(not torch.equal(before[k], after[k]) for k in text if k.endswith("q_proj.weight"))


def test_policy_logps_mask_computes_only_counted_positions(load_family, make_image):
    # logps_mask: the same log-probs (and gradients of a masked loss) at counted positions, exact
    # zeros elsewhere, so losses that only read completion tokens can skip the prompt's lm_head work.
    processor, model, stop_ids = load_family("tiny")
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many shapes are in the image?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "The answer is \\boxed{2}."}]},
    ]
    batch = encode_conversations(processor, [messages, messages], [[make_image(0)], [make_image(1)]], ["a", "b"],
                                 max_length=512, stop_ids=stop_ids)  # fmt: skip
    policy = Policy(model, logps_chunk_size=5)
    results = []
    for logps_mask in (None, batch.mask):
        model.zero_grad()
        logps, entropy = policy(**batch.model_inputs(), temperature=0.7, with_entropy=True, logps_mask=logps_mask)
        (-(logps * batch.mask).sum()).backward()
        results.append((logps, entropy, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (full, full_entropy, full_grads), (kept, kept_entropy, kept_grads) = results
    counted = batch.mask.bool()
    assert 0 < counted.sum() < counted.numel() / 2  # most of each row is prompt: the mask skips most positions
    assert_close(kept[counted], full[counted].detach())
    assert_close(kept_entropy[counted], full_entropy[counted])
    assert (kept[~counted] == 0).all() and (kept_entropy[~counted] == 0).all()
    assert full_grads.keys() == kept_grads.keys()
    for name in full_grads:
        assert_close(kept_grads[name], full_grads[name], atol=1e-6, rtol=1e-5, msg=name)
