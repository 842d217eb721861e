"""Where rollouts come from: the rollout-backend interface, the in-process backend, and what the vLLM
backends share (the chat messages they send, the conversion of vLLM's answers into Rollouts).

A rollout backend is any object with

    sample(chunks, n, *, max_tokens, temperature, top_p) -> list[Rollout]
        chunks: lists of samples ("prompt", "images", "sample_id"); one Rollout per chunk, rows
        prompt-major [p0 s0, ..., p0 s(n-1), p1 s0, ...], with the token ids exactly as sampled and the
        sampler's log-probs when it has them. Every rank calls it with as many chunks; a failure on any
        rank raises on every rank.
    sync(step) -> metrics
        sample from the policy's weights as they are after `step` optimizer steps (every rank, at the
        start of each round; nothing to do for a backend that samples from the policy itself).
    close()

Three exist: `InProcess` below, `VLLMServer` (vllm_server.py) and `VLLMColocate` (vllm_colocate.py). The
algorithm modules only call `run.rollouts`; each backend imports this file and nothing of another.

In-process: nanoalign's sampler (sampler.py) prefills each distinct prompt once and decodes its G samples
from copies of its KV cache (`--sampler hf`: HF `generate` on every row), with the FSDP2 weights gathered
once per call. The sampled ids are kept (cut after the first stop token), never re-tokenised; one without a
stop token has has_eos False (--mask-truncated-completions drops it from the loss).
"""

import base64
import contextlib
import functools
import io
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig

from nanoalign.batch import image_token_ids, process_prompts, render
from nanoalign.model import Policy, gathered_for_generation
from nanoalign.sampler import sample, unsupported, warn_fallback


@dataclass
class Rollout:
    prompt_enc: dict  # the processor batch (left-padded) the completions were sampled from, one row per completion
    completion_ids: list[list[int]]  # sampled ids, up to and including the stop token
    has_eos: list[bool]  # False when max_new_tokens was reached first
    texts: list[str]  # decoded completions, for the reward functions
    sampler_logps: list[list[float]] | None = None  # the sampler's log-prob of each sampled id (vLLM; None in-process)
    sample_ids: list[str] = field(default_factory=list)  # the dataset sample of each row, for error messages
    # The distinct prompts (left-padded as their rows) when nanoalign's sampler drew G per prompt: Batch.shared_prompts.
    shared_prompts: dict = field(default_factory=dict)


def generation_config(*, max_new_tokens: int, temperature: float, top_p: float, greedy: bool, stop_ids, pad_id) -> GenerationConfig:
    """Plain sampling: every knob a checkpoint's generation_config.json may set (top_k, repetition penalty, ...)
    is reset, so the distribution is softmax(z / temperature) as the losses assume."""
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=not greedy, temperature=temperature if not greedy else None,
                            top_p=top_p if not greedy else None, top_k=None, min_p=None, repetition_penalty=None,
                            eos_token_id=sorted(stop_ids), pad_token_id=pad_id)  # fmt: skip


def split_completions(new_tokens: torch.Tensor, stop_ids: set[int]) -> tuple[list[list[int]], list[bool]]:
    """Cut each generated row after its first stop token. new_tokens: (N, L) -> ids per row, has_eos."""
    completion_ids, has_eos = [], []
    for row in new_tokens.tolist():
        stop = next((i for i, tok in enumerate(row) if tok in stop_ids), None)
        completion_ids.append(row if stop is None else row[: stop + 1])
        has_eos.append(stop is not None)
    return completion_ids, has_eos


def encode_rows(processor, prompts: list[list[dict]], images: list[list], num_generations: int) -> tuple[list[str], dict]:
    """The prompts rendered for generation, and the processor batch of the training rows' prompts:
    each prompt repeated G times, left-padded, images included."""
    prompt_texts = [render(processor, p, add_generation_prompt=True) for p in prompts]
    texts = [text for text in prompt_texts for _ in range(num_generations)]
    row_images = [imgs for imgs in images for _ in range(num_generations)]
    return prompt_texts, process_prompts(processor, texts, row_images, padding_side="left")


def distinct_prompts(processor, prompt_texts: list[str], images: list[list], rows: dict, num_generations: int) -> dict:
    """The P distinct prompts' processor batch, padded exactly as their rows in `rows` (encode_rows)."""
    distinct = rows if num_generations == 1 else process_prompts(processor, prompt_texts, images, padding_side="left")
    assert torch.equal(rows["input_ids"], distinct["input_ids"].repeat_interleave(num_generations, dim=0))
    return distinct


def sample_prompts(model, processor, distinct: dict, *, num_generations: int, device, **kwargs):
    """nanoalign's sampler on a left-padded batch of distinct prompts (a Policy inside `generating`)."""
    sample_fn = model.sample if isinstance(model, Policy) else functools.partial(sample, model)
    return sample_fn(
        {k: v.to(device) for k, v in distinct.items()}, num_samples=num_generations,
        end_ids=image_token_ids(processor),  # a sampled image placeholder ends the completion (see completion_batch)
        **kwargs,
    )  # fmt: skip


@torch.no_grad()
def sample_completions(model, processor, prompts: list[list[dict]], images: list[list], *, num_generations: int,
                       max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
                       stop_ids: set[int], pad_id: int, device, sampler: str = "nanoalign") -> Rollout:  # fmt: skip
    """G completions for each prompt, rows prompt-major [p0 g0, p0 g1, ..., p1 g0, ...]. `model`: an HF model or
    the sharded Policy (inside `generating(model)`). sampler: "nanoalign" or "hf"; a model nanoalign's sampler
    cannot serve is sampled with HF generate, and the reason is logged."""
    prompt_texts, enc = encode_rows(processor, prompts, images, num_generations)
    hf_model = model.hf if isinstance(model, Policy) else model
    reason = unsupported(hf_model, enc) if sampler == "nanoalign" else "--sampler hf"
    if reason is None:
        distinct = distinct_prompts(processor, prompt_texts, images, enc, num_generations)
        samples = sample_prompts(model, processor, distinct, num_generations=num_generations, max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_p=top_p, greedy=greedy, stop_ids=stop_ids, pad_id=pad_id,
                                 device=device)  # fmt: skip
        completion_ids, has_eos = samples.ids, samples.has_eos
        shared = distinct if num_generations > 1 else {}
    else:
        if sampler == "nanoalign":
            warn_fallback(reason)
        config = generation_config(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, greedy=greedy, stop_ids=stop_ids, pad_id=pad_id)
        out = model.generate(**{k: v.to(device) for k, v in enc.items()}, generation_config=config)
        completion_ids, has_eos = split_completions(out[:, enc["input_ids"].shape[1] :].cpu(), stop_ids)
        shared = {}  # HF generate's path stays TRL's all the way: every row forwarded whole in training too
    decoded = processor.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Rollout(enc, completion_ids, has_eos, decoded, shared_prompts=shared)


def sample_round(model, processor, chunks: list[list[dict]], *, num_generations: int, max_rows: int, max_new_tokens: int,
                 temperature: float, top_p: float, stop_ids: set[int], pad_id: int, device, greedy: bool = False) -> list[Rollout] | None:  # fmt: skip
    """One Rollout per chunk, as `sample_completions` on each chunk gives, with the rows of all the
    chunks decoded together by nanoalign's sampler: max_rows rows per decode batch (0: all of them),
    whole prompts each. None when the sampler cannot serve the model (the caller samples per chunk).

    Decoding is memory-bound (each step reads every weight whatever the batch), so one batch of all
    the round's rows costs about what one micro-batch's does on a GPU. Greedy, the ids are those of
    per-chunk sampling (the prompts' padding differs, so logits agree to float rounding); sampled,
    the RNG is drawn step-major over the whole batch instead of chunk by chunk, so a fixed seed
    gives other (equally distributed) samples, unless max_rows is one chunk's rows.
    """
    hf_model = model.hf if isinstance(model, Policy) else model
    encoded = [encode_rows(processor, [s["prompt"] for s in c], [s["images"] for s in c], num_generations) for c in chunks]
    if unsupported(hf_model, encoded[0][1]) is not None:
        return None
    texts = [t for prompt_texts, _ in encoded for t in prompt_texts]  # every prompt of the round, in order
    images = [s["images"] for c in chunks for s in c]
    per_batch = max_rows // num_generations if max_rows else len(texts)
    ids, has_eos = [], []
    for start in range(0, len(texts), per_batch):
        batch = slice(start, start + per_batch)
        samples = sample_prompts(
            model, processor, process_prompts(processor, texts[batch], images[batch], padding_side="left"),
            num_generations=num_generations, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            greedy=greedy, stop_ids=stop_ids, pad_id=pad_id, device=device,
        )  # fmt: skip
        ids += samples.ids
        has_eos += samples.has_eos
    rollouts, row = [], 0
    for chunk, (prompt_texts, enc) in zip(chunks, encoded):
        rows = slice(row, row + len(chunk) * num_generations)
        row = rows.stop
        shared = distinct_prompts(processor, prompt_texts, [s["images"] for s in chunk], enc, num_generations) if num_generations > 1 else {}
        decoded = processor.tokenizer.batch_decode(ids[rows], skip_special_tokens=True)
        rollouts.append(Rollout(enc, ids[rows], has_eos[rows], decoded, shared_prompts=shared))
    return rollouts


def generating(model):
    """Context for generation: gathers a Policy's weights once (model.gathered_for_generation); none for an HF model."""
    return gathered_for_generation(model) if isinstance(model, Policy) else contextlib.nullcontext()


class InProcess:
    """The rollout backend that samples with the policy being trained (--sampler). Nothing to sync."""

    def __init__(self, cfg, policy, processor, *, stop_ids: set[int], pad_id: int, device):
        self.policy, self.processor, self.device, self.sampler = policy, processor, device, cfg.sampler
        self.stop_ids, self.pad_id, self.rollout_batch_size = stop_ids, pad_id, cfg.rollout_batch_size

    def sample(self, chunks: list[list[dict]], n: int, *, max_tokens: int, temperature: float, top_p: float) -> list[Rollout]:
        with generating(self.policy):
            if self.sampler == "nanoalign":  # every chunk's rows in one decode batch (up to rollout_batch_size)
                rollouts = sample_round(
                    self.policy, self.processor, chunks, num_generations=n, max_rows=self.rollout_batch_size,
                    max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, stop_ids=self.stop_ids,
                    pad_id=self.pad_id, device=self.device,
                )  # fmt: skip
                if rollouts is not None:
                    for rollout, chunk in zip(rollouts, chunks):
                        rollout.sample_ids = completion_ids_of(chunk, n)
                    return rollouts
            rollouts = [
                sample_completions(
                    self.policy, self.processor, [s["prompt"] for s in chunk], [s["images"] for s in chunk],
                    num_generations=n, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                    stop_ids=self.stop_ids, pad_id=self.pad_id, device=self.device, sampler=self.sampler,
                )  # fmt: skip
                for chunk in chunks
            ]
        for rollout, chunk in zip(rollouts, chunks):
            rollout.sample_ids = completion_ids_of(chunk, n)
        return rollouts

    def sync(self, step: int) -> dict:
        return {}

    def close(self) -> None:
        pass


def sync_due(synced_step: int | None, step: int, sync_every: int) -> bool:
    """Whether a backend with its own copy of the weights must load them at `step`: the first time (it holds the
    checkpoint's, a resumed run others), then every sync_every steps."""
    return synced_step is None or step - synced_step >= sync_every


def completion_ids_of(chunk: list[dict], n: int) -> list[str]:
    """The name of each row of a chunk's Rollout, for error messages: "<sample id> (completion g)"."""
    return [f"{s['sample_id']} (completion {g})" for s in chunk for g in range(n)]


# --------------------------------------------------------------------------- vLLM's side (both vLLM backends)
# A vLLM backend sends OpenAI chat messages (images as PNG data URLs) and gets back, per prompt, a Generation;
# `chunk_rollouts` turns those into Rollouts, checking that the trainer's processor gives exactly vLLM's prompt
# ids (which also yields the pixel values the trainer's forward needs).


@dataclass
class Generation:  # the n samples vLLM drew for one prompt
    prompt_token_ids: list[int]  # the prompt as vLLM tokenised it (image placeholders expanded)
    completion_ids: list[list[int]]  # n lists of sampled ids, up to and including the stop token
    logprobs: list[list[float]]  # the sampler's log-prob of each sampled id (same lengths)
    has_eos: list[bool]  # False when max_tokens was reached first (finish_reason "length")
    texts: list[str]  # decoded completions, special tokens skipped


def image_data_url(image) -> str:
    """A PIL image as a lossless PNG data URL, so vLLM decodes exactly the pixels the trainer has."""
    if image.mode != "RGB":
        image = image.convert("RGB")  # what the HF image processors do with other modes
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def openai_messages(messages: list[dict], images: list, name: str) -> list[dict]:
    """TRL-style messages ({"type": "image"} placeholders, images in a list) -> OpenAI chat messages."""
    remaining = list(images)
    out = []
    for message in messages:
        content = message["content"]
        if not isinstance(content, str):
            parts = []
            for part in content:
                if part.get("type") == "image":
                    if not remaining:
                        raise ValueError(f"{name}: more image placeholders than images ({len(images)})")
                    parts.append({"type": "image_url", "image_url": {"url": image_data_url(remaining.pop(0))}})
                else:
                    parts.append({"type": "text", "text": part["text"]})
            content = parts
        out.append({"role": message["role"], "content": content})
    if remaining:
        raise ValueError(f"{name}: {len(images)} images but only {len(images) - len(remaining)} image placeholders in the messages")
    return out


def to_rollout(processor, prompts: list[list[dict]], images: list[list], generations: list[Generation],
               sample_ids: list[str] | None = None) -> tuple[Rollout, list[list[float]]]:  # fmt: skip
    """vLLM's samples as the Rollout in-process sampling returns (prompt-major), plus the sampler's log-probs.
    The prompts go through the trainer's processor (for pixel_values etc.) and must give exactly vLLM's ids."""
    n = len(generations[0].completion_ids)
    sample_ids = sample_ids or [f"prompt {i}" for i in range(len(prompts))]
    texts = [render(processor, p, add_generation_prompt=True) for p in prompts for _ in range(n)]
    enc = process_prompts(processor, texts, [imgs for imgs in images for _ in range(n)], padding_side="left")
    for i, gen in enumerate(generations):
        row = i * n
        ours = enc["input_ids"][row][enc["attention_mask"][row].bool()].tolist()
        if ours != gen.prompt_token_ids:
            k = next((j for j, (a, b) in enumerate(zip(ours, gen.prompt_token_ids)) if a != b), min(len(ours), len(gen.prompt_token_ids)))
            raise ValueError(f"{sample_ids[i]}: vLLM tokenised the prompt differently from the trainer's processor "
                             f"({len(gen.prompt_token_ids)} vs {len(ours)} tokens, first difference at position {k}). The server "
                             "must serve the trainer's tokenizer, chat template and image processor: restart it with "
                             "`python -m nanoalign.serve --model <the trainer's --model>`.")  # fmt: skip
    rollout = Rollout(enc, [ids for g in generations for ids in g.completion_ids], [e for g in generations for e in g.has_eos],
                      [t for g in generations for t in g.texts])  # fmt: skip
    return rollout, [lps for g in generations for lps in g.logprobs]


def chunk_rollouts(processor, chunks: list[list[dict]], generations: list[Generation], n: int) -> list[Rollout]:
    """What a vLLM backend's `sample` returns: one Rollout per chunk from the generations of all the chunks'
    samples, in order, with the sampler's log-probs and each row's name."""
    rollouts, start = [], 0
    for chunk in chunks:
        rollout, sampler_logps = to_rollout(processor, [s["prompt"] for s in chunk], [s["images"] for s in chunk],
                                            generations[start : start + len(chunk)], [s["sample_id"] for s in chunk])  # fmt: skip
        rollout.sampler_logps = sampler_logps
        rollout.sample_ids = completion_ids_of(chunk, n)
        rollouts.append(rollout)
        start += len(chunk)
    return rollouts
