"""The policy: a Hugging Face VLM, its FSDP2 sharding plan, and chunked per-token log-probs.

Loading uses the checkpoint's own *ForConditionalGeneration class (AutoModelForImageTextToText), so a
local tiny model and Qwen2.5-VL-3B take the same path. `shard_policy` writes the FSDP2 plan out as
torchtitan does: each vision block, each decoder layer, then the root.

Every loss needs l_t = log p(token_t | tokens_<t) of the completion tokens. Logits for a whole batch cost
B*T*V floats (1024 tokens x 150k vocabulary x 4 bytes = 600 MB per row); `chunked_logps` runs lm_head +
log-softmax over chunks of positions and recomputes each chunk's softmax in backward, so at most one
chunk of logits is alive. `Policy` runs it inside the FSDP root's forward, where lm_head's full weight
is gathered.
"""

import contextlib

import torch
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from nanoalign import lora, prompt_cache
from nanoalign.config import Config
from nanoalign.loading import empty_hf_model, load_hf_weights
from nanoalign.packing import check_packable, packed_hidden, use_row_attention


def stop_and_pad_ids(processor, hf_model) -> tuple[set[int], int]:
    """The ids that end an assistant turn (the tokenizer's and generation config's EOS), and the pad id."""
    tokenizer, eos = processor.tokenizer, hf_model.generation_config.eos_token_id
    stop_ids = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
    return stop_ids, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def load_processor(model_dir: str):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_dir)


def vision_module(hf_model) -> nn.Module:
    """The vision tower: `visual` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5), `vision_tower` (LLaVA,
    Gemma 3, Gemma 4), `vision_model` (Idefics3, SmolVLM)."""
    for name in ("visual", "vision_tower", "vision_model"):
        module = getattr(hf_model.model, name, None)
        if module is not None:
            return module
    raise ValueError(f"{type(hf_model).__name__}: cannot find its vision tower (looked for visual, vision_tower, vision_model)")


def vision_blocks(hf_model) -> list[nn.Module]:
    """The vision tower's blocks: its largest nn.ModuleList (Qwen3-VL's deepstack mergers are a shorter one)."""
    lists = [m for m in vision_module(hf_model).modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def decoder_layers(hf_model) -> list[nn.Module]:
    """The text decoder's layers by HF's own lookup (`language_model`; Idefics3/SmolVLM `text_model`); hybrid
    stacks (Qwen3.5) are one list like any other: each layer is one FSDP unit whatever its attention."""
    return list(hf_model.get_decoder().layers)


class Policy(nn.Module):
    """A VLM whose forward returns (logps, entropy): logps[b, t] = log softmax(z_{b,t-1} / temperature)[ids[b, t]],
    logps[:, 0] = 0; entropy (detached) when asked for. logps_mask (B, T), optional: computed only where 1 (losses
    read completion tokens: most lm_head work skipped, as TRL's logits_to_keep). shared_prompts, optional: the
    distinct prompts of RL rows that come G per prompt, each read once (`shared_prompt_hidden`).
    padding_free: rows without shared prompts go as one packed sequence, no pad computed (packing.py)."""

    def __init__(self, hf_model, logps_chunk_size: int = 128, padding_free: bool = False):
        super().__init__()
        self.hf = hf_model
        self.logps_chunk_size = logps_chunk_size
        self.padding_free = padding_free  # rows forwarded as one packed sequence (nanoalign/packing.py)
        if padding_free:
            check_packable(hf_model)
            use_row_attention(hf_model)
        # Some families cap their final logits, z = c tanh(z / c) (Gemma 2-4's final_logit_softcapping);
        # HF applies it after lm_head, and since we compute lm_head ourselves, so must we.
        self.logit_softcap = getattr(hf_model.config.get_text_config(), "final_logit_softcapping", None)

    def forward(self, input_ids, attention_mask, *, temperature: float = 1.0, with_entropy: bool = False,
                logps_mask=None, shared_prompts: dict | None = None, **mm_inputs):  # fmt: skip
        # The base model (vision tower + decoder, no lm_head) gives the final normed hidden states.
        # HF's checkpointed layers drop the KV cache in train mode, which the shared-prompt forward needs:
        # nanoalign/prompt_cache.py makes it safe to keep for full-attention decoders.
        if shared_prompts and (not self.hf.is_gradient_checkpointing or prompt_cache.serves(self.hf)):
            hidden = shared_prompt_hidden(self.hf, input_ids, attention_mask, shared_prompts)
        elif self.padding_free:
            hidden = packed_hidden(self.hf, input_ids, attention_mask, mm_inputs)
        else:
            hidden = self.hf.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **mm_inputs).last_hidden_state
        hidden = hidden[:, :-1]  # (B, T-1, H): position t predicts token t+1
        targets = input_ids[:, 1:]  # (B, T-1)
        weight = self.hf.get_output_embeddings().weight  # (V, H), gathered: we are inside the root forward
        keep = torch.ones_like(targets, dtype=torch.bool) if logps_mask is None else logps_mask[:, 1:].bool()
        kept_logps, kept_entropy = chunked_logps(
            hidden[keep][None], weight, targets[keep][None], temperature, self.logps_chunk_size, with_entropy, self.logit_softcap
        )  # (1, N_kept) each
        logps = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)  # (B, T)
        logps[:, 1:][keep] = kept_logps[0]  # an index_put: the gradient flows back to kept_logps
        if not with_entropy:
            return logps, None
        entropy = torch.zeros_like(logps)
        entropy[:, 1:][keep] = kept_entropy[0]
        return logps, entropy

    def generate(self, **kwargs):
        """HF generate; registered with FSDP so the root's hooks run as they do for forward."""
        return self.hf.generate(**kwargs)

    def sample(self, prompt_enc: dict, **kwargs):
        """sampler.sample, registered with FSDP like generate (calling self.hf would make a decoder layer the root)."""
        from nanoalign.sampler import sample

        return sample(self.hf, prompt_enc, **kwargs)


def shared_prompt_hidden(hf_model, input_ids, attention_mask, prompts: dict) -> torch.Tensor:
    """The base model's hidden states (B, T, H) of B right-padded rows prompt + completion, each prompt (and
    its images) through the model once, not G times.

    Rows come in P groups of G = B / P sharing a prompt; prompts is their processor batch, left-padded as
    the rows' prompts (Rollout.shared_prompts). The prompts run once with a KV cache repeated for the G rows
    of each, then the completions run on it at the following positions. The cache keeps its autograd graph,
    so gradients flow back into the prompt and images. The whole-row forward up to rounding (~1e-6).
    """
    from nanoalign.sampler import expand_row_state, prompt_positions

    num_prompts, prompt_width = prompts["input_ids"].shape  # (P, Tp), left-padded
    group = input_ids.shape[0] // num_prompts
    prompt_lengths = prompts["attention_mask"].sum(1).repeat_interleave(group)  # (B,) real prompt tokens per row
    positions = prompt_positions(hf_model, prompts)  # (P, Tp) or (C, P, Tp)
    recomputed = hf_model.is_gradient_checkpointing and hf_model.training  # layers run again in backward
    def keep_cache():
        return prompt_cache.checkpointed_layers_keep_cache(decoder_layers(hf_model)) if recomputed else contextlib.nullcontext()

    with keep_cache():  # (use_cache is what HF switches off under checkpointing; the cache passed is used either way)
        out = hf_model.model(**prompts, position_ids=positions, use_cache=not recomputed,
                             past_key_values=prompt_cache.PromptKV() if recomputed else None)  # fmt: skip
    cache = out.past_key_values
    if recomputed:
        cache = cache.repeated(group)
    else:
        cache.batch_repeat_interleave(group)
    expand_row_state(hf_model, group)
    # Row b's completion is input_ids[b, prompt_lengths[b]:]; lay the completions out as (B, L).
    width = input_ids.shape[1]
    steps = torch.arange(width - int(prompt_lengths.min()), device=input_ids.device)  # (L,)
    source = prompt_lengths[:, None] + steps  # (B, L) column of each completion token in its row
    valid = source < width
    source = source.clamp(max=width - 1)
    completion_ids = input_ids.gather(1, source).masked_fill(~valid, 0)
    completion_mask = attention_mask.gather(1, source) * valid
    completion_positions = positions[..., -1:].repeat_interleave(group, dim=-2) + 1 + steps  # (B, L) or (C, B, L)
    with keep_cache():
        completion = hf_model.model(
            input_ids=completion_ids, position_ids=completion_positions, past_key_values=cache, use_cache=not recomputed,
            attention_mask=torch.cat([prompts["attention_mask"].repeat_interleave(group, dim=0), completion_mask], dim=1),
        ).last_hidden_state  # (B, L, H)
    # Back to the rows' layout: column t < prompt length reads the prompt's states (shifted past
    # its left padding), the rest the completion's.
    columns = torch.arange(width, device=input_ids.device)[None]  # (1, T)
    in_prompt = columns < prompt_lengths[:, None]  # (B, T)
    prompt_index = (columns + prompt_width - prompt_lengths[:, None]).clamp(max=prompt_width - 1)
    completion_index = (columns - prompt_lengths[:, None]).clamp(0, completion.shape[1] - 1)
    prompt_hidden = out.last_hidden_state.repeat_interleave(group, dim=0)  # (B, Tp, H)
    size = completion.shape[-1]
    return torch.where(
        in_prompt[..., None],
        prompt_hidden.gather(1, prompt_index[..., None].expand(-1, -1, size)),
        completion.gather(1, completion_index[..., None].expand(-1, -1, size)),
    )


class _ChunkedLogps(torch.autograd.Function):
    """log_softmax(h W^T / temp)[target] over chunks of rows; backward recomputes each chunk's softmax.

    d l_t / d z = onehot(target) - softmax(z), so dh = (g * (onehot - p)) W / temp, dW = (g * (onehot - p))^T h / temp,
    with one (chunk, V) block alive at a time. A softcap c (logits c tanh(h W^T / c)) adds a factor 1 - tanh^2.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, with_entropy, softcap=None):
        logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)  # (N,)
        entropy = torch.zeros_like(logps)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            logits = (hidden[rows] @ weight.T).float()  # (C, V), upcast like TRL's selective_log_softmax
            if softcap is not None:
                logits = logits.div_(softcap).tanh_().mul_(softcap)
            if temperature != 1.0:
                logits.div_(temperature)  # in place: a second (C, V) block would double the peak
            lse = torch.logsumexp(logits, dim=-1)  # (C,)
            logps[rows] = logits.gather(1, targets[rows, None]).squeeze(1) - lse
            if with_entropy:  # H = lse - sum_v p_v z_v
                entropy[rows] = lse - (torch.softmax(logits, -1) * logits).sum(-1)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.temperature, ctx.chunk_size, ctx.softcap = temperature, chunk_size, softcap
        ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy):
        hidden, weight, targets = ctx.saved_tensors
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            logits = (hidden[rows] @ weight.T).float()  # (C, V)
            capped = logits.div_(ctx.softcap).tanh_() if ctx.softcap is not None else None  # tanh(z / c), in place
            if capped is not None:
                logits = capped * ctx.softcap  # the one extra (C, V) block a softcap costs
            if ctx.temperature != 1.0:
                logits.div_(ctx.temperature)
            dlogits = torch.softmax(logits, dim=-1).neg_()  # (C, V): onehot - p, times the incoming gradient
            del logits  # with the in-place ops: one (C, V) block alive at a time, not three
            dlogits.scatter_add_(1, targets[rows, None], torch.ones_like(dlogits[:, :1]))
            dlogits *= grad_logps[rows, None] / ctx.temperature
            if capped is not None:  # d(c tanh(z / c)) / dz = 1 - tanh^2
                dlogits *= capped.square_().neg_().add_(1)
                del capped
            if grad_hidden is not None:
                grad_hidden[rows] = (dlogits.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                add_weight_grad_(grad_weight, dlogits, hidden[rows])
        grad_weight = grad_weight.to(weight.dtype) if grad_weight is not None else None
        return grad_hidden, grad_weight, None, None, None, None, None


def add_weight_grad_(grad_weight, dlogits, hidden) -> None:
    """grad_weight (V, H) fp32 += dlogits (C, V)^T @ hidden (C, H), in place: no (V, H) temporary.

    On a GPU with bf16 (or fp16) activations the GEMM runs in that dtype with an fp32 output
    (addmm's out_dtype: cuBLAS multiplies at tensor-core speed and accumulates in fp32); an fp32 GEMM
    with TF32 off is several times slower and was ~10-15% of a GPU SFT step. dlogits is rounded to
    the compute dtype first, as grad_hidden's GEMM already does. On CPUs (no such kernel) and in
    fp32 it is the fp32 GEMM.
    """
    if grad_weight.device.type != "cpu" and hidden.dtype in (torch.bfloat16, torch.float16):
        torch.addmm(grad_weight, dlogits.T.to(hidden.dtype), hidden, out_dtype=torch.float32, out=grad_weight)
    else:
        grad_weight.addmm_(dlogits.T, hidden.float())


def logps_chunk_size(requested: int, device_type: str) -> int:
    """--logps-chunk-size, with 0 resolved by device: 128 positions on CPUs (the fastest there, as
    bench/logps.py measures) and 1024 on GPUs, where a (128, V) GEMM leaves the tensor cores idle
    and a (1024, V) fp32 block costs 0.6 GB at V = 152k, small next to a GPU's memory."""
    return requested or (1024 if device_type == "cuda" else 128)


def chunked_logps(hidden, weight, targets, temperature: float = 1.0, chunk_size: int = 128, with_entropy: bool = False,
                  softcap: float | None = None):  # fmt: skip
    """Log-probs (and entropies) of `targets` under logits hidden @ weight^T / temperature (softcap c: c tanh(. / c)).
    hidden (B, T, H), weight (V, H), targets (B, T) -> logps, entropy (B, T) fp32; peak extra memory chunk_size x V."""
    B, T, H = hidden.shape
    logps, entropy = _ChunkedLogps.apply(hidden.reshape(B * T, H), weight, targets.reshape(B * T), temperature, chunk_size, with_entropy, softcap)
    return logps.view(B, T), entropy.view(B, T)


def shard_policy(policy: Policy, mesh, *, bf16: bool, activation_checkpointing: bool = False) -> Policy:
    """Apply FSDP2: each vision block, each decoder layer, then the root, which holds the rest: embeddings and
    lm_head (used at the two ends of the forward, so gathered once with the root), final norm, vision patch
    embedding and merger. On GPU parameters are gathered in bf16, gradients reduced in fp32; the optimizer
    sees the fp32 shards."""
    if activation_checkpointing:  # HF's per-layer checkpointing; must be set before wrapping
        policy.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in vision_blocks(policy.hf):
        fully_shard(block, mesh=mesh, mp_policy=mp)
    for layer in decoder_layers(policy.hf):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(policy, mesh=mesh, mp_policy=mp)
    # Gradients are SUMMED over ranks, not averaged (as torchtitan does): every loss divides by its own
    # normaliser, a count over the whole optimizer step on all ranks (the rule in train.py's docstring).
    # (Factor 1 alone is a PREMUL_SUM, which gloo lacks; forcing SUM makes it a plain sum everywhere.)
    for module in policy.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    register_fsdp_forward_method(policy, "generate")
    register_fsdp_forward_method(policy, "sample")
    return policy


@contextlib.contextmanager
def gathered_for_generation(policy: Policy):
    """`with gathered_for_generation(policy): policy.generate(...)`: every FSDP unit's full weights gathered once.

    Generation runs a forward per token and ranks finish at different lengths: sharded, every call would
    all-gather and a rank that stopped early would leave the others waiting forever. Eval mode inside: in
    train mode HF's checkpointed layers drop the KV cache (dropout is off, so eval mode changes no number).
    """
    units = [m for m in policy.modules() if isinstance(m, FSDPModule)]
    was_training = policy.training
    policy.eval()
    policy.set_reshard_after_forward(False)  # recurse=True: every unit keeps its gathered weights
    for unit in units:
        unit.unshard()
    try:
        yield policy
    finally:
        policy.train(was_training)
        for unit in units:
            unit.reshard()
        for unit in units:  # restore the defaults: root keeps its weights (used at once by backward), others reshard
            unit.set_reshard_after_forward(unit is not policy, recurse=False)


def freeze(hf_model, dtype: torch.dtype) -> None:
    """Frozen weights (the reference model, a LoRA run's base) only compute: no gradient, and kept in the compute
    dtype, not fp32 shards cast at every gather (bf16: half the memory, the same numbers). Parameters only:
    buffers such as rotary inv_freq stay fp32."""
    hf_model.requires_grad_(False)
    for param in hf_model.parameters():
        param.data = param.data.to(dtype)


def build_policy(model_dir: str, cfg: Config, mesh, bf16: bool, trainable: bool) -> Policy:
    """Build the model on meta, shard it (shard_policy), then fill the shards: rank 0 reads the checkpoint, every
    rank receives only its rows (loading.py). No rank ever holds a full copy of the model."""
    hf_model = empty_hf_model(model_dir, cfg.attn_implementation)
    if cfg.freeze_vision:
        vision_module(hf_model).requires_grad_(False)
    if trainable:
        # Train mode (HF skips activation checkpointing in eval mode) must not change any log-prob (old, reference
        # and sampled ones are compared with the current ones): dropout off, as TRL's disable_dropout.
        hf_model.train()
        for module in hf_model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        if cfg.lora_rank:  # after the dropout switch-off: --lora-dropout is the adapters' own
            freeze(hf_model, torch.bfloat16 if bf16 else torch.float32)
            lora.add_adapters(hf_model, cfg)
    else:  # the frozen reference: same sharding, never updated, no activation checkpoints
        freeze(hf_model.eval(), torch.bfloat16 if bf16 else torch.float32)
    policy = Policy(hf_model, logps_chunk_size(cfg.logps_chunk_size, mesh.device_type), cfg.padding_free)
    policy = shard_policy(policy, mesh, bf16=bf16, activation_checkpointing=cfg.activation_checkpointing and trainable)
    load_hf_weights(policy, model_dir, mesh.device_type)
    if trainable and cfg.lora_rank:
        lora.init_adapters(hf_model, cfg.seed)
    return policy
