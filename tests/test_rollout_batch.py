"""In-process sampling of a whole generation round at once (rollout.sample_round, --rollout-batch-size)
against one micro-batch chunk at a time (rollout.sample_completions per chunk, the round before).

Sharp tiny models as in test_sampler.py: at the default init every row greedily repeats one token.
Chunks have prompts of different lengths and images of different sizes, so the round's one decode
batch is padded differently from each chunk: greedy ids must still be the same.
"""

import pytest
import torch
from test_sampler import sharpen

import nanoalign.sampler as sampler_module
from nanoalign.config import Config
from nanoalign.rollout import InProcess, sample_completions, sample_round
from nanoalign.shapes import user_turn

G = 2
MAX_NEW_TOKENS = 12
# 3 chunks of 2 prompts: lengths and image sizes differ within and across chunks.
QUESTIONS = [
    ("How many shapes are in the image?", (112, 112)),
    ("Sides?", (56, 56)),
    ("How many shapes are in this image? Count carefully, then answer briefly.", (84, 56)),
    ("What colour is the shape?", (56, 84)),
    ("How many sides does the shape have?", (112, 56)),
    ("Count.", (56, 112)),
]


@pytest.fixture(scope="module")
def setup(load_family, make_image):
    processor, model, stop_ids = load_family("tiny")
    samples = [{"prompt": [user_turn(q, 1)], "images": [make_image(i, size)], "sample_id": f"s{i}"} for i, (q, size) in enumerate(QUESTIONS)]
    chunks = [samples[i : i + 2] for i in range(0, len(samples), 2)]
    model = sharpen(model).eval()
    # A sharp random model seldom samples its real stop ids: make one token of some greedy path a stop id
    # too, so that rows end at different steps and leave the decode batch (the first that ends some
    # rows early and leaves others to the cap).
    greedy = per_chunk((processor, model, stop_ids, chunks), greedy=True)
    paths = [ids for r in greedy for ids in r.completion_ids]
    for token in (t for ids in paths for t in ids[2:]):
        lengths = [next((i + 1 for i, t in enumerate(ids) if t == token), len(ids)) for ids in paths]
        if min(lengths) < MAX_NEW_TOKENS == max(lengths):
            return processor, model, stop_ids | {token}, chunks
    raise AssertionError("no token of the greedy paths ends some rows early and leaves others to the cap")


def per_chunk(setup, **kwargs):
    processor, model, stop_ids, chunks = setup
    return [
        sample_completions(model, processor, [s["prompt"] for s in c], [s["images"] for s in c], num_generations=G,
                           max_new_tokens=MAX_NEW_TOKENS, stop_ids=stop_ids, pad_id=processor.tokenizer.pad_token_id,
                           device="cpu", **kwargs)
        for c in chunks
    ]


def batched(setup, max_rows: int, **kwargs):
    processor, model, stop_ids, chunks = setup
    return sample_round(model, processor, chunks, num_generations=G, max_rows=max_rows, max_new_tokens=MAX_NEW_TOKENS,
                        temperature=1.0, top_p=1.0, stop_ids=stop_ids, pad_id=processor.tokenizer.pad_token_id,
                        device="cpu", **kwargs)  # fmt: skip


def assert_same_rollouts(ours, reference):
    assert len(ours) == len(reference)
    for a, b in zip(ours, reference):
        assert a.completion_ids == b.completion_ids and a.has_eos == b.has_eos and a.texts == b.texts
        assert a.prompt_enc.keys() == b.prompt_enc.keys() and a.shared_prompts.keys() == b.shared_prompts.keys()
        for key in a.prompt_enc:
            assert torch.equal(a.prompt_enc[key], b.prompt_enc[key]), key
        for key in a.shared_prompts:
            assert torch.equal(a.shared_prompts[key], b.shared_prompts[key]), key


@pytest.mark.parametrize("max_rows", [0, 2 * G, 4 * G])  # all 6 prompts in one batch; 2 per batch (3 batches); 4 then 2
def test_greedy_round_gives_the_ids_of_chunk_by_chunk_sampling(setup, max_rows):
    reference = per_chunk(setup, greedy=True)
    assert len({tuple(ids) for r in reference for ids in r.completion_ids}) == len(QUESTIONS)  # the paths differ per prompt
    lengths = [len(ids) for r in reference for ids in r.completion_ids]
    assert min(lengths) < MAX_NEW_TOKENS == max(lengths) and any(e for r in reference for e in r.has_eos)  # rows end apart
    assert_same_rollouts(batched(setup, max_rows, greedy=True), reference)


def test_seeded_round_of_one_chunk_per_batch_reproduces_chunk_by_chunk_sampling(setup):
    # The RNG is drawn step by step over the decode batch, so only a batch of one chunk draws it in the
    # order chunk-by-chunk sampling does; then the samples are the same, not just equally distributed.
    torch.manual_seed(5)
    reference = per_chunk(setup)
    torch.manual_seed(5)
    assert_same_rollouts(batched(setup, max_rows=2 * G), reference)
    # One batch of all rows: other samples than chunk by chunk, but the same ones again under the same seed.
    torch.manual_seed(5)
    whole = batched(setup, max_rows=0)
    torch.manual_seed(5)
    again = batched(setup, max_rows=0)
    assert_same_rollouts(again, whole)
    assert [r.completion_ids for r in whole] != [r.completion_ids for r in reference]


def test_in_process_backend_decodes_the_round_in_one_batch_up_to_the_cap(setup, monkeypatch):
    processor, model, stop_ids, chunks = setup
    calls = []
    real = sampler_module.sample

    def counting(hf_model, prompt_enc, **kwargs):
        calls.append(prompt_enc["input_ids"].shape[0] * kwargs["num_samples"])  # rows decoded together
        return real(hf_model, prompt_enc, **kwargs)

    monkeypatch.setattr("nanoalign.rollout.sample", counting)
    for cap, expected in [(0, [12]), (8, [8, 4]), (4, [4, 4, 4])]:
        calls.clear()
        cfg = Config(sampler="nanoalign", rollout_batch_size=cap)
        backend = InProcess(cfg, model, processor, stop_ids=stop_ids, pad_id=processor.tokenizer.pad_token_id, device="cpu")
        rollouts = backend.sample(chunks, G, max_tokens=4, temperature=1.0, top_p=1.0)
        assert calls == expected
        assert [r.sample_ids for r in rollouts] == [[f"s{i} (completion {g})" for i in (2 * c, 2 * c + 1) for g in range(G)] for c in range(3)]
