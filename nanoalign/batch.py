"""The multimodal batch builder: samples -> model inputs + a loss mask, through the model's own processor.

Every row is prompt tokens + completion tokens and nothing else. Prompts (chat template with the
generation prompt, images included) go through the checkpoint's processor, which expands each image
placeholder into the right number of image tokens and returns pixel_values / image_grid_thw / ... the
family's own way, so any transformers VLM whose processor does this works. Completions are text only,
through the tokenizer (RL: the sampled ids themselves, never re-tokenised).

Building rows by concatenation (as TRL does for DPO and GRPO) makes the loss mask exact by construction:
a token counts iff it belongs to an assistant turn, up to and including its stop token (<|im_end|> for
Qwen). Several assistant turns make prompt + (answer, follow-up prompt)*, every answer counted; a
follow-up prompt with images goes through the processor too (LLaVA-Instruct-style data). Rows past
max_length lose their tail text (`num_truncated`); cutting image tokens is an error naming the sample
(with --skip-bad-samples `check_prompt_fits` finds such a sample when it is fetched, and it is replaced).
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
    # RL rows in groups sharing a prompt: the distinct prompts' processor batch (model.shared_prompt_hidden); empty: whole rows.
    shared_prompts: dict[str, torch.Tensor] = field(default_factory=dict)

    def model_inputs(self) -> dict:
        inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask, **self.mm_inputs}
        return {**inputs, "shared_prompts": self.shared_prompts} if self.shared_prompts else inputs

    def to(self, device) -> "Batch":
        move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return Batch(move(self.input_ids), move(self.attention_mask), move(self.mask), {k: move(v) for k, v in self.mm_inputs.items()},
                     self.sample_ids, self.num_truncated, self.num_skipped, {k: move(v) for k, v in self.shared_prompts.items()})  # fmt: skip


def render(processor, messages: list[dict], add_generation_prompt: bool) -> str:
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _suffix(text: str, prefix: str, sample_id: str) -> str:
    if not text.startswith(prefix):
        raise BadSampleError(f"{sample_id}: the chat template renders a conversation's prefix differently from the whole "
                             "conversation, so prompt and answer tokens cannot be told apart; use a template whose "
                             "rendering of the first k turns is a prefix of the rendering of k+1 turns")  # fmt: skip
    return text[len(prefix) :]


def conversation_segments(processor, messages: list[dict], sample_id: str, last_turn_only: bool):
    """A conversation's row as [(segment_text, counts_in_loss, num_images)], alternating prompt (the turns up to
    an assistant turn, with the generation prompt; never counted) and answer (counted, unless last_turn_only and
    not the last). num_images: a prompt's placeholders, taking the images in order. Turns after the last
    answer are dropped (nothing is learned from them)."""
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
    """1 for an answer's tokens up to and including its first stop token, 0 after it: the text templates add
    after it (Qwen: a newline) is never generated, so never trained on."""
    mask, stopped = [], False
    for tok in token_ids:
        mask.append(0 if stopped else 1)
        stopped = stopped or tok in stop_ids
    return mask


def process_prompts(processor, prompt_texts: list[str], images: list[list], padding_side: str = "right") -> dict:
    """The processor's batch (input_ids, attention_mask, pixel_values, ...) of rendered prompts and their images,
    padded on `padding_side` (left for generation): the only place images are processed."""
    kwargs = {"images": images} if any(images) else {}
    return processor(text=prompt_texts, padding=True, padding_side=padding_side, return_tensors="pt", add_special_tokens=False, **kwargs)


def _unpad_rows(enc: dict) -> list[dict[str, torch.Tensor]]:
    """Per-row 1-D tensors for every per-token key of a processor batch, padding removed."""
    ids = enc["input_ids"]
    per_token = [k for k, v in enc.items() if isinstance(v, torch.Tensor) and v.shape[:2] == ids.shape]
    keep = enc["attention_mask"].bool()
    return [{k: enc[k][b][keep[b]] for k in per_token} for b in range(ids.shape[0])]


def image_token_ids(processor) -> set[int]:
    """Ids of the tokens that stand for image (or video) features. The processor's own `image_token_ids` /
    `video_token_ids` come first: Gemma 3's `processor.image_token` is the template's begin-of-image marker."""
    tok = processor.tokenizer
    declared = [*getattr(processor, "image_token_ids", []), *getattr(processor, "video_token_ids", [])]
    if not any(i is not None for i in declared):  # a processor that declares none: look its tokens up by name
        declared = [tok.convert_tokens_to_ids(n) for n in (getattr(processor, a, None) for a in ("image_token", "video_token")) if n]
    return set(declared) - {tok.unk_token_id, None}


def _with_text(row: dict[str, torch.Tensor], ids: list[int]) -> dict[str, torch.Tensor]:
    """A row's per-token tensors extended by text tokens: attention 1, other outputs (mm_token_type_ids) 0 ("text")."""
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
    """Unpadded rows (per-token tensors) cut at max_length and right-padded into a Batch; `enc`'s per-image
    outputs pass through unchanged (they follow the image tokens, which cutting text never moves)."""
    image_ids = torch.tensor(sorted(image_token_ids(processor)))
    num_truncated = 0
    packed = []
    for b, full in enumerate(rows):
        mask = torch.tensor(masks[b], dtype=torch.float)
        if len(mask) > max_length:
            cut_images = torch.isin(full["input_ids"][max_length:], image_ids).sum().item()
            if cut_images:
                raise BadSampleError(f"{sample_ids[b]}: {len(mask)} tokens, and {cut_images} image tokens lie past --max-length "
                                     f"{max_length}. Raise --max-length, give the processor a smaller max_pixels, or pass "
                                     "--skip-bad-samples to skip such samples.")  # fmt: skip
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
    """SFT / preference rows, segment by segment (conversation_segments). The first prompt and every later one
    with images go through the processor in one call for the batch (per-image outputs in row order); answers
    and text-only prompts are tokenised. last_turn_only: only the final answer counts (preference)."""
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
    """Refuse (BadSampleError) a sample whose rows cannot be built under max_length, when it is fetched (so
    --skip-bad-samples replaces it before any work). SFT / preference: its rows are built as the batch will;
    an RL prompt needs room for at least one completion token (nothing is generated for it otherwise)."""
    if fmt != "rl":
        rows = [sample["messages"]] if fmt == "sft" else [sample["prompt"] + sample[k] for k in ("chosen", "rejected")]
        encode_conversations(processor, rows, [sample["images"]] * len(rows), [sample["sample_id"]] * len(rows),
                             max_length=max_length, stop_ids=set(), last_turn_only=fmt != "sft")  # fmt: skip
        return
    text = render(processor, sample["prompt"], add_generation_prompt=True)
    prompt_ids = process_prompts(processor, [text], [sample["images"]])["input_ids"][0]
    if len(prompt_ids) >= max_length:
        raise BadSampleError(f"{sample['sample_id']}: the prompt is {len(prompt_ids)} tokens long (image tokens included), which "
                             f"leaves no room for a completion under --max-length {max_length}. Raise --max-length, shorten the "
                             "prompt or give the processor smaller images, or pass --skip-bad-samples to skip such samples.")  # fmt: skip
