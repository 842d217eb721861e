"""nanoalign's sampler against HF generate and against the trainer's own log-probs.

The tiny models' random weights are multiplied by 6 here ("sharp" models): at the default init every
row greedily repeats one token whatever its prompt, which would let a wrong position, a wrong cache
copy or a lost image go unnoticed. Sharpened, greedy paths differ per prompt, image and position.
"""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close
from transformers.generation.logits_process import TopPLogitsWarper

from nanoalign.batch import image_token_ids, process_prompts, render
from nanoalign.model import Policy, shard_policy, vision_module
from nanoalign.rl import completion_batch, completion_values
from nanoalign.rollout import Rollout, generation_config, generating, sample_completions
from nanoalign.rollout import split_completions
from nanoalign.sampler import filter_logits, sample, unsupported
from nanoalign.shapes import user_turn

from conftest import CORE_FAMILIES, FAMILIES, family_params, torchrun  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MAX_NEW_TOKENS = 20
# Prompts of different lengths (left padding), with one and with two images of different sizes.
PROMPTS = [
    ("How many shapes are in the image?", [(0, (112, 112))]),
    ("How many shapes are in these 2 images in total? Count carefully, then answer briefly.", [(1, (56, 84)), (2, (84, 56))]),
    ("Sides?", [(3, (56, 56))]),
]


def sharpen(model, factor: float = 6.0):
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(factor)
    return model


@pytest.fixture(scope="module")
def sharp(load_family):
    """sharp(name, factor=6) -> (processor, eval-mode sharpened model, stop ids), built once each."""
    built = {}

    def get(name: str, factor: float = 6.0):
        if (name, factor) not in built:
            processor, model, stop_ids = load_family(name)
            built[name, factor] = (processor, sharpen(model, factor), stop_ids)
        return built[name, factor]

    return get


@pytest.fixture(scope="module")
def prompts(make_image):
    """The PROMPTS as (messages, images) lists."""
    return [[user_turn(q, len(imgs))] for q, imgs in PROMPTS], [[make_image(s, size) for s, size in imgs] for _, imgs in PROMPTS]


def encode(processor, prompts, num_generations: int):
    """(the distinct prompts' batch, the P*G rows' batch), both left-padded as sample_completions builds them."""
    messages, images = prompts
    texts = [render(processor, m, add_generation_prompt=True) for m in messages]
    distinct = process_prompts(processor, texts, images, padding_side="left")
    rows = process_prompts(
        processor, [t for t in texts for _ in range(num_generations)], [i for i in images for _ in range(num_generations)], padding_side="left"
    )
    return distinct, rows


def hf_greedy(model, rows, stop_ids, pad_id, image_ids):
    """HF generate's greedy ids per row, cut after the first stop id or image token (where ours end)."""
    config = generation_config(max_new_tokens=MAX_NEW_TOKENS, temperature=1.0, top_p=1.0, greedy=True, stop_ids=stop_ids, pad_id=pad_id)
    with torch.no_grad():
        out = model.generate(**rows, generation_config=config)
    ids, has_eos = split_completions(out[:, rows["input_ids"].shape[1] :], stop_ids | image_ids)
    return ids, [eos and row[-1] in stop_ids for row, eos in zip(ids, has_eos)]


def sample_kwargs(processor, stop_ids, **overrides):
    kwargs = dict(max_new_tokens=MAX_NEW_TOKENS, stop_ids=stop_ids, pad_id=processor.tokenizer.pad_token_id, end_ids=image_token_ids(processor))
    return {**kwargs, **overrides}


@pytest.mark.parametrize("num_generations", [1, 3])
@pytest.mark.parametrize("name", CORE_FAMILIES)
def test_greedy_matches_hf_generate(name, num_generations, sharp, prompts):
    # Token for token, per row, with each row stopping on its own: besides the real stop ids, one
    # token of the first prompt's greedy path is made a stop id too (the first from its 3rd on with
    # which some rows stop and some run to the cap), so rows end at different steps (a sharp random
    # model seldom samples its real EOS).
    processor, model, real_stop_ids = sharp(name)
    distinct, rows = encode(processor, prompts, num_generations)
    assert len(set(distinct["attention_mask"].sum(1).tolist())) == len(PROMPTS)  # really left-padded
    first = sample(model, distinct, num_samples=1, greedy=True, **sample_kwargs(processor, real_stop_ids))
    for token in first.ids[0][2:]:
        stop_ids = real_stop_ids | {token}
        trial = sample(model, distinct, num_samples=1, greedy=True, **sample_kwargs(processor, stop_ids))
        if any(trial.has_eos) and any(len(ids) == MAX_NEW_TOKENS for ids in trial.ids):
            break

    ours = sample(model, distinct, num_samples=num_generations, greedy=True, **sample_kwargs(processor, stop_ids))
    our_state = getattr(model.model, "rope_deltas", None)  # Qwen's per-row M-RoPE shift, one per decoded row
    expected_ids, expected_eos = hf_greedy(model, rows, stop_ids, processor.tokenizer.pad_token_id, image_token_ids(processor))
    assert ours.ids == expected_ids
    if name == "tiny":
        assert torch.equal(our_state, model.model.rope_deltas)  # what generate leaves for the same rows
    assert ours.has_eos == expected_eos
    assert any(ours.has_eos) and any(len(ids) == MAX_NEW_TOKENS for ids in ours.ids)  # both ways of ending
    assert len({tuple(ids) for ids in ours.ids}) == len(PROMPTS)  # greedy: G equal rows per prompt, prompts differ


@pytest.mark.parametrize("name", CORE_FAMILIES)
def test_logps_equal_the_trainers_recomputed_logps(name, sharp, prompts):
    # The trainer (Policy on prompt + completion rows built by completion_batch, right-padded, no
    # cache) recomputes the sampler's fp32 log-probs of its own sampled ids at the same temperature.
    # top_p < 1 restricts what is sampled, not the log-probs: both are of softmax(z / T). Weights x3,
    # not x6: at x6 the logits are large enough for fp32 rounding alone to reach ~1e-5 in log-softmax.
    processor, model, stop_ids = sharp(name, 3.0)
    distinct, rows = encode(processor, prompts, 3)
    samples = sample(
        model, distinct, num_samples=3, temperature=0.7, top_p=0.9, with_logps=True,
        generator=torch.Generator().manual_seed(0), **sample_kwargs(processor, stop_ids),
    )  # fmt: skip
    rollout = Rollout(rows, samples.ids, samples.has_eos, texts=[])
    run = SimpleNamespace(processor=processor, cfg=SimpleNamespace(max_length=1024), pad_id=processor.tokenizer.pad_token_id, device="cpu")
    batch = completion_batch(rollout, run, mask_truncated=False)  # drops rows that sampled an image token
    with torch.no_grad():
        trainer_logps, _ = Policy(model)(**batch.model_inputs(), temperature=0.7, logps_mask=batch.mask)
    sampler_logps = completion_values(batch, rollout, samples.logps)
    counted = batch.mask.bool()
    image_ids = image_token_ids(processor)
    assert counted.sum() == sum(len(ids) for ids in samples.ids if not image_ids & set(ids)) > 0
    assert_close(sampler_logps[counted], trainer_logps[counted], atol=1e-5, rtol=0)


# Every family nanoalign's sampler serves (Gemma 3's token_type_ids and Qwen3.5's recurrent layers
# are refused by sampler.unsupported, so their rollouts carry no shared prompts).
@pytest.mark.parametrize("name", family_params(f for f in FAMILIES if f not in ("tiny-qwen3.5", "tiny-gemma3")))
def test_shared_prompt_forward_equals_whole_rows(name, sharp, prompts):
    # Training rows whose G completions share one prompt (an RL micro-batch): the policy reads each
    # prompt and image once and runs the completions on its repeated KV cache. Log-probs, entropies
    # and every parameter's gradient must equal the whole-row forward's, on prompts of different
    # lengths with one and two images, and the vision tower must see only the distinct images.
    processor, model, stop_ids = sharp(name, 3.0)
    distinct, rows = encode(processor, prompts, 3)
    samples = sample(model, distinct, num_samples=3, generator=torch.Generator().manual_seed(0), **sample_kwargs(processor, stop_ids))
    ids = [row[: max(1, len(row) - 2 * i)] for i, row in enumerate(samples.ids)]  # different lengths: right padding
    rollout = Rollout(rows, ids, [False] * len(ids), texts=[], shared_prompts=distinct)
    run = SimpleNamespace(processor=processor, cfg=SimpleNamespace(max_length=1024), pad_id=processor.tokenizer.pad_token_id, device="cpu")
    batch = completion_batch(rollout, run, mask_truncated=False)
    policy = Policy(model)
    weights = torch.rand(batch.mask.shape, generator=torch.Generator().manual_seed(1)) * batch.mask
    vision_inputs = []
    hook = vision_module(model).register_forward_pre_hook(lambda m, args, kwargs: vision_inputs.append(next(iter(kwargs.values()), None) if not args else args[0]), with_kwargs=True)
    results = []
    for inputs in (batch.model_inputs(), {k: v for k, v in batch.model_inputs().items() if k != "shared_prompts"}):
        model.zero_grad()
        logps, entropy = policy(**inputs, temperature=0.7, with_entropy=True, logps_mask=batch.mask)
        (logps * weights).sum().backward()
        results.append((logps, entropy, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    hook.remove()
    (shared, shared_entropy, shared_grads), (whole, whole_entropy, whole_grads) = results
    assert "shared_prompts" in batch.model_inputs()
    assert vision_inputs[0].shape[0] * 3 == vision_inputs[1].shape[0]  # the shared forward saw each image once
    assert_close(shared, whole, atol=2e-5, rtol=0)
    assert_close(shared_entropy, whole_entropy, atol=2e-5, rtol=0)
    assert shared_grads.keys() == whole_grads.keys() and any("visual" in n or "vision" in n for n in shared_grads)
    for n, grad in whole_grads.items():  # to rounding, on the scale of each tensor's gradient
        assert_close(shared_grads[n], grad, atol=1e-4 * float(grad.abs().max()) + 1e-6, rtol=0, msg=n)


def test_shared_prompt_forward_on_two_fsdp_ranks_equals_whole_rows(tiny_dirs, tmp_path):
    # Two forwards of every FSDP2 unit (prompts, then completions) before one backward: the gradients
    # summed over ranks must be the whole-row forward's.
    out = tmp_path / "result.pt"
    proc = torchrun(str(REPO / "tests" / "shared_prompts_worker.py"), str(tiny_dirs["tiny"]), str(out), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = torch.load(out, weights_only=False)
    shared, whole = result["shared"], result["whole"]
    assert result["world_size"] == 2 and shared["grads"].keys() == whole["grads"].keys() and whole["grads"]
    assert_close(shared["logps"], whole["logps"], atol=1e-5, rtol=0)
    for name, grad in whole["grads"].items():
        assert_close(shared["grads"][name], grad, atol=1e-4 * float(grad.abs().max()) + 1e-6, rtol=0, msg=name)


def test_seeded_sampling_is_reproducible(sharp, prompts):
    processor, model, stop_ids = sharp("tiny")
    distinct, _ = encode(processor, prompts, 4)
    kwargs = dict(num_samples=4, temperature=1.0, with_logps=True, **sample_kwargs(processor, stop_ids))
    a = sample(model, distinct, generator=torch.Generator().manual_seed(1), **kwargs)
    b = sample(model, distinct, generator=torch.Generator().manual_seed(1), **kwargs)
    c = sample(model, distinct, generator=torch.Generator().manual_seed(2), **kwargs)
    assert (a.ids, a.logps) == (b.ids, b.logps)
    assert a.ids != c.ids
    assert len({tuple(ids) for ids in a.ids[:4]}) > 1  # the G samples of one prompt differ
    torch.manual_seed(3)  # without a generator: the global RNG, as train.py seeds it
    d = sample(model, distinct, **kwargs)
    torch.manual_seed(3)
    assert sample(model, distinct, **kwargs).ids == d.ids


def test_filter_logits_keeps_top_k_then_nucleus():
    # probabilities 0.5, 0.3, 0.15, 0.05: the mass above each token is 0, 0.5, 0.8, 0.95, so
    # top_p = 0.75 keeps the first two; top_k = 3 drops the last.
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda **kw: torch.isfinite(filter_logits(logits, **kw))[0].tolist()  # noqa: E731
    assert kept() == [True] * 4
    assert kept(top_p=0.75) == [True, True, False, False]
    assert kept(top_k=3) == [True, True, True, False]
    assert kept(top_k=1, top_p=0.99) == [True, False, False, False]
    assert kept(top_p=1e-9) == [True, False, False, False]  # the most likely token always stays
    assert kept(top_p=0.0) == [True, False, False, False]  # even at 0 (was: every token masked, NaN probabilities)
    # Four equal tokens (0.25 each, exact in floating point): two of them reach 0.5, a third is not
    # needed (HF keeps two as well; which two is a matter of sort order).
    ties = torch.zeros(1, 4)
    assert torch.isfinite(filter_logits(ties, top_p=0.5)).sum() == 2 == torch.isfinite(TopPLogitsWarper(0.5)(None, ties)).sum()
    # The same nucleus as HF's TopPLogitsWarper on random logits.
    scores = torch.randn(16, 300) * 3
    for top_p in (0.3, 0.9):
        hf = TopPLogitsWarper(top_p)(None, scores.clone())
        assert torch.equal(torch.isfinite(filter_logits(scores, top_p=top_p)), torch.isfinite(hf))


def test_top_k_one_and_tiny_top_p_are_greedy(sharp, prompts):
    processor, model, stop_ids = sharp("tiny")
    distinct, _ = encode(processor, prompts, 2)
    kwargs = dict(num_samples=2, **sample_kwargs(processor, stop_ids))
    greedy = sample(model, distinct, greedy=True, **kwargs).ids
    assert sample(model, distinct, temperature=1.5, top_k=1, **kwargs).ids == greedy
    assert sample(model, distinct, temperature=1.5, top_p=1e-6, **kwargs).ids == greedy
    assert sample(model, distinct, temperature=1.5, **kwargs).ids != greedy  # unrestricted sampling differs


def test_sampled_image_token_ends_the_completion(sharp, prompts):
    # The model is made to sample the image placeholder (a large logit added in chosen forwards):
    # row 1 as its 4th token, every other row as its 7th. Each row ends there, keeps the token as
    # its last id, leaves the batch without being fed it (as input it would ask for image features
    # that do not exist), and decoding stops once every row has ended. completion_batch (the existing guard) then drops
    # these completions and trains nothing on them.
    processor, model, stop_ids = sharp("tiny")
    (image_id,) = image_token_ids(processor) - {processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")}
    num_forwards, fed = [], []

    def force_image_token(module, args, logits):
        num_forwards.append(1)
        if len(num_forwards) == 4:  # the prefill, then the 3rd decoding forward: picks row 1's 4th token
            logits[1, -1, image_id] += 1e4
        if len(num_forwards) == 7:  # every row still decoding (row 1 has left the batch)
            logits[:, -1, image_id] += 1e4
        return logits

    hooks = [
        model.lm_head.register_forward_hook(force_image_token),
        model.register_forward_pre_hook(lambda module, args, kwargs: fed.append(kwargs["input_ids"]), with_kwargs=True),
    ]
    try:
        messages, images = prompts
        rollout = sample_completions(
            model, processor, messages, images, num_generations=2, max_new_tokens=MAX_NEW_TOKENS, greedy=True,
            stop_ids=stop_ids, pad_id=processor.tokenizer.pad_token_id, device="cpu",
        )  # fmt: skip
    finally:
        for hook in hooks:
            hook.remove()
    assert [len(ids) for ids in rollout.completion_ids] == [7, 4, 7, 7, 7, 7]
    assert all(ids[-1] == image_id and image_id not in ids[:-1] for ids in rollout.completion_ids)
    assert not any(rollout.has_eos)
    assert len(num_forwards) == 7  # no forward after every row had ended
    assert [len(ids) for ids in fed] == [3, 6, 6, 6, 5, 5, 5]  # the 3 prompts, then the decoding batch
    assert all(image_id not in ids for ids in fed[1:])
    run = SimpleNamespace(processor=processor, cfg=SimpleNamespace(max_length=1024), pad_id=processor.tokenizer.pad_token_id, device="cpu")
    batch = completion_batch(rollout, run, mask_truncated=False)
    assert batch.num_skipped == 6 and batch.mask.sum() == 0
    with torch.no_grad():
        Policy(model)(**batch.model_inputs())  # as many image tokens as image features: no error


def test_flag_selects_hf_generate_and_unsupported_falls_back(sharp, prompts, monkeypatch):
    # --sampler hf and ours give the same greedy rollout (same prompt rows, same ids); a model the
    # sampler cannot serve is sampled with HF generate and the reason is reported.
    import nanoalign.rollout as rollout_module

    processor, model, stop_ids = sharp("tiny-llava")
    messages, images = prompts
    kwargs = dict(num_generations=2, max_new_tokens=MAX_NEW_TOKENS, greedy=True, stop_ids=stop_ids, pad_id=processor.tokenizer.pad_token_id, device="cpu")
    ran = []
    monkeypatch.setattr(rollout_module, "sample", lambda *a, **k: ran.append("ours") or sample(*a, **k))
    ours = sample_completions(model, processor, messages, images, **kwargs)
    theirs = sample_completions(model, processor, messages, images, sampler="hf", **kwargs)
    assert ran == ["ours"]  # the default is ours, --sampler hf is HF generate
    assert torch.equal(ours.prompt_enc["input_ids"], theirs.prompt_enc["input_ids"])
    assert (ours.completion_ids, ours.has_eos, ours.texts) == (theirs.completion_ids, theirs.has_eos, theirs.texts)

    distinct, _ = encode(processor, prompts, 1)
    assert unsupported(model, distinct) is None
    reason = unsupported(model, {**distinct, "token_type_ids": torch.zeros_like(distinct["input_ids"])})
    assert "token_type_ids" in reason
    reported = []
    monkeypatch.setattr(rollout_module, "unsupported", lambda *a: "no way")
    monkeypatch.setattr(rollout_module, "warn_fallback", reported.append)
    fallback = sample_completions(model, processor, messages, images, **kwargs)
    assert reported == ["no way"] and ran == ["ours"]
    assert fallback.completion_ids == theirs.completion_ids


def test_activation_checkpointing_and_train_mode_do_not_change_samples(load_family, prompts, dist_world):
    # Training mode with HF activation checkpointing drops the KV cache in every layer; the sampler
    # runs in eval mode and hands every module its mode back. Also through the FSDP2-sharded Policy
    # (Policy.sample goes through the root's hooks; a forward afterwards still works).
    from nanoalign.runtime import device_mesh

    processor, model, stop_ids = load_family("tiny")
    distinct, _ = encode(processor, prompts, 2)
    kwargs = dict(num_samples=2, greedy=True, **sample_kwargs(processor, stop_ids))
    expected = sample(sharpen(model), distinct, **kwargs).ids
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    assert sample(model, distinct, **kwargs).ids == expected
    assert all(m.training for m in model.modules())

    _, model, _ = load_family("tiny")
    model.train()
    _, world_size, device = dist_world
    policy = shard_policy(Policy(sharpen(model)), device_mesh(world_size, device), bf16=False, activation_checkpointing=True)
    messages, images = prompts
    with generating(policy):
        rollout = sample_completions(
            policy, processor, messages, images, num_generations=2, max_new_tokens=MAX_NEW_TOKENS, greedy=True,
            stop_ids=stop_ids, pad_id=processor.tokenizer.pad_token_id, device=device,
        )  # fmt: skip
    assert rollout.completion_ids == expected
    assert policy.hf.training
    logps, _ = policy(**{k: v for k, v in rollout.prompt_enc.items()})
    logps.sum().backward()  # training still works after sampling
