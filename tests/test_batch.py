"""Tests for nanoalign/batch.py on both tiny families (Qwen2.5-VL and LLaVA): the loss mask counts
assistant tokens and nothing else, image tokens match the vision tower's features row by row, each
row gets its own images, and over-long rows are cut, refused or skipped as documented."""

from functools import partial

import pytest
import torch
from torch.testing import assert_close

from nanoalign.batch import check_prompt_fits, encode_conversations, image_token_ids, render
from nanoalign.data import BadSampleError, fetch_samples, num_placeholders
from nanoalign.model import Policy

from conftest import CORE_FAMILIES  # noqa: E402
END_OF_TURN = {"tiny": "<|im_end|>", "tiny-llava": "</s>"}


def user(text, num_images=0):
    return {"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": text}]}


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def samples(make_image):
    """A: one 112x112 image, one answer.  B: a 112x112 and a 168x84 image, two answers (multi-turn).
    C: one 112x112 image, a very short conversation. D, E: three turns (LLaVA-Instruct style) whose
    second user turn brings a new image; E's first turn has one too, of another size."""
    return {
        "A": ([user("How many shapes are in the image?", 1), assistant("<think>I count 2 shapes.</think> The answer is \\boxed{2}.")],
              [make_image(1)]),
        "B": ([user("How many shapes are in these 2 images in total?", 2), assistant("The answer is \\boxed{4}."),
               user("How many sides does the shape have?"), assistant("The shape has 4 sides.")],
              [make_image(2), make_image(3, (168, 84))]),
        "C": ([user("How many?", 1), assistant("2")], [make_image(4)]),
        "D": ([user("Can you count shapes?"), assistant("Yes, show me a picture."), user("How many here?", 1),
               assistant("I count 2 shapes."), user("And their colour?"), assistant("Both are red.")],
              [make_image(5)]),
        "E": ([user("How many shapes?", 1), assistant("2"), user("And in this one?", 1), assistant("There are 3."),
               user("Which has more?"), assistant("The second image.")],
              [make_image(6, (168, 84)), make_image(7)]),
    }  # fmt: skip


@pytest.fixture(scope="module", params=CORE_FAMILIES)
def family(request, load_family):
    processor, model, stop_ids = load_family(request.param)
    return request.param, processor, model, stop_ids


def encode(family, samples, names, max_length=512):
    _, processor, _, stop_ids = family
    return encode_conversations(
        processor, [samples[n][0] for n in names], [samples[n][1] for n in names], [f"sample {n}" for n in names],
        max_length=max_length, stop_ids=stop_ids,
    )  # fmt: skip


def image_token_id(processor) -> int:
    return processor.tokenizer.convert_tokens_to_ids(processor.image_token)


def prompt_length(processor, messages, images) -> int:
    """Tokens of the first prompt alone (chat template + generation prompt, image tokens expanded)."""
    text = render(processor, messages[:1], add_generation_prompt=True)
    enc = processor(text=[text], images=[images], return_tensors="pt", add_special_tokens=False)
    return enc["input_ids"].shape[1]


def image_features_per_image(name, model, mm_inputs) -> list[int]:
    """How many feature vectors the vision tower returns for each image of the batch, in order."""
    with torch.no_grad():
        if name == "tiny":
            out = model.model.get_image_features(pixel_values=mm_inputs["pixel_values"], image_grid_thw=mm_inputs["image_grid_thw"])
        else:
            out = model.model.get_image_features(pixel_values=mm_inputs["pixel_values"])
    return [len(f) for f in out.pooler_output]


def runs(mask_row: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each run of consecutive 1s."""
    out, start = [], None
    for t, m in enumerate(mask_row.tolist() + [0.0]):
        if m and start is None:
            start = t
        elif not m and start is not None:
            out.append((start, t))
            start = None
    return out


# -----------------------------------------------------------------------------
# the loss mask


def test_loss_mask_counts_assistant_tokens_only(family, samples):
    name, processor, model, _ = family
    tok = processor.tokenizer
    eot = END_OF_TURN[name]
    batch = encode(family, samples, ["A", "B"])
    assert batch.num_truncated == 0 and batch.num_skipped == 0
    assert batch.mask.shape == batch.input_ids.shape == batch.attention_mask.shape
    assert set(batch.mask.unique().tolist()) <= {0.0, 1.0}

    # Image tokens, padding: never counted. (Row A is shorter than B, so it has padding to check.)
    is_image = batch.input_ids == image_token_id(processor)
    assert is_image.any(1).all()
    assert batch.mask[is_image].sum() == 0
    padding = batch.attention_mask == 0
    assert padding[0].any(), "row A should be padded (shorter than B)"
    assert batch.mask[padding].sum() == 0
    assert (batch.input_ids[padding] == tok.pad_token_id).all()

    for row, key in enumerate(["A", "B"]):
        messages, images = samples[key]
        # Every prompt token (system, user text, image placeholders, generation prompt) has mask 0,
        # and the first answer token right after the prompt has mask 1.
        num_prompt = prompt_length(processor, messages, images)
        assert batch.mask[row, :num_prompt].sum() == 0
        assert batch.mask[row, num_prompt] == 1
        # The counted tokens decode to exactly the assistant texts, each followed by its end-of-turn token.
        answers = [m["content"][0]["text"] for m in messages if m["role"] == "assistant"]
        counted = batch.input_ids[row][batch.mask[row].bool()]
        assert tok.decode(counted) == "".join(a + eot for a in answers)
        # One run of counted tokens per assistant turn (B: 2), each ending on the end-of-turn token.
        spans = runs(batch.mask[row])
        assert len(spans) == len(answers)
        for (start, end), answer in zip(spans, answers):
            assert tok.decode(batch.input_ids[row, start:end]) == answer + eot
        # Between B's two answers: the follow-up user turn is in the row but not counted.
        if len(spans) == 2:
            gap = tok.decode(batch.input_ids[row, spans[0][1] : spans[1][0]])
            assert "How many sides does the shape have?" in gap

    if name == "tiny":  # Qwen's template writes "<|im_end|>\n": the newline is in the row, never counted
        im_end = tok.convert_tokens_to_ids("<|im_end|>")
        ends = ((batch.input_ids == im_end) & (batch.mask == 1)).nonzero().tolist()
        assert len(ends) == 3  # A: 1 answer, B: 2 answers
        for row, t in ends:
            assert tok.decode(batch.input_ids[row, t + 1]) == "\n"
            assert batch.mask[row, t + 1] == 0


def test_image_tokens_match_vision_features_per_sample(family, samples):
    name, processor, model, _ = family
    batch = encode(family, samples, ["A", "B"])
    per_image = image_features_per_image(name, model, batch.mm_inputs)
    # Images are in batch order: A's one, then B's two.
    if name == "tiny":
        # Qwen: 14 px patches merged 2x2. 112x112 -> 8x8 patches / 4 = 16; 168x84 -> 12x6 / 4 = 18.
        assert per_image == [16, 16, 18]
        assert batch.mm_inputs["image_grid_thw"].tolist() == [[1, 8, 8], [1, 8, 8], [1, 6, 12]]
    else:
        # LLaVA: every image resized/cropped to 56x56, 14 px patches, CLS dropped: (56/14)^2 = 16.
        assert per_image == [16, 16, 16]
    per_sample = [per_image[0], per_image[1] + per_image[2]]
    num_image_tokens = (batch.input_ids == image_token_id(processor)).sum(1).tolist()
    assert num_image_tokens == per_sample

    # A forward pass runs on the built batch (the model itself checks tokens against features).
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits
    assert logits.shape[:2] == batch.input_ids.shape and torch.isfinite(logits).all()


def test_rows_get_their_own_images(family, samples):
    # Row B's log-probs in a batch [A, B] equal B's alone; row A (padded in [A, B]) equals A alone.
    # Any mix-up of images (or of per-token extras like Qwen's mm_token_type_ids) across rows, or
    # padding leaking into a row, would change them.
    _, _, model, _ = family
    policy = Policy(model, logps_chunk_size=7)
    both = encode(family, samples, ["A", "B"])
    with torch.no_grad():
        logps_both, _ = policy(**both.model_inputs())
        for row, key in enumerate(["A", "B"]):
            alone = encode(family, samples, [key])
            logps_alone, _ = policy(**alone.model_inputs())
            length = alone.input_ids.shape[1]
            assert torch.equal(both.input_ids[row, :length], alone.input_ids[0])
            assert torch.equal(both.mask[row, :length], alone.mask[0])
            assert_close(logps_both[row, :length], logps_alone[0], atol=1e-5, rtol=0)
    # Sanity: the images matter, so the check above can fail. With A's image in place of B's first
    # image (same size), B's answer log-probs change.
    swapped = dict(samples, B=(samples["B"][0], [samples["A"][1][0], samples["B"][1][1]]))
    with torch.no_grad():
        logps_swapped, _ = policy(**encode(family, swapped, ["B"]).model_inputs())
        logps_b, _ = policy(**encode(family, samples, ["B"]).model_inputs())
    assert (logps_swapped - logps_b).abs().max() > 1e-4


def test_images_in_later_turns_stand_where_their_turn_puts_them(family, samples):
    # A later user turn brings a new image (D, E). Each row is, piece by piece, every prompt (the
    # turns up to an assistant turn, with the generation prompt) as the processor makes it with its
    # own images, then the answer as the tokenizer makes it (as for single-turn rows); the loss mask
    # is 1 exactly from each answer's first token through its end-of-turn token (the first stop
    # token). Also run on every other family (test_families.py).
    _, processor, model, stop_ids = family
    tok = processor.tokenizer
    batch = encode(family, samples, ["D", "E"])
    policy = Policy(model, logps_chunk_size=7)
    with torch.no_grad():
        logps, _ = policy(**batch.model_inputs())
    for row, key in enumerate(["D", "E"]):
        messages, images = samples[key]
        ids, mask, done, done_turns = [], [], "", 0
        for i in [i for i, m in enumerate(messages) if m["role"] == "assistant"]:
            before, through = render(processor, messages[:i], True), render(processor, messages[: i + 1], False)
            own = images[num_placeholders(messages[:done_turns]) : num_placeholders(messages[:i])]
            prompt = processor(text=[before[len(done) :]], images=[own] if own else None, add_special_tokens=False)["input_ids"][0]
            answer = tok(through[len(before) :], add_special_tokens=False)["input_ids"]
            stop = next(t for t, x in enumerate(answer) if x in stop_ids)
            ids += prompt + answer
            mask += [0.0] * len(prompt) + [1.0] * (stop + 1) + [0.0] * (len(answer) - stop - 1)
            done, done_turns = through, i + 1
        length = len(ids)
        assert batch.input_ids[row, :length].tolist() == ids and batch.attention_mask[row, length:].sum() == 0
        assert batch.mask[row].tolist() == mask + [0.0] * (batch.mask.shape[1] - length)
        assert len(runs(batch.mask[row])) == 3
        # The same text, image tokens included, as the processor makes of the whole conversation at
        # once (it may merge a template's trailing space into the next word: LLaVA's "ASSISTANT: ") ...
        whole = processor(text=[render(processor, messages, False)], images=[images], return_tensors="pt", add_special_tokens=False)
        assert tok.decode(ids) == tok.decode(whole["input_ids"][0])
        # ... and the vision features land where their tokens stand: the row's log-probs with the
        # whole conversation's image inputs are the batch's.
        per_image = {k: v for k, v in whole.items() if v.shape[:2] != whole["input_ids"].shape}
        per_token = {k: v[row : row + 1, :length] for k, v in batch.model_inputs().items() if k not in per_image}
        with torch.no_grad():
            assert_close(logps[row, :length], policy(**per_token, **per_image)[0][0], atol=2e-5, rtol=0)

    # --skip-bad-samples: a sample whose later image would be cut (or that cannot be built at all,
    # here an image in an assistant turn) is refused when fetched, and the fetch takes the next one.
    image_at = torch.isin(batch.input_ids[0], torch.tensor(sorted(image_token_ids(processor)))).nonzero()
    max_length = int(image_at.max())  # D's last image token lands just past max_length
    check = partial(check_prompt_fits, processor, max_length, "sft")
    sample_d = {"sample_id": "sample D", "messages": samples["D"][0], "images": samples["D"][1]}
    with pytest.raises(BadSampleError, match=r"^sample D: .* image tokens lie past --max-length"):
        check(sample_d)
    check_prompt_fits(processor, max_length + 1, "sft", sample_d)
    drawing = [user("Draw one."), {"role": "assistant", "content": [{"type": "image"}, {"type": "text", "text": "Here."}]}]
    raw = [{"messages": samples["D"][0], "images": samples["D"][1]}, {"messages": drawing, "images": samples["C"][1]},
           {"messages": samples["C"][0], "images": samples["C"][1]}]  # fmt: skip
    fetched, num_skipped = fetch_samples(raw, [0, 1], "sft", "train", skip_bad=True, check=check)
    assert num_skipped == 3 and [s["index"] for s in fetched] == [2, 2]  # 0 -> 1 -> 2, and 1 -> 2
    with pytest.raises(BadSampleError, match=r"^sample 1 of split 'train': an assistant turn holds an image"):
        fetch_samples(raw, [1], "sft", "train", skip_bad=False, check=check)
    # As an RL prompt (everything before the last answer), the conversation is checked whole.
    prompt = {"sample_id": "sample D", "prompt": samples["D"][0][:-1], "images": samples["D"][1]}
    text = render(processor, prompt["prompt"], add_generation_prompt=True)
    prompt_len = len(processor(text=[text], images=[prompt["images"]], add_special_tokens=False)["input_ids"][0])
    check_prompt_fits(processor, prompt_len + 1, "rl", prompt)
    with pytest.raises(BadSampleError, match=f"^sample D: the prompt is {prompt_len} tokens"):
        check_prompt_fits(processor, prompt_len, "rl", prompt)


# -----------------------------------------------------------------------------
# truncation


def test_cut_image_tokens_raise_naming_sample(family, samples):
    _, processor, _, _ = family
    full = encode(family, samples, ["A"])
    image_positions = (full.input_ids[0] == image_token_id(processor)).nonzero().flatten()
    max_length = int(image_positions[-1])  # the last image token lands just past max_length
    with pytest.raises(BadSampleError) as err:
        encode(family, samples, ["A"], max_length=max_length)
    message = str(err.value)
    assert message.startswith("sample A: ")
    assert "--max-length" in message and "1 image tokens" in message and "--skip-bad-samples" in message


def test_skipped_overlong_sample_is_replaced_when_fetched_and_costs_the_batch_nothing(family, samples):
    # --skip-bad-samples: check_prompt_fits refuses B (its image tokens lie past max_length) when it
    # is fetched, and the fetch takes the next good sample instead; the batch never holds B's row,
    # so it is not padded to B's length.
    name, processor, _, stop_ids = family
    max_length = encode(family, samples, ["C"]).input_ids.shape[1]  # C fits exactly
    full_b = encode(family, samples, ["B"])
    last_image = int((full_b.input_ids[0] == image_token_id(processor)).nonzero().max())
    assert last_image >= max_length, "B's image tokens must overflow for the test to mean anything"
    sample = lambda n: {"sample_id": f"sample {n}", "messages": samples[n][0], "images": samples[n][1]}  # noqa: E731
    check = partial(check_prompt_fits, processor, max_length, "sft")
    with pytest.raises(BadSampleError, match="sample B: .* image tokens lie past --max-length"):
        check(sample("B"))
    check(sample("C"))  # fits: no error

    raw = [{"messages": samples[n][0], "images": samples[n][1]} for n in ("B", "C")]
    fetched, num_skipped = fetch_samples(raw, [0, 1], "sft", "train", skip_bad=True, check=check)
    assert num_skipped == 1 and [s["index"] for s in fetched] == [1, 1]  # B replaced by the next good one
    batch = encode_conversations(processor, [s["messages"] for s in fetched], [s["images"] for s in fetched],
                                 [s["sample_id"] for s in fetched], max_length=max_length, stop_ids=stop_ids)  # fmt: skip
    assert batch.input_ids.shape[1] == max_length < full_b.input_ids.shape[1]
    with pytest.raises(BadSampleError, match="sample 0 of split 'train'"):  # without the flag: a named error
        fetch_samples(raw, [0], "sft", "train", skip_bad=False, check=check)


def test_rl_prompt_needs_room_for_a_completion(family, samples):
    _, processor, _, _ = family
    messages, images = samples["C"]
    prompt_len = prompt_length(processor, messages, images)
    sample = {"sample_id": "sample C", "prompt": messages[:1], "images": images}
    check_prompt_fits(processor, prompt_len + 1, "rl", sample)  # one completion token fits
    with pytest.raises(BadSampleError, match=f"sample C: the prompt is {prompt_len} tokens .* --skip-bad-samples"):
        check_prompt_fits(processor, prompt_len, "rl", sample)


def test_answer_overflow_is_truncated_and_counted(family, samples):
    name, processor, model, _ = family
    messages, images = samples["A"]
    full = encode(family, samples, ["A"])
    num_prompt = prompt_length(processor, messages, images)
    max_length = num_prompt + 2  # room for two answer tokens
    assert full.input_ids.shape[1] > max_length
    batch = encode(family, samples, ["A"], max_length=max_length)
    assert batch.num_truncated == 1 and batch.num_skipped == 0
    assert batch.input_ids.shape == (1, max_length)
    assert torch.equal(batch.input_ids[0], full.input_ids[0, :max_length])  # a prefix of the full row
    assert batch.mask[0].tolist() == [0.0] * num_prompt + [1.0, 1.0]
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits
    assert torch.isfinite(logits).all()


# -----------------------------------------------------------------------------
# chat templates


def test_llava_template_renders_a_system_turn_as_system(load_family):
    processor, _, _ = load_family("tiny-llava")
    text = render(processor, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], True)
    assert text == "SYSTEM: Be brief. USER: Hi ASSISTANT: "
