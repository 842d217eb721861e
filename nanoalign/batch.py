"""The multimodal batch builder: samples -> model inputs + a loss mask, through the model's own processor.

Every row is built as   prompt tokens  +  completion tokens   and nothing else:

  * the prompt (chat template with the generation prompt, images included) goes through the
    checkpoint's processor, which expands each image placeholder into the right number of image
    tokens and returns pixel_values / image_grid_thw / ... collated the family's own way. We never
    expand image tokens by hand, so any transformers VLM whose processor does this works.
  * completions (assistant turns) are text only and go through the tokenizer. In RL they are the
    sampled token ids themselves, never re-tokenised text.

Building rows by concatenation (as TRL does for DPO and GRPO) makes the loss mask exact by
construction: a token counts iff it belongs to an assistant turn, up to and including the turn's
stop token (<|im_end|> for Qwen). Prompt, image placeholder and pad tokens never count.

A conversation with several assistant turns is prompt + (answer, follow-up prompt)*, every answer
counted; a follow-up prompt that brings images goes through the processor too, so each image's
tokens stand where its turn puts it (LLaVA-Instruct-style data).
Rows longer than max_length lose their tail text (counted in `num_truncated`); a row whose image
tokens would be cut is refused with an error naming the sample. With --skip-bad-samples such a
sample never gets here: `check_prompt_fits` finds it when it is fetched, and the fetch replaces it
(so a skipped sample costs nothing in the batch it would have been padded into).
"""

from dataclasses import dataclass, field

import torch

from nanoalign.data import BadSampleError, num_placeholders

# Batch fields of their own; every other per-token processor output (e.g. mm_token_type_ids) goes
# into mm_inputs next to the per-image ones (pixel_values, image_grid_thw, ...).
ROW_KEYS = ("input_ids", "attention_mask")


@dataclass
class Batch:
    """Model inputs for B right-padded rows, and which tokens count in the loss."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T) 1 on real tokens
    mask: torch.Tensor  # (B, T) float, 1 on the tokens the loss counts
    mm_inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # pixel_values, image_grid_thw, ...
    sample_ids: list[str] = field(default_factory=list)
    num_truncated: int = 0  # rows whose tail text was cut at max_length
    num_skipped: int = 0  # rows kept with an all-zero mask (RL: a completion that sampled an image token)
    # RL rows in groups that share one prompt: the distinct prompts' processor batch, so the policy
    # reads each prompt once (model.shared_prompt_hidden); empty: each row is forwarded whole.
    shared_prompts: dict[str, torch.Tensor] = field(default_factory=dict)

    def model_inputs(self) -> dict:
        inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask, **self.mm_inputs}
        return {**inputs, "shared_prompts": self.shared_prompts} if self.shared_prompts else inputs

    def to(self, device) -> "Batch":
        move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return Batch(
            move(self.input_ids), move(self.attention_mask), move(self.mask),
            {k: move(v) for k, v in self.mm_inputs.items()}, self.sample_ids, self.num_truncated, self.num_skipped,
            {k: move(v) for k, v in self.shared_prompts.items()},
        )  # fmt: skip


def render(processor, messages: list[dict], add_generation_prompt: bool) -> str:
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _suffix(text: str, prefix: str, sample_id: str) -> str:
    if not text.startswith(prefix):
        raise BadSampleError(
            f"{sample_id}: the chat template renders a conversation's prefix differently from the whole "
            "conversation, so prompt and answer tokens cannot be told apart; use a template whose "
            "rendering of the first k turns is a prefix of the rendering of k+1 turns"
        )
    return text[len(prefix) :]


def conversation_segments(processor, messages: list[dict], sample_id: str, last_turn_only: bool):
    """Split a conversation into the text segments its row is built from.

    Returns [(segment_text, counts_in_loss, num_images)]: segments alternate prompt (the turns up
    to an assistant turn, with the generation prompt; never counted) and answer (counted, unless
    last_turn_only and not the last). num_images: the image placeholders in a prompt's turns, whose
    images it takes in order. Turns after the last assistant turn are dropped, images included:
    nothing is learned from them.
    """
    answer_at = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not answer_at or answer_at[0] == 0:
        raise BadSampleError(f"{sample_id}: a conversation needs a user turn followed by an assistant turn")
    if num_placeholders([messages[i] for i in answer_at]):
        raise BadSampleError(f"{sample_id}: an assistant turn holds an image; images belong in the user turns")
    segments, rendered, start = [], "", 0
    for k, i in enumerate(answer_at):
        before = render(processor, messages[:i], add_generation_prompt=True)
        segments.append((_suffix(before, rendered, sample_id), False, num_placeholders(messages[start:i])))
        through = render(processor, messages[: i + 1], add_generation_prompt=False)
        segments.append((_suffix(through, before, sample_id), not last_turn_only or k == len(answer_at) - 1, 0))
        rendered, start = through, i + 1
    return segments


def answer_mask(token_ids: list[int], stop_ids: set[int]) -> list[int]:
    """1 for an answer's tokens up to and including its first stop token, 0 after it.

    Templates add text after the end-of-turn token (Qwen: a newline); the model never generates it,
    so it must not be trained on either.
    """
    mask, stopped = [], False
    for tok in token_ids:
        mask.append(0 if stopped else 1)
        stopped = stopped or tok in stop_ids
    return mask


def process_prompts(processor, prompt_texts: list[str], images: list[list], padding_side: str = "right") -> dict:
    """Run the processor on rendered prompts and their images: the only place images are processed.

    Returns the processor's own batch (input_ids, attention_mask, pixel_values, ...), padded on
    `padding_side` (left for generation, right for training rows).
    """
    kwargs = {"images": images} if any(images) else {}
    return processor(
        text=prompt_texts, padding=True, padding_side=padding_side, return_tensors="pt", add_special_tokens=False, **kwargs
    )


def _unpad_rows(enc: dict) -> list[dict[str, torch.Tensor]]:
    """Per-row 1-D tensors for every per-token key of a processor batch, padding removed."""
    ids = enc["input_ids"]
    per_token = [k for k, v in enc.items() if isinstance(v, torch.Tensor) and v.shape[:2] == ids.shape]
    keep = enc["attention_mask"].bool()
    return [{k: enc[k][b][keep[b]] for k in per_token} for b in range(ids.shape[0])]


def image_token_ids(processor) -> set[int]:
    """Ids of the tokens that stand for image (or video) features; cutting any of them is an error.

    The processor's own declaration (`image_token_ids` / `video_token_ids`, the ids it marks in
    mm_token_type_ids) comes first: for Gemma 3 `processor.image_token` is the begin-of-image marker
    the chat template writes, not the soft token the vision features replace.
    """
    tok = processor.tokenizer
    declared = [*getattr(processor, "image_token_ids", []), *getattr(processor, "video_token_ids", [])]
    if not any(i is not None for i in declared):  # a processor that declares none: look its tokens up by name
        declared = [tok.convert_tokens_to_ids(n) for n in (getattr(processor, a, None) for a in ("image_token", "video_token")) if n]
    return set(declared) - {tok.unk_token_id, None}


def _with_text(row: dict[str, torch.Tensor], ids: list[int]) -> dict[str, torch.Tensor]:
    """A row's per-token tensors extended by text tokens: attention 1, any other per-token output
    (e.g. Qwen's mm_token_type_ids) 0 ("text")."""
    ids = torch.tensor(ids, dtype=torch.long)
    return {k: torch.cat([v, ids if k == "input_ids" else torch.full_like(ids, int(k == "attention_mask"))]) for k, v in row.items()}


def pack_rows(processor, prompt_enc: dict, tails: list[list[int]], tail_masks: list[list[int]], sample_ids: list[str],
              max_length: int, pad_id: int) -> Batch:  # fmt: skip
    """Rows = unpadded processor prompt b + tails[b], right-padded, with the loss mask tail_masks[b]."""
    rows = [_with_text(row, tail) for row, tail in zip(_unpad_rows(prompt_enc), tails)]
    masks = [[0] * (len(row["input_ids"]) - len(m)) + list(m) for row, m in zip(rows, tail_masks)]
    return _pad_rows(processor, prompt_enc, rows, masks, sample_ids, max_length, pad_id)


def _pad_rows(processor, enc: dict, rows: list[dict[str, torch.Tensor]], masks: list[list[int]], sample_ids: list[str],
              max_length: int, pad_id: int) -> Batch:  # fmt: skip
    """Unpadded rows (per-token tensors) cut at max_length and right-padded into a Batch.

    Per-image processor outputs of `enc` (pixel_values, image_grid_thw, ...) pass through unchanged:
    they follow the image tokens' order, row by row, which cutting text never changes.
    """
    image_ids = torch.tensor(sorted(image_token_ids(processor)))
    num_truncated = 0
    packed = []
    for b, full in enumerate(rows):
        mask = torch.tensor(masks[b], dtype=torch.float)
        if len(mask) > max_length:
            cut_images = torch.isin(full["input_ids"][max_length:], image_ids).sum().item()
            if cut_images:
                raise BadSampleError(
                    f"{sample_ids[b]}: {len(mask)} tokens, and {cut_images} image tokens lie past --max-length "
                    f"{max_length}. Raise --max-length, give the processor a smaller max_pixels, or pass "
                    "--skip-bad-samples to skip such samples."
                )
            num_truncated += 1
            full, mask = {k: v[:max_length] for k, v in full.items()}, mask[:max_length]
        packed.append((full, mask))
    length = max(len(m) for _, m in packed)
    out = {}
    for key in packed[0][0]:
        fill = pad_id if key == "input_ids" else 0
        out[key] = torch.stack([torch.nn.functional.pad(r[key], (0, length - len(r[key])), value=fill) for r, _ in packed])
    mask = torch.stack([torch.nn.functional.pad(m, (0, length - len(m))) for _, m in packed])
    mm_inputs = {k: v for k, v in enc.items() if k not in out}
    mm_inputs.update({k: v for k, v in out.items() if k not in ROW_KEYS})
    return Batch(out["input_ids"], out["attention_mask"], mask, mm_inputs, list(sample_ids), num_truncated)


def encode_conversations(processor, conversations: list[list[dict]], images: list[list], sample_ids: list[str], *,
                         max_length: int, stop_ids: set[int], last_turn_only: bool = False) -> Batch:  # fmt: skip
    """SFT / preference rows, segment by segment (conversation_segments), each image where its turn puts it.

    The first prompt and every later prompt that holds images go through the processor, in one call
    for the batch (so each image's tokens are expanded where they stand, and the per-image outputs
    follow the rows' order); answers and text-only prompts are tokenised. last_turn_only counts only
    the final assistant turn (preference completions); otherwise every assistant turn counts (SFT).
    """
    tokenizer = processor.tokenizer
    rows_segments = [conversation_segments(processor, m, s, last_turn_only) for m, s in zip(conversations, sample_ids)]
    texts, text_images = [], []
    for segments, row_images in zip(rows_segments, images):
        used = 0
        for k, (text, _, num_images) in enumerate(segments):
            if k == 0 or num_images:
                texts.append(text)
                text_images.append(row_images[used : used + num_images])
                used += num_images
    enc = process_prompts(processor, texts, text_images)
    processed = iter(_unpad_rows(enc))
    rows, masks = [], []
    for segments in rows_segments:
        row, mask = None, []
        for k, (text, counts, num_images) in enumerate(segments):
            if k == 0 or num_images:
                piece = next(processed)
                row = piece if row is None else {key: torch.cat([row[key], piece[key]]) for key in row}
                mask += [0] * len(piece["input_ids"])
            else:
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                row = _with_text(row, ids)
                mask += answer_mask(ids, stop_ids) if counts else [0] * len(ids)
        rows.append(row)
        masks.append(mask)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return _pad_rows(processor, enc, rows, masks, sample_ids, max_length, pad_id)


def check_prompt_fits(processor, max_length: int, fmt: str, sample: dict) -> None:
    """Refuse (BadSampleError) a sample whose rows cannot be built under max_length.

    SFT / preference: the sample's rows are built as the batch will build them, so whatever would
    refuse it there (image tokens past max_length, a chat template that splits turns badly) refuses
    it here. An RL prompt (all of it goes through the processor) needs room for at least one
    completion token, as nothing is generated for a prompt that cannot be trained on. Called when
    samples are fetched (data.fetch_samples), so --skip-bad-samples replaces such a sample before
    any work is done on it.
    """
    if fmt != "rl":
        rows = [sample["messages"]] if fmt == "sft" else [sample["prompt"] + sample[k] for k in ("chosen", "rejected")]
        encode_conversations(processor, rows, [sample["images"]] * len(rows), [sample["sample_id"]] * len(rows),
                             max_length=max_length, stop_ids=set(), last_turn_only=fmt != "sft")  # fmt: skip
        return
    text = render(processor, sample["prompt"], add_generation_prompt=True)
    prompt_ids = process_prompts(processor, [text], [sample["images"]])["input_ids"][0]
    if len(prompt_ids) >= max_length:
        raise BadSampleError(
            f"{sample['sample_id']}: the prompt is {len(prompt_ids)} tokens long (image tokens included), which leaves "
            f"no room for a completion under --max-length {max_length}. Raise --max-length, shorten the prompt or "
            "give the processor smaller images, or pass --skip-bad-samples to skip such samples."
        )
