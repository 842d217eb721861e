"""Sampling completions with images from the model being trained (in-process rollouts), and accuracy evals.

Each prompt is repeated G times, processed (images included) and left-padded: the prompts of the
training rows. nanoalign's sampler (nanoalign/sampler.py) prefills each distinct prompt once and
decodes its G samples from copies of its KV cache; `--sampler hf` samples every row with HF
`generate` instead. Under FSDP2 the call is wrapped in `gathered_for_generation`:
weights are gathered once, so ranks generating different lengths never wait on each other.

We keep the sampled token ids themselves (cut after the first stop token): the trainer scores
exactly these ids, never a re-tokenisation of the decoded text. A completion that reaches
max_new_tokens without a stop token is marked has_eos = False (logged as completions/clipped_ratio;
--mask-truncated-completions drops it from the loss).
"""

import contextlib
import functools
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig

from nanoalign.batch import Batch, image_token_ids, pack_rows, process_prompts, render
from nanoalign.model import Policy, gathered_for_generation
from nanoalign.rewards import score_completions, verify_answers
from nanoalign.runtime import agree_on_failure, all_reduce_sum
from nanoalign.sampler import sample, unsupported, warn_fallback


@dataclass
class Rollout:
    prompt_enc: dict  # the processor batch (left-padded) the completions were sampled from, one row per completion
    completion_ids: list[list[int]]  # sampled ids, up to and including the stop token
    has_eos: list[bool]  # False when max_new_tokens was reached first
    texts: list[str]  # decoded completions, for the reward functions
    sampler_logps: list[list[float]] | None = None  # vLLM's log-prob of each sampled id (None in-process)
    sample_ids: list[str] = field(default_factory=list)  # the dataset sample of each row, for error messages


def generation_config(*, max_new_tokens: int, temperature: float, top_p: float, greedy: bool, stop_ids, pad_id) -> GenerationConfig:
    """Plain sampling: every knob a checkpoint's generation_config.json may set (top_k, repetition
    penalty, ...) is reset, so the sampled distribution is softmax(z / temperature) as the losses assume."""
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        temperature=temperature if not greedy else None,
        top_p=top_p if not greedy else None,
        top_k=None,
        min_p=None,
        repetition_penalty=None,
        eos_token_id=sorted(stop_ids),
        pad_token_id=pad_id,
    )


def split_completions(new_tokens: torch.Tensor, stop_ids: set[int]) -> tuple[list[list[int]], list[bool]]:
    """Cut each generated row after its first stop token. new_tokens: (N, L) -> ids per row, has_eos."""
    completion_ids, has_eos = [], []
    for row in new_tokens.tolist():
        stop = next((i for i, tok in enumerate(row) if tok in stop_ids), None)
        completion_ids.append(row if stop is None else row[: stop + 1])
        has_eos.append(stop is not None)
    return completion_ids, has_eos


@torch.no_grad()
def sample_completions(model, processor, prompts: list[list[dict]], images: list[list], *, num_generations: int,
                       max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
                       stop_ids: set[int], pad_id: int, device, sampler: str = "nanoalign") -> Rollout:  # fmt: skip
    """G completions for each prompt, rows ordered prompt-major: [p0 g0, p0 g1, ..., p1 g0, ...].

    `model` is a plain HF model or the FSDP2-sharded Policy; call the latter inside
    `generating(model)`, which gathers its weights once for any number of calls.
    sampler: "nanoalign" (nanoalign/sampler.py: each prompt and image through the model once, its KV
    cache replicated for the G samples) or "hf" (HF generate on all P*G rows). A model nanoalign's
    sampler cannot serve is sampled with HF generate, and the reason is logged.
    """
    prompt_texts = [render(processor, p, add_generation_prompt=True) for p in prompts]
    texts = [text for text in prompt_texts for _ in range(num_generations)]
    row_images = [imgs for imgs in images for _ in range(num_generations)]
    enc = process_prompts(processor, texts, row_images, padding_side="left")  # the training rows' prompts
    hf_model = model.hf if isinstance(model, Policy) else model
    reason = unsupported(hf_model, enc) if sampler == "nanoalign" else "--sampler hf"
    if reason is None:
        # The sampler prefills the P distinct prompts, padded exactly as their rows in enc.
        distinct = enc if num_generations == 1 else process_prompts(processor, prompt_texts, images, padding_side="left")
        assert torch.equal(enc["input_ids"], distinct["input_ids"].repeat_interleave(num_generations, dim=0))
        sample_fn = model.sample if isinstance(model, Policy) else functools.partial(sample, model)
        samples = sample_fn(
            {k: v.to(device) for k, v in distinct.items()}, num_samples=num_generations, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, greedy=greedy, stop_ids=stop_ids, pad_id=pad_id,
            end_ids=image_token_ids(processor),  # a sampled image placeholder ends the completion (see completion_batch)
        )  # fmt: skip
        completion_ids, has_eos = samples.ids, samples.has_eos
    else:
        if sampler == "nanoalign":
            warn_fallback(reason)
        config = generation_config(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, greedy=greedy, stop_ids=stop_ids, pad_id=pad_id
        )
        out = model.generate(**{k: v.to(device) for k, v in enc.items()}, generation_config=config)
        completion_ids, has_eos = split_completions(out[:, enc["input_ids"].shape[1] :].cpu(), stop_ids)
    decoded = processor.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Rollout(enc, completion_ids, has_eos, decoded)


def generating(model):
    """Context for generation: gathers an FSDP2 Policy's weights once (see model.gathered_for_generation);
    nothing to do for a plain HF model."""
    return gathered_for_generation(model) if isinstance(model, Policy) else contextlib.nullcontext()


def accuracy(model, processor, samples: list[dict], *, batch_size: int, max_new_tokens: int, stop_ids, pad_id, device,
             sampler: str = "nanoalign") -> tuple[float, float, float]:  # fmt: skip
    """Greedy-decode each sample's prompt and check it against its `solution` with math-verify.

    Returns (number correct, number of samples, completion tokens) for this rank's share; an
    unscorable sample counts as not correct.
    """
    correct = num_tokens = 0.0
    with generating(model):
        for i in range(0, len(samples), batch_size):
            chunk = samples[i : i + batch_size]
            rollout = sample_completions(
                model, processor, [s["prompt"] for s in chunk], [s["images"] for s in chunk], num_generations=1,
                max_new_tokens=max_new_tokens, greedy=True, stop_ids=stop_ids, pad_id=pad_id, device=device, sampler=sampler,
            )  # fmt: skip
            scores, _ = verify_answers(rollout.texts, [s["solution"] for s in chunk])
            correct += sum(1.0 for s in scores if s == 1.0)
            num_tokens += sum(len(ids) for ids in rollout.completion_ids)
    return correct, float(len(samples)), num_tokens


# -----------------------------------------------------------------------------
# What GRPO / GSPO, RLOO and Online DPO share: rollouts in micro-batch chunks, scoring, training rows

NOT_REWARD_COLUMNS = ("prompt", "images", "sample_id", "index", "split")


def rollout_chunks(samples: list[dict], run, num_generations: int) -> list[Rollout]:
    """G completions for every prompt, as one Rollout per micro-batch of run.cfg.batch_size rows.

    Each chunk holds whole groups (batch_size / G prompts), so a micro-batch's rows share one
    processor batch and its image tensors. Every rank makes the same number of calls.
    """
    prompts_per_chunk = run.cfg.batch_size // num_generations
    cfg = run.cfg
    chunks = [samples[i : i + prompts_per_chunk] for i in range(0, len(samples), prompts_per_chunk)]
    if run.vllm is not None:
        rollouts = vllm_rollout_chunks(chunks, run, num_generations)
    else:
        with generating(run.policy):
            rollouts = [
                sample_completions(
                    run.policy, run.processor, [s["prompt"] for s in chunk], [s["images"] for s in chunk],
                    num_generations=num_generations, max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature,
                    top_p=cfg.top_p, stop_ids=run.stop_ids, pad_id=run.pad_id, device=run.device, sampler=cfg.sampler,
                )  # fmt: skip
                for chunk in chunks
            ]
    for rollout, chunk in zip(rollouts, chunks):
        rollout.sample_ids = [f"{s['sample_id']} (completion {g})" for s in chunk for g in range(num_generations)]
    return rollouts


def vllm_rollout_chunks(chunks: list[list[dict]], run, num_generations: int) -> list[Rollout]:
    """The same Rollouts, sampled by the vLLM server (every rank sends its own prompts in one batch)."""
    from nanoalign.vllm_client import VLLMError, to_rollout  # vllm_client imports this module

    cfg, error, rollouts = run.cfg, None, []
    samples = [s for chunk in chunks for s in chunk]
    try:
        generations = run.vllm.generate(
            [s["prompt"] for s in samples], [s["images"] for s in samples], n=num_generations,
            max_tokens=cfg.max_completion_length, temperature=cfg.temperature, top_p=cfg.top_p, stop_ids=run.stop_ids,
        )  # fmt: skip
        start = 0
        for chunk in chunks:
            rollout, sampler_logps = to_rollout(
                run.processor, [s["prompt"] for s in chunk], [s["images"] for s in chunk],
                generations[start : start + len(chunk)], [s["sample_id"] for s in chunk],
            )  # fmt: skip
            rollout.sampler_logps = sampler_logps
            rollouts.append(rollout)
            start += len(chunk)
    except (VLLMError, ValueError) as err:
        error = err
    agree_on_failure(error, run.device)  # a dead server stops every rank, not just the one that asked
    return rollouts


def score_rollouts(rollouts: list[Rollout], samples: list[dict], run, num_generations: int) -> tuple[torch.Tensor, dict]:
    """(N, K) weighted rewards (NaN = unscorable) for this rank's completions, and reward metrics.

    Reward functions get the completions plus the samples' other columns (e.g. `solution`), each
    repeated G times, and the prompts. A function that raises stops every rank with its message.
    """
    texts = [t for r in rollouts for t in r.texts]
    columns = {k: [s[k] for s in samples for _ in range(num_generations)] for k in samples[0] if k not in NOT_REWARD_COLUMNS}
    columns["prompts"] = [s["prompt"] for s in samples for _ in range(num_generations)]
    error, rewards, metrics = None, None, {}
    try:
        sample_ids = [i for r in rollouts for i in r.sample_ids] or None
        rewards, metrics = score_completions(run.reward_funcs, list(run.cfg.reward_weights), texts, columns, sample_ids)
    except (RuntimeError, ValueError) as err:
        error = err
    agree_on_failure(error, run.device)
    return rewards.to(run.device), metrics


def completion_batch(rollout: Rollout, run, mask_truncated: bool) -> Batch:
    """Training rows prompt + sampled completion; the loss mask covers the completion tokens.

    With mask_truncated, a completion cut at max_completion_length (no EOS) gets an all-zero mask
    (--mask-truncated-completions, as TRL's); its reward still counts in the group statistics.
    """
    image_ids = image_token_ids(run.processor)
    completions, masks, num_image_tokens = [], [], 0
    for ids, eos in zip(rollout.completion_ids, rollout.has_eos):
        # A (weak) policy can sample an image placeholder token; as input it would ask the model for
        # image features that do not exist. Cut the completion before it and train nothing on it.
        cut = next((i for i, tok in enumerate(ids) if tok in image_ids), None)
        if cut is not None:
            num_image_tokens += 1
            completions.append(ids[:cut])
            masks.append([0] * cut)
        else:
            completions.append(ids)
            masks.append([0 if (mask_truncated and not eos) else 1] * len(ids))
    sample_ids = rollout.sample_ids or [f"completion {i}" for i in range(len(masks))]
    batch = pack_rows(run.processor, rollout.prompt_enc, completions, masks, sample_ids, run.cfg.max_length, run.pad_id)
    batch.num_skipped += num_image_tokens
    return batch.to(run.device)


def completion_values(batch: Batch, rollout: Rollout, values: list[list[float]]) -> torch.Tensor:
    """Per-completion-token values (e.g. vLLM's log-probs) laid out like the batch's rows: (B, T)."""
    out = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
    prompt_lengths = rollout.prompt_enc["attention_mask"].sum(1).tolist()
    for row, (start, row_values) in enumerate(zip(prompt_lengths, values)):
        row_values = row_values[: max(0, out.shape[1] - start)]  # the row may have been cut at max_length
        out[row, start : start + len(row_values)] = torch.tensor(row_values)
    return out.to(batch.input_ids.device)


def per_step_totals(values: list[float], grad_accum_steps: int, device) -> list[float]:
    """For each micro-batch of a generation batch, the sum of `values` (e.g. its counted tokens) over
    every micro-batch of its optimizer step on every rank: a loss normaliser for the whole step.

    values: one number per micro-batch, the same count on every rank; consecutive blocks of
    grad_accum_steps micro-batches are one optimizer step (the loop takes them in order).
    """
    totals = all_reduce_sum(values, device)
    steps = [sum(totals[i : i + grad_accum_steps]) for i in range(0, len(totals), grad_accum_steps)]
    return [steps[i // grad_accum_steps] for i in range(len(totals))]


@torch.no_grad()
def token_logps(policy, batch: Batch, temperature: float = 1.0) -> torch.Tensor:
    """(B, T) per-token log-probs without gradient: old (sampling-time) or reference log-probs."""
    return policy(**batch.model_inputs(), temperature=temperature, logps_mask=batch.mask)[0]


def completion_metrics(rollouts: list[Rollout]) -> dict:
    """completions/mean_length and completions/clipped_ratio (no EOS) over this rank's completions."""
    lengths = [len(ids) for r in rollouts for ids in r.completion_ids]
    eos = [e for r in rollouts for e in r.has_eos]
    return {"completions/mean_length": sum(lengths) / len(lengths), "completions/clipped_ratio": 1 - sum(eos) / len(eos)}
