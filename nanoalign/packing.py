"""Padding-free forward (--padding-free): a micro-batch's rows as one sequence, no pad token computed.

A padded micro-batch of B rows costs B x T_max tokens in every layer; real VLM rows (one or two images
of 64..1,300+ tokens, answers of 10..1,000+) leave much of that padding. Here the rows' real tokens are
concatenated into one sequence of N = SUM_b len_b tokens and the decoder runs on (1, N):

    padded   [r0 r0 r0 pad pad | r1 r1 r1 r1 r1 | r2 r2 pad pad pad]      (B, T)
    packed   [r0 r0 r0 r1 r1 r1 r1 r1 r2 r2]                             (1, N)

Three things keep it the same function as the padded forward, row by row:

  1. Positions. Each row keeps the positions it has alone. They come from the family's own
     position hook (`_prepare_position_ids_for_generation`, the one HF generate calls) run on the
     padded rows, where every row is computed alone: 0..len-1 for plain RoPE; for M-RoPE (Qwen2-VL,
     Qwen2.5-VL, Qwen3-VL) `get_rope_index` per row: text tokens at (p, p, p), each image's tokens on
     its (t, h, w) grid starting one past the text before it, the text after an image one past the
     grid's largest index (so a row's positions end below its length: its `rope_delta` is < 0).
     Those are taken at the real tokens and concatenated, a text row (4, 1, N) first for M-RoPE:
     row 0 = 0..len-1 per row, the rest t/h/w.
  2. Attention never crosses rows. With no attention mask, transformers reads row boundaries off
     the (text) positions (masking_utils.find_packed_sequence_indices: a new row wherever a
     position is not the previous one + 1) and ANDs that block-diagonal mask into every layer's
     mask: causal, sliding window, and Gemma 3's bidirectional image blocks alike (SDPA on CPU; with
     flash-attention the same positions give the varlen kernel its cu_seqlens).
  3. Everything per row follows its row. Per-token processor outputs (Gemma 3's token_type_ids,
     Qwen's mm_token_type_ids) are packed like input_ids; images stay in the rows' order, so the
     vision tower encodes each image once, as padded, and its features (and Qwen3-VL's deepstack
     features, placed by the same image-token mask) land on the same tokens.

The hidden states come back scattered into the padded (B, T) layout (zeros at pads), so log-probs,
masks and every loss read exactly what they read padded. That costs one (B, T, H) tensor, the last
layer's only; every layer before it, the vision tower and lm_head see N tokens.

Not packable: a decoder layer that carries state along the sequence (Qwen3.5's linear-attention
layers, a recurrence) would run on from one row into the next; without a varlen kernel it cannot be
confined to a row, so such a model is refused (`check_packable`), not silently padded.
"""

import itertools

import torch
import torch.distributed as dist
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from nanoalign.data import BadSampleError
from nanoalign.runtime import agree_on_failure

ROW_ATTENTION = "nanoalign_rows"  # SDPA, run row by row on a packed sequence (row_attention)


def check_packable(hf_model) -> None:
    """Refuse (ValueError) a model whose decoder layers cannot be confined to one row of a packed sequence."""
    layer_types = getattr(hf_model.config.get_text_config(), "layer_types", None) or []
    if other := sorted(set(layer_types) - {"full_attention", "sliding_attention"}):
        raise ValueError(
            f"--padding-free: {type(hf_model).__name__} has {', '.join(other)} decoder layers, whose state runs along "
            "the whole sequence: packed, each row would read the rows before it (no varlen kernel confines them to a "
            "row). Drop --padding-free for this model."
        )


def row_attention(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """SDPA on a packed sequence one row at a time, so attention costs SUM_b len_b^2, not N^2.

    Rows are read off the text positions as transformers' packed masks read them (a new row wherever a
    position is not the previous one + 1); each row's queries see its own keys under its own block of
    the mask, which is all the full mask lets through. Anything else (padded rows, a KV cache, no
    positions) is plain SDPA.
    """
    q_len = query.shape[2]
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1 or key.shape[2] != q_len:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    starts = [0, *(torch.nonzero(position_ids[0, 1:] != position_ids[0, :-1] + 1).flatten() + 1).tolist(), q_len]
    outs = []
    for start, end in itertools.pairwise(starts):  # query, key, value: (1, heads, N, head_dim)
        mask = attention_mask[..., start:end, start:end] if attention_mask is not None else None
        row = slice(start, end)
        outs.append(sdpa_attention_forward(module, query[:, :, row], key[:, :, row], value[:, :, row], mask, **kwargs)[0])
    return torch.cat(outs, dim=1), None  # (1, N, heads, head_dim), as SDPA returns it


AttentionInterface.register(ROW_ATTENTION, row_attention)
AttentionMaskInterface.register(ROW_ATTENTION, sdpa_mask)


def use_row_attention(hf_model) -> None:
    """The text decoder's attention becomes `row_attention` (the vision tower keeps its own)."""
    text_config = hf_model.config.get_text_config()
    if text_config._attn_implementation == "sdpa":  # flash-attention reads the rows from the positions itself
        text_config._attn_implementation = ROW_ATTENTION


def row_positions(hf_model, input_ids, attention_mask, mm_inputs: dict) -> torch.Tensor:
    """The family's positions of right-padded rows, each row computed alone: (B, T), or (C, B, T) with
    C = 4 for M-RoPE (text row, then t/h/w). Values at pads are meaningless (they are never used)."""
    base = hf_model.base_model
    deltas = getattr(base, "rope_deltas", None)  # the hook stores per-row deltas for decoding: not ours to change
    positions = hf_model._prepare_position_ids_for_generation(input_ids, {"attention_mask": attention_mask, **mm_inputs})
    if hasattr(base, "rope_deltas"):
        base.rope_deltas = deltas
    return positions


def packed_hidden(hf_model, input_ids, attention_mask, mm_inputs: dict) -> torch.Tensor:
    """The base model's last hidden states of B right-padded rows, (B, T, H), computed on their real
    tokens only, as one packed sequence; zeros at pads."""
    real = attention_mask.bool()  # (B, T)
    positions = row_positions(hf_model, input_ids, attention_mask, mm_inputs)[..., real]  # (N,) or (C, N)
    # Per-token processor outputs are (B, T) integer tensors like input_ids; per-image ones are not.
    per_token = {k for k, v in mm_inputs.items() if v.shape == input_ids.shape and not v.is_floating_point()}
    packed = {k: v[real][None] if k in per_token else v for k, v in mm_inputs.items()}
    hidden = hf_model.model(
        input_ids=input_ids[real][None], attention_mask=None, position_ids=positions.unsqueeze(-2), use_cache=False, **packed
    ).last_hidden_state  # (1, N, H)
    out = hidden.new_zeros(*input_ids.shape, hidden.shape[-1])  # (B, T, H)
    out[real] = hidden[0]  # an index_put: the gradient flows back to the packed states
    return out


# -----------------------------------------------------------------------------
# Token-budget micro-batches (--max-tokens-per-micro-batch, sft / dpo / mpo)
#
# An optimizer step still draws batch_size x grad_accum_steps samples per rank, and every loss still
# divides by its count over the whole step (train.py's rule), so the step's gradient is the same however
# its samples are grouped. Only the grouping changes: consecutive samples (whole pairs for DPO/MPO) fill a
# micro-batch up to the budget, so ten short rows cost one forward and a long one goes alone.


def micro_batch_cost(row_lengths: list[int], padding_free: bool) -> int:
    """Tokens the forward computes for these rows: their sum packed, rows x the longest padded."""
    return sum(row_lengths) if padding_free else len(row_lengths) * max(row_lengths)


def budget_groups(sample_rows: list[list[int]], budget: int, padding_free: bool, num_groups: int = 0) -> list[slice]:
    """Consecutive samples (each a list of its rows' lengths) in groups costing at most `budget` tokens
    (a sample over it alone goes alone), then split further until there are num_groups.

    Splitting always works when num_groups <= len(sample_rows): the largest group of 2+ samples is cut
    in half, which keeps every group within the budget.
    """
    def cost(first: int, last: int) -> int:
        return micro_batch_cost([n for rows in sample_rows[first:last] for n in rows], padding_free)

    groups, start = [], 0  # [first, last) sample indices
    for end in range(2, len(sample_rows) + 1):
        if cost(start, end) > budget:
            groups.append([start, end - 1])
            start = end - 1
    groups.append([start, len(sample_rows)])
    assert num_groups <= len(sample_rows), "every rank draws as many samples, so no rank needs more groups than samples"
    while len(groups) < num_groups:
        k = max((k for k, (first, last) in enumerate(groups) if last - first > 1), key=lambda k: cost(*groups[k]))
        first, last = groups[k]
        groups[k : k + 1] = [[first, (first + last) // 2], [(first + last) // 2, last]]
    return [slice(first, last) for first, last in groups]


def budget_slices(samples: list[dict], run, sample_rows) -> list[slice]:
    """This rank's micro-batches (slices of `samples`) under --max-tokens-per-micro-batch.

    sample_rows(samples) -> each sample's row lengths, image tokens included (the encoded rows).
    FSDP needs every rank to run as many forwards and backwards per step (each one gathers weights
    with the other ranks), so the ranks agree on one count: the largest any rank's budget needs
    (an all-reduce MAX); a rank that needs fewer splits its largest groups until it has as many.
    """
    error, rows = None, []
    try:
        rows = sample_rows(samples)
    except BadSampleError as err:
        error = err
    agree_on_failure(error, run.device)
    budget, padding_free = run.cfg.max_tokens_per_micro_batch, run.cfg.padding_free
    count = torch.tensor(len(budget_groups(rows, budget, padding_free)), device=run.device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return budget_groups(rows, budget, padding_free, int(count))
