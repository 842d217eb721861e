"""Will it fit? The memory each GPU needs for a run, by component, from the model's config alone.

    python -m nanoalign.plan --model Qwen/Qwen2.5-VL-7B-Instruct --algo grpo --gpus 8 [train.py's flags]
    python -m nanoalign.plan --model DIR --algo sft --gpus 2 --device cpu --row-length 300   # a CPU run, in host RAM

It reads config.json only (a local directory, or the one file from the hub): the model is built on
the meta device to count its parameters, no weight is read. Every other flag is train.py's, read
the same way (--algo's preset, then the flags), plus the workload's shape: --row-length (tokens per
row, image tokens included; default --max-length), --image-pixels (per row, 0 for text) and, for
RL, --prompt-length (default: the row length less --max-completion-length).

What is counted, per rank, W ranks, P parameters (P_t trainable), b = bytes of the compute dtype
(2 for bf16 on GPUs, 4 for fp32), as nanoalign/model.py shards and computes:
  parameters        fp32 shards 4 P / W; the reference model (when the run has one) b P / W
  gathered          the FSDP root unit (embeddings, lm_head, vision patch embed and merger) in b
                    bytes for the whole step, and two decoder layers (one computing, one prefetched)
  gradients         fp32 shards 4 P_t / W, and one unit's full gradient while it is reduced
  optimizer         AdamW's two fp32 moments, 8 P_t / W
  activations       what autograd keeps per token and layer (below) for every row of a micro-batch;
                    with --activation-checkpointing each layer's input only, plus one layer recomputed
  log-prob chunks   the (chunk, V) blocks of nanoalign.model.chunked_logps (fp32, with a b-byte copy)
  generation        in-process sampling: the whole model gathered in b bytes and the KV cache of a
                    micro-batch (rows x (prompt + completion) x layers x 2 x KV width); grads are
                    freed by then (zero_grad), optimizer state is not
  vLLM              colocated: --vllm-gpu-memory-utilization x the GPU's memory, held all along
The training peak is the larger of two moments, the start of backward (activations, no gradients
yet: zero_grad frees them) and its end (every gradient shard, one unit's full gradient being reduced);
the peak is the larger of the training and the generation phase. Per token and decoder layer autograd
keeps (transformers' Qwen2-style layer, SDPA): the two RMSNorms' fp32 input and b-byte output, the
attention's q, k, v after RoPE (k and v repeated to the query heads when rows are padded), its output
and the o_proj input, and the MLP's gate, up, SiLU(gate) and product: (4 + b) 2H + b (3H + 2 KV) + 4 b I
bytes. The vision tower counts the same per patch with its own widths. RL rows count whole, though
training reads each prompt once for its G rows: measured, that forward's peak was whole rows'.
Not counted: the CUDA context and NCCL buffers (~1-2 GB on a GPU, added as a flat 2 GiB line there),
allocator fragmentation, and the Python process itself. Validated against measured peaks on CPUs
(BENCHMARKS.md section "Memory planner"); GPU figures are predictions.
"""

import argparse
import dataclasses
import sys

GIB = 2**30


@dataclasses.dataclass
class Shape:
    """What the memory depends on, read from a model config (counts of parameters, widths)."""

    total: int  # all parameters
    vision: int  # the vision tower's (not trained with --freeze-vision)
    root: int  # the FSDP root unit: everything not in a decoder layer or vision block
    layer: int  # the largest decoder layer
    block: int  # the largest vision block
    layers: int
    hidden: int
    intermediate: int
    kv_width: int  # KV heads x head dim
    vocab: int
    blocks: int
    vision_hidden: int
    vision_intermediate: int
    patch_pixels: int  # pixels per vision patch (patch x patch)
    merge: int  # patches per image token (spatial merge squared)


def read_shape(model: str) -> Shape:
    """The model's Shape from its config.json alone: built on the meta device, no weights read."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from nanoalign.model import decoder_layers, vision_blocks, vision_module

    config = AutoConfig.from_pretrained(model)
    with torch.device("meta"):
        hf = AutoModelForImageTextToText.from_config(config)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    total, vision = count(hf), count(vision_module(hf))
    layers, blocks = decoder_layers(hf), vision_blocks(hf)
    text, vcfg = config.get_text_config(), config.vision_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    patch = getattr(vcfg, "patch_size", 14)
    return Shape(
        total=total, vision=vision,
        root=total - sum(count(m) for m in layers) - sum(count(m) for m in blocks),
        layer=max(count(m) for m in layers), block=max((count(m) for m in blocks), default=0),
        layers=len(layers), hidden=text.hidden_size, intermediate=text.intermediate_size,
        kv_width=text.num_key_value_heads * head_dim, vocab=text.vocab_size, blocks=len(blocks),
        vision_hidden=vcfg.hidden_size, vision_intermediate=getattr(vcfg, "intermediate_size", 4 * vcfg.hidden_size),
        patch_pixels=patch * patch, merge=getattr(vcfg, "spatial_merge_size", 1) ** 2,
    )  # fmt: skip


def layer_bytes_per_token(hidden: int, kv_width: int, intermediate: int, b: int) -> int:
    """Bytes autograd keeps per token for one transformer layer (the module docstring's formula)."""
    return (4 + b) * 2 * hidden + b * (3 * hidden + 2 * kv_width) + 4 * b * intermediate


def plan(shape: Shape, cfg, *, gpus: int, device: str, row_length: int, prompt_length: int, image_pixels: int,
         gpu_memory_gib: float, needs_reference: bool) -> dict[str, float]:  # fmt: skip
    """Bytes per rank by component, with "train_peak", "generation_peak", "peak" and "total" (the peak
    plus what is held outside it: vLLM's reservation, the GPU runtime)."""
    from nanoalign.model import logps_chunk_size

    gpu = device == "cuda"
    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and gpu)
    b = 2 if bf16 else 4
    W = gpus
    rl = cfg.algo in ("grpo", "gspo", "rloo", "online_dpo")
    rows = cfg.batch_size * (2 if cfg.algo in ("dpo", "mpo") else 1)  # a preference micro-batch holds chosen and rejected
    # Whole rows, RL included: the shared-prompt forward (model.shared_prompt_hidden) reads each prompt
    # once, but its measured peak was that of whole rows (BENCHMARKS.md section 11), so it is counted so.
    tokens, images = rows * row_length, rows
    kv = shape.kv_width if cfg.batch_size == 1 and not rl else shape.hidden  # padded rows: SDPA gets k, v repeated
    patches = images * image_pixels // shape.patch_pixels
    # The reference model: kept in the compute dtype (model.build_policy); none when precomputed or beta = 0.
    reference = needs_reference and not cfg.precompute_ref_logps
    trainable = shape.total - shape.vision if cfg.freeze_vision else shape.total
    c = {
        "parameters": 4 * shape.total / W + (b * shape.total / W if reference else 0),
        "gradients": 4 * trainable / W,
        "optimizer": 8 * trainable / W,
    }
    gathered = b * (shape.root + 2 * max(shape.layer, shape.block))
    reduce = (4 + b) * max(shape.layer, shape.block, shape.root)  # a unit's full gradient, and its fp32 copy for the reduction
    # Activations: what autograd keeps (module docstring), text and vision; checkpointing keeps each
    # layer's input and recomputes one layer at a time.
    text_layer = tokens * layer_bytes_per_token(shape.hidden, kv, shape.intermediate, b)
    vision_layer = patches * layer_bytes_per_token(shape.vision_hidden, shape.vision_hidden, shape.vision_intermediate, b)
    heads = rows * row_length * 3 * b * shape.hidden  # the embeddings' output, the final norm's, the lm_head's input
    full = shape.layers * text_layer + shape.blocks * vision_layer + heads
    kept_inputs = b * (shape.layers * tokens * shape.hidden + shape.blocks * patches * shape.vision_hidden) + heads
    # One layer's working set on top in backward: its gradients are about its saved activations.
    working = max(text_layer, vision_layer)
    activations = (kept_inputs + 2 * working) if cfg.activation_checkpointing else full + working
    chunk = min(logps_chunk_size(cfg.logps_chunk_size, device), rows * row_length)
    logps = chunk * shape.vocab * (4 + 4 + b)  # logits (fp32), softmax (fp32), the compute-dtype product
    pixels = images * image_pixels * 3 * 2 * 4  # pixel_values: fp32, 2 frames per patch (Qwen's temporal patch)
    # Two moments compete for the peak: the start of backward (every activation kept; gradients still
    # None after zero_grad, unless accumulated from an earlier micro-batch) and its end (every gradient
    # shard, the last unit's full gradient being reduced).
    held = c["parameters"] + c["optimizer"] + gathered + pixels
    start_of_backward = activations + logps + (c["gradients"] if cfg.grad_accum_steps > 1 else 0)
    # FSDP2 frees a unit's gathered weights before it reduces that unit's gradient (post_backward), so the
    # unit being reduced is not also counted gathered: it matters when the root is the largest unit.
    end_of_backward = c["gradients"] + reduce - b * max(shape.layer, shape.block, shape.root)
    train_peak = held + max(start_of_backward, end_of_backward)
    c.update({"gathered units": gathered, "gradient reduction": reduce, "activations": activations, "log-prob chunks": logps,
              "inputs": pixels})  # fmt: skip
    generation = 0.0
    if rl and cfg.vllm_mode == "none":
        # gathered_for_generation: the whole model in b bytes on every rank, and one micro-batch's KV cache.
        completion = cfg.max_completion_length
        kv_cache = cfg.batch_size * (prompt_length + completion) * shape.layers * 2 * shape.kv_width * b
        prefill = (cfg.batch_size // cfg.num_generations) * prompt_length * (b * (3 * shape.hidden + 3 * shape.intermediate))
        generation = c["parameters"] + c["optimizer"] + b * shape.total + kv_cache + prefill
        c.update({"generation: gathered model": b * shape.total, "generation: KV cache": kv_cache})
    c["train_peak"], c["generation_peak"] = train_peak, generation
    c["peak"] = max(train_peak, generation)
    held = 0.0  # outside the process's tensors: vLLM's reservation, the GPU runtime
    if cfg.vllm_mode == "colocate":
        c["vLLM reservation"] = cfg.vllm_gpu_memory_utilization * gpu_memory_gib * GIB
        held += c["vLLM reservation"]
    if gpu:
        c["CUDA context, NCCL (estimate)"] = 2 * GIB
        held += c["CUDA context, NCCL (estimate)"]
    c["total"] = c["peak"] + held
    return c


def fitting_flags(shape: Shape, cfg, budget: float, **kwargs) -> list[str]:
    """Flag changes, tried one after another (each on top of the last), that bring the total under budget."""
    changes, trials = [], []
    if not cfg.activation_checkpointing:
        trials.append(("--activation-checkpointing", {"activation_checkpointing": True}))
    if cfg.vllm_mode == "colocate":
        trials.append(("--vllm-gpu-memory-utilization", None))
    step = cfg.num_generations if cfg.algo in ("grpo", "gspo", "rloo", "online_dpo") else 1
    trials.append(("--batch-size", None))
    if not cfg.freeze_vision:
        trials.append(("--freeze-vision", {"freeze_vision": True}))
    for flag, change in trials:
        if plan(shape, cfg, **kwargs)["total"] <= budget:
            break
        if flag == "--batch-size":
            while cfg.batch_size > step and plan(shape, cfg, **kwargs)["total"] > budget:
                cfg = dataclasses.replace(cfg, batch_size=max(step, cfg.batch_size // 2 // step * step))
            changes.append(f"--batch-size {cfg.batch_size} (more --grad-accum-steps keep the step's size)")
        elif flag == "--vllm-gpu-memory-utilization":
            need = plan(shape, cfg, **kwargs)["total"] - budget
            util = cfg.vllm_gpu_memory_utilization - need / (kwargs["gpu_memory_gib"] * GIB)
            if util < 0.1:
                continue  # vLLM needs its weights and some KV cache: not a lever past this
            cfg = dataclasses.replace(cfg, vllm_gpu_memory_utilization=round(util - 0.005, 2))
            changes.append(f"--vllm-gpu-memory-utilization {cfg.vllm_gpu_memory_utilization}")
        else:
            cfg = dataclasses.replace(cfg, **change)
            changes.append(flag)
    fits = plan(shape, cfg, **kwargs)["total"] <= budget
    return changes if fits else [*changes, "still over: more GPUs (--gpus), shorter rows (--max-length), or LoRA (not in nanoalign yet)"]


def parse(argv: list[str]):
    from nanoalign.config import PRESETS, Config, check_config

    p = argparse.ArgumentParser(prog="python -m nanoalign.plan", description=__doc__.split("\n")[0], add_help=True)
    p.add_argument("--gpus", type=int, default=8, help="ranks (GPUs) the run is sharded over")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: plan a CPU run (fp32, host RAM per rank)")
    p.add_argument("--row-length", type=int, default=None, help="tokens per row, image tokens included (default --max-length)")
    p.add_argument("--prompt-length", type=int, default=None, help="RL: prompt tokens (default row length - --max-completion-length)")
    p.add_argument("--image-pixels", type=int, default=1024 * 1024, help="image pixels per row (0: text only)")
    p.add_argument("--json", action="store_true", help="print the components as JSON")
    args, rest = p.parse_known_args(argv)
    import tyro

    algo = next((rest[i + 1] for i, a in enumerate(rest[:-1]) if a == "--algo"), "sft")
    if algo not in PRESETS:
        raise SystemExit(f"--algo {algo!r} is not one of {sorted(PRESETS)}")
    cfg = tyro.cli(Config, default=PRESETS[algo](), args=rest)
    check_config(cfg)
    if args.gpus < 1:
        raise SystemExit(f"--gpus must be >= 1, got {args.gpus}")
    return args, cfg


def needs_reference(cfg) -> bool:
    """Whether the run keeps a reference model (the algorithm modules' own rule, asked without loading them)."""
    import importlib

    module = {"dpo": "mpo", "gspo": "grpo"}.get(cfg.algo, cfg.algo)
    return importlib.import_module(f"nanoalign.{module}").needs_reference(cfg)


def main(argv: list[str] | None = None) -> dict:
    args, cfg = parse(sys.argv[1:] if argv is None else argv)
    from nanoalign.tiny import BUILDERS, ensure_tiny

    # Built-in models: their own config (tiny-sft is tiny, trained); anything else: a directory or hub id.
    model = str(ensure_tiny("tiny" if cfg.model == "tiny-sft" else cfg.model)) if cfg.model in (*BUILDERS, "tiny-sft") else cfg.model
    shape = read_shape(model)
    row = args.row_length or cfg.max_length
    rl = cfg.algo in ("grpo", "gspo", "rloo", "online_dpo")
    kwargs = {
        "gpus": args.gpus, "device": args.device, "row_length": row, "image_pixels": args.image_pixels,
        "prompt_length": args.prompt_length or max(1, row - cfg.max_completion_length) if rl else row,
        "gpu_memory_gib": args.gpu_memory_gib, "needs_reference": needs_reference(cfg),
    }  # fmt: skip
    c = plan(shape, cfg, **kwargs)
    budget = args.gpu_memory_gib * GIB
    fix = fitting_flags(shape, cfg, budget, **kwargs) if c["total"] > budget else []
    if args.json:
        import json

        print(json.dumps({"components_bytes": c, "fits": c["total"] <= budget, "flags_to_fit": fix}))
        return c
    print(f"{cfg.model}: {shape.total / 1e9:.2f}B parameters ({shape.vision / 1e9:.2f}B vision), --algo {cfg.algo}, "
          f"{args.gpus} x {args.gpu_memory_gib:g} GiB, rows of {row} tokens, {args.image_pixels} image pixels, "
          f"micro-batch {cfg.batch_size}, activation checkpointing {'on' if cfg.activation_checkpointing else 'off'}")  # fmt: skip
    for name, value in c.items():
        if name in ("train_peak", "generation_peak", "peak", "total"):
            continue
        print(f"  {name:<32} {value / GIB:8.2f} GiB")
    print(f"  {'peak of training':<32} {c['train_peak'] / GIB:8.2f} GiB  (not the sum: gradients and activations peak at different moments)")
    if c["generation_peak"]:
        print(f"  {'peak of in-process generation':<32} {c['generation_peak'] / GIB:8.2f} GiB")
    print(f"  {'total per GPU':<32} {c['total'] / GIB:8.2f} GiB  ->  {'fits' if c['total'] <= budget else 'does NOT fit'}")
    if fix:
        print("  to fit: " + ", ".join(fix))
    return c


if __name__ == "__main__":
    main()
