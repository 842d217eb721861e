"""nanoalign's in-process sampler: each prompt prefilled once, its KV cache replicated for its G samples.

HF `generate` on P prompts x G samples prefills all P*G rows: every image through the vision tower G
times, every prompt through the decoder G times. Here, as in nanochat's Engine:

  1. prefill the P distinct prompts (left-padded, images included) in one forward;
  2. repeat each prompt's KV cache, last logits and last position G times (rows prompt-major);
  3. decode all rows together, a token per forward. A row that samples a stop id or an end id (an image
     placeholder: as input it would ask for image features that do not exist) leaves the batch with its
     slice of the cache; decoding ends when no row is left or at max_new_tokens.

Positions come from the model's own generation hook (`_prepare_position_ids_for_generation`, as in HF
generate), so each family keeps its scheme (LLaVA's RoPE, Qwen2.5-VL's M-RoPE with `rope_deltas`); a new
token sits one past its row's last. Sampling follows HF's order (z / temperature, top_k, top_p; greedy:
argmax); the log-probs are log softmax(z / temperature)[token] in fp32, what model.Policy recomputes.

Simplified: no beam search, repetition penalties or logits processors; the cache grows by concatenation
(HF's DynamicCache); identical prompts given twice are prefilled twice. A model the sampler cannot
serve (`unsupported`) is sampled with HF generate by the caller.
"""

import contextlib
import functools
import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

# The per-token processor outputs the sampler can continue: the rows, and mm_token_type_ids (read only to place
# the prompt's M-RoPE positions; decoded tokens are text). Any other (e.g. token_type_ids, which some families
# use to change the attention over image tokens) is refused rather than guessed.
KNOWN_TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")


@dataclass
class Samples:
    ids: list[list[int]]  # per row: the sampled ids, up to and including the one that ended the row
    has_eos: list[bool]  # the row ended with a stop id (False: max_new_tokens or an end id)
    logps: list[list[float]] | None = None  # per row: log softmax(z / temperature)[id] of each id, fp32


def unsupported(hf_model, prompt_enc: dict) -> str | None:
    """Why `sample` cannot serve this model and processor batch, or None when it can."""
    if hf_model.config.is_encoder_decoder:
        return f"{type(hf_model).__name__} is an encoder-decoder model"
    if not hasattr(hf_model, "_prepare_position_ids_for_generation"):
        return f"{type(hf_model).__name__} has no generation position hook (_prepare_position_ids_for_generation)"
    # Hybrid decoders (e.g. Qwen3.5's linear-attention layers) keep a recurrent state, not a KV cache
    # that batch_repeat_interleave / batch_select_indices can copy per sample.
    layer_types = getattr(hf_model.config.get_text_config(), "layer_types", None) or []
    if other := sorted(set(layer_types) - {"full_attention", "sliding_attention"}):
        return f"its decoder has {', '.join(other)} layers, whose cache the sampler cannot copy per sample"
    shape = prompt_enc["input_ids"].shape
    extra = [k for k, v in prompt_enc.items() if isinstance(v, torch.Tensor) and v.shape[:2] == shape and k not in KNOWN_TOKEN_KEYS]
    if extra:
        return f"its processor returns per-token {', '.join(extra)}, which the sampler does not know how to extend while decoding"
    return None


@contextlib.contextmanager
def sampling_mode(model: torch.nn.Module):
    """Eval mode while sampling (checkpointed layers drop the KV cache in train mode), each module's mode restored."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """(N, V) logits with every token outside the top_k largest, then outside the top_p nucleus, at -inf (0 and 1
    keep all). A token leaves the nucleus when the more likely ones hold top_p: the likeliest stays (HF's warper)."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (N, 1); ties with the k-th stay
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (N, V) each
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # probability of the strictly more likely tokens
        outside = mass_before >= top_p  # (N, V)
        outside[:, 0] = False  # the most likely token stays even at top_p 0
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
    return logits


def sample_next(logits: torch.Tensor, *, temperature: float, top_k: int, top_p: float, greedy: bool, generator=None):
    """One token per row from fp32 logits (N, V): ids (N,) and log softmax(logits / temperature)[ids] (N,)."""
    scaled = logits / temperature
    if greedy:
        ids = logits.argmax(-1)
    else:
        probs = filter_logits(scaled, top_k, top_p).softmax(-1)
        ids = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return ids, scaled.log_softmax(-1).gather(1, ids[:, None]).squeeze(1)


def prompt_positions(hf_model, prompt_enc: dict) -> torch.Tensor:
    """The family's own positions of a left-padded processor batch, (P, T) or (C, P, T) (Qwen2.5-VL: C = 4)."""
    mm_inputs = {k: v for k, v in prompt_enc.items() if k != "input_ids"}
    return hf_model._prepare_position_ids_for_generation(prompt_enc["input_ids"], mm_inputs)


def prefill(hf_model, prompt_enc: dict):
    """One forward over the P distinct prompts -> last logits (P, V) fp32, the KV cache, positions."""
    positions = prompt_positions(hf_model, prompt_enc)
    out = hf_model(**prompt_enc, position_ids=positions, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].float(), out.past_key_values, positions


def expand_row_state(hf_model, num_samples: int) -> None:
    """Per-row state a family keeps between forwards (Qwen's M-RoPE rope_deltas, (P, 1)) must describe the P*G rows."""
    base = hf_model.base_model
    deltas = getattr(base, "rope_deltas", None)
    if isinstance(deltas, torch.Tensor):
        base.rope_deltas = deltas.repeat_interleave(num_samples, dim=0)


@torch.no_grad()
def sample(hf_model, prompt_enc: dict, *, num_samples: int, max_new_tokens: int, stop_ids, pad_id: int, end_ids=(),
           temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, greedy: bool = False,
           with_logps: bool = False, generator: torch.Generator | None = None) -> Samples:  # fmt: skip
    """num_samples completions of each of the P prompts in `prompt_enc` (left-padded, on the model's device), rows
    prompt-major. A row ends at its first stop id (has_eos) or end id (kept as its last id, has_eos False),
    else after max_new_tokens. Draws from the global torch RNG, or `generator`. A sharded Policy is sampled
    with `policy.sample(...)` inside `gathered_for_generation(policy)`."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (got {temperature}); use greedy=True for argmax decoding")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1 (got {max_new_tokens})")
    with sampling_mode(hf_model):
        logits, cache, positions = prefill(hf_model, prompt_enc)  # (P, V)
        # Replicate every prompt's state for its samples: [p0, p1] -> [p0, p0, ..., p1, p1, ...].
        cache.batch_repeat_interleave(num_samples)
        expand_row_state(hf_model, num_samples)
        logits = logits.repeat_interleave(num_samples, dim=0)  # (N, V), N = P * G
        position = positions[..., -1:].repeat_interleave(num_samples, dim=-2)  # (N, 1) or (C, N, 1)
        attention_mask = prompt_enc["attention_mask"].repeat_interleave(num_samples, dim=0)  # (N, T)
        num_rows = logits.shape[0]
        ending = torch.tensor(sorted({*stop_ids, *end_ids}), device=logits.device)
        rows = torch.arange(num_rows, device=logits.device)  # (B,) the output row of each batch row
        tokens = torch.full((num_rows, max_new_tokens), pad_id, device=logits.device)  # (N, L), pad after a row's end
        logps = torch.zeros(num_rows, max_new_tokens, device=logits.device)
        for step in range(max_new_tokens):
            next_ids, next_logps = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy, generator=generator)
            tokens[rows, step], logps[rows, step] = next_ids, next_logps
            if step == max_new_tokens - 1:
                break
            # The step's one host sync: which rows go on (on a GPU every other op here is queued).
            keep = (~torch.isin(next_ids, ending)).nonzero().squeeze(1)  # (B',)
            if len(keep) == 0:
                break
            if len(keep) < len(rows):  # rows that ended leave the batch: it shrinks as completions end, and
                cache.batch_select_indices(keep)  # an ended row is never fed the image token it may have sampled
                rows, next_ids, attention_mask, position = rows[keep], next_ids[keep], attention_mask[keep], position[..., keep, :]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=1)  # (B, T + step + 1)
            position = position + 1
            out = hf_model(input_ids=next_ids[:, None], attention_mask=attention_mask, position_ids=position,
                           past_key_values=cache, use_cache=True)  # fmt: skip
            logits = out.logits[:, -1].float()  # (B, V)
    return cut_rows(tokens[:, : step + 1], logps[:, : step + 1] if with_logps else None, set(stop_ids), set(end_ids))


def cut_rows(tokens: torch.Tensor, logps: torch.Tensor | None, stop_ids: set[int], end_ids: set[int]) -> Samples:
    """(N, L) sampled ids (and their log-probs) -> per-row lists cut after the first stop or end id."""
    ids, has_eos, row_logps = [], [], []
    for row, row_tokens in enumerate(tokens.tolist()):
        end = next((i for i, tok in enumerate(row_tokens) if tok in stop_ids or tok in end_ids), None)
        length = len(row_tokens) if end is None else end + 1
        ids.append(row_tokens[:length])
        has_eos.append(end is not None and row_tokens[end] in stop_ids)
        if logps is not None:
            row_logps.append(logps[row, :length].tolist())
    return Samples(ids, has_eos, row_logps if logps is not None else None)


@functools.cache
def warn_fallback(reason: str) -> None:
    """Say once per reason that HF generate samples instead (a caller's choice, never silent)."""
    logger.warning("nanoalign's sampler cannot serve this model (%s); sampling with HF generate instead", reason)
