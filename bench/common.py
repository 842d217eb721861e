"""What every benchmark script shares: model configs, fresh-subprocess runs, the matmul peak, tables.

Each measured configuration runs in its own child process (`run_child`), so one configuration's
allocations never inflate another's peak memory: the child reports its own high-water mark
(ru_maxrss on CPU, torch.cuda.max_memory_allocated on GPU) next to its results as one JSON line.

Models. "tiny" is nanoalign's built-in tiny Qwen2.5-VL (~1M parameters). "small" is the same
architecture, tokenizer and processor at ~70M parameters, random init, built here (no download):

    text:   hidden 768, 8 layers, 12 heads (head_dim 64), 2 KV heads, MLP 3072
    vision: hidden 256, 4 blocks, 4 heads, MLP 1024, merged into the text width

Any other size: `--hidden/--layers/...` on the scripts that take a model, or `build_model(**sizes)`.
"""

import dataclasses
import hashlib
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository: train.py and nanoalign/ live here
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULT_PREFIX = "BENCH_RESULT "  # the child's one machine-readable stdout line


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """A Qwen2.5-VL size. The tokenizer (and so the vocabulary) is always the built-in tiny one."""

    hidden: int = 768
    layers: int = 8
    heads: int = 12
    kv_heads: int = 2
    intermediate: int = 3072
    vision_hidden: int = 256
    vision_depth: int = 4
    vision_heads: int = 4
    vision_intermediate: int = 1024
    max_positions: int = 4096


SIZES = {"small": ModelSize()}  # "tiny" is nanoalign's own built-in model


def add_model_flags(parser) -> None:
    """--model tiny|small|DIR, and the size flags that override "small"."""
    parser.add_argument("--model", default="tiny", help="tiny (built-in, ~1M params), small (~70M, built here), real3b (alias real) / real7b (bench/real_shapes.py) or a model directory")
    for f in dataclasses.fields(ModelSize):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=None, help=f"small model: {f.name} (default {f.default})")


def add_step_flags(parser, algos: list[str]) -> None:
    """The flags every per-algorithm benchmark takes: model, algorithms, steps, batch size, threads."""
    add_model_flags(parser)
    parser.add_argument("--algos", nargs="+", default=algos, choices=algos)
    parser.add_argument("--steps", type=int, default=5, help="measured steps per run (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps dropped")
    parser.add_argument("--batch-size", type=int, default=None, help="override the presets' batch size")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each child")


def model_from_args(args) -> str:
    """The directory of the model the flags describe (built on first use): tiny, small (+ size flags),
    real3b (or real) / real7b (bench/real_shapes.py: the real widths and vocabulary, 2 text + 2 vision
    layers) or a directory."""
    if args.model in ("real", "real3b", "real7b"):
        from bench.real_shapes import build_real_model

        return str(build_real_model("7b" if args.model == "real7b" else "3b"))
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(ModelSize) if getattr(args, f.name) is not None}
    if args.model == "tiny" and not overrides:
        return model_dir("tiny")
    if args.model in ("tiny", "small") or overrides:
        return model_dir("small", dataclasses.replace(SIZES["small"], **overrides))
    return args.model


def model_dir(name: str, size: ModelSize | None = None) -> str:
    """Path of a built model: "tiny" (nanoalign's) or a ModelSize built next to it in the cache."""
    from nanoalign.tiny import cache_dir, ensure_tiny

    tiny = ensure_tiny("tiny")
    if name == "tiny":
        return str(tiny)
    size = size or SIZES[name]
    key = hashlib.sha1(json.dumps(dataclasses.asdict(size), sort_keys=True).encode()).hexdigest()[:10]
    out = cache_dir() / f"bench-qwen25vl-{key}"
    if not (out / "config.json").exists():
        build_model(tiny, size, out)
    return str(out)


def model_config(tiny_dir: Path, size: ModelSize):
    """The Qwen2_5_VLConfig of `size`, with the tiny model's vocabulary and special token ids."""
    from transformers import Qwen2_5_VLConfig

    tiny_cfg = Qwen2_5_VLConfig.from_pretrained(tiny_dir)
    text = tiny_cfg.text_config.to_dict()
    text.update(
        hidden_size=size.hidden, intermediate_size=size.intermediate, num_hidden_layers=size.layers,
        num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
        max_position_embeddings=size.max_positions, layer_types=["full_attention"] * size.layers,
    )  # fmt: skip
    half = size.hidden // size.heads // 2  # mrope sections split head_dim / 2 over (t, h, w)
    text["rope_parameters"] = {**text["rope_parameters"], "mrope_section": [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]}
    vision = tiny_cfg.vision_config.to_dict()
    vision.update(
        hidden_size=size.vision_hidden, depth=size.vision_depth, num_heads=size.vision_heads,
        intermediate_size=size.vision_intermediate, out_hidden_size=size.hidden,
        fullatt_block_indexes=list(range(size.vision_depth - 1, size.vision_depth)),
    )  # fmt: skip
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=tiny_cfg.image_token_id,
        video_token_id=tiny_cfg.video_token_id, vision_start_token_id=tiny_cfg.vision_start_token_id,
        vision_end_token_id=tiny_cfg.vision_end_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    return config


def build_model(tiny_dir: Path, size: ModelSize, out: Path) -> None:
    """Random-init Qwen2.5-VL of `size` with the tiny model's tokenizer, processor and special ids."""
    import torch
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    config = model_config(tiny_dir, size)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config)
    tiny_gen = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir).generation_config
    model.generation_config.eos_token_id = tiny_gen.eos_token_id
    model.generation_config.pad_token_id = tiny_gen.pad_token_id
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    AutoProcessor.from_pretrained(tiny_dir).save_pretrained(tmp)
    os.replace(tmp, out)


def load_hf_model(model_dir: str):
    """A whole fp32 HF model in this process (benchmarks and tests; training loads sharded, nanoalign/loading.py)."""
    import torch
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)


def hf_state_dict(policy) -> dict:
    """The full CPU state dict under the model's own names (tied weights under each), on rank 0 ({} elsewhere).
    Collective (tests compare it with a reference model's state_dict())."""
    from nanoalign.loading import gather_full, unique_tensors

    state = {}
    for names, tensor in unique_tensors(getattr(policy, "hf", policy)):
        full = gather_full(tensor)
        if full is not None:
            state.update({re.sub(r"^hf\.", "", name): full for name in names})
    return state


def trl_training_args(output_dir: str) -> dict:
    """The TrainingArguments every benchmark gives TRL besides its batch and step counts: a constant LR, a
    log line every step, no checkpoints, tracker, gradient checkpointing or dataloader workers, and
    nanoalign's precision: bf16 on a GPU, fp32 on a CPU (TRL's configs default to bf16 autocast, which
    on a CPU with bf16 matrix instructions ran 1.9x the fp32 rate: BENCHMARKS.md section 12)."""
    import torch

    gpu = torch.cuda.is_available()
    return dict(output_dir=output_dir, lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none",
                bf16=gpu, use_cpu=not gpu, gradient_checkpointing=False, dataloader_num_workers=0, seed=0, disable_tqdm=True)  # fmt: skip


def trl_normaliser(loss_type: str, mask, max_completion_length=None, num_items=None):
    """The grpo_loss normaliser that gives TRL's formula of `loss_type` on one micro-batch in one process
    (mask: (B, T)); None when the loss type needs an argument it was not given (tests, vs_trl.py)."""
    rows = mask.shape[0]
    if loss_type == "dr_grpo":
        return rows * max_completion_length if max_completion_length else None
    return {"grpo": rows, "bnpo": max(float(mask.sum()), 1.0), "dapo": num_items}.get(loss_type)


def num_params(model_path: str) -> dict[str, int]:
    """Parameter counts of a saved model: total, text decoder (without embeddings) and vision tower."""
    from safetensors import safe_open

    counts = {"total": 0, "embedding": 0, "vision": 0}
    with safe_open(str(Path(model_path) / "model.safetensors"), "pt") as f:
        for name in f.keys():
            n = f.get_slice(name).get_shape()
            n = int(__import__("math").prod(n))
            counts["total"] += n
            if "embed_tokens" in name or "lm_head" in name:
                counts["embedding"] += n
            elif "visual" in name:
                counts["vision"] += n
    counts["text_layers"] = counts["total"] - counts["embedding"] - counts["vision"]
    return counts


def suppress_image_token_in_rollouts(model_path: str) -> None:
    """Make nanoalign's sampler never emit the image placeholder token, as TRL's GRPOTrainer does.

    A random-init model samples <|image_pad|> like any other token; the training forward then finds
    more image tokens than image features and raises. nanoalign (at the time of writing) does not
    suppress it, so the benchmarks patch nanoalign.rollout.generation_config in their own process
    (see BENCHMARKS.md, "found broken"). TRL suppresses exactly config.image_token_id; so do we.
    """
    import nanoalign.rollout as rollout

    image_token_id = json.loads((Path(model_path) / "config.json").read_text())["image_token_id"]
    original = rollout.generation_config
    if getattr(original, "suppresses_image_token", False):
        return

    def generation_config(**kwargs):
        config = original(**kwargs)
        config.suppress_tokens = [image_token_id]
        return config

    generation_config.suppresses_image_token = True
    rollout.generation_config = generation_config


# ---------------------------------------------------------------------------------------------------
# Fresh subprocesses


def peak_memory_bytes() -> int:
    """This process's peak memory so far: GPU allocator high-water mark, else peak RSS."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def emit(result: dict) -> None:
    """Child side: print the result line the parent parses (peak memory and rank added)."""
    result = {**result, "peak_mem_bytes": peak_memory_bytes(), "rank": int(os.environ.get("RANK", 0))}
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(script: str, spec: dict, *, python: str | None = None, timeout: float = 1800, verbose: bool = False,
              nproc: int = 1) -> dict:  # fmt: skip
    """Run `script --child SPEC` in a fresh interpreter and return the dict it emitted.

    nproc > 1: under torchrun, `nproc` ranks on this machine; the result is rank 0's dict with
    peak_mem_bytes the highest of any rank's (and every rank's in peak_mem_bytes_per_rank).
    A child that fails returns {"error": last lines of its output} instead of raising, so one broken
    configuration does not lose the rest of a table.
    """
    root = Path(script).resolve().parents[1]  # the checkout the script belongs to (usually ROOT)
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.setdefault("OMP_NUM_THREADS", str(spec.get("threads", 2)))
    # Idle OpenMP threads sleep instead of spinning. On a CPU shared with other jobs, spinning
    # threads that lose their core make every parallel region wait for them: 2-thread steps were
    # 5-20x slower and erratic without this, and no slower with it on an idle machine.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # the child's own world, whatever launched us
    if spec.get("mmap_threshold"):  # glibc: serve blocks above this from mmap, returned on free
        env["MALLOC_MMAP_THRESHOLD_"] = str(spec["mmap_threshold"])
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    cmd = [python or sys.executable, *launcher, script, "--child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=root)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    if verbose:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
    results = [json.loads(line[len(RESULT_PREFIX) :]) for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if len(results) == nproc:
        peaks = [r["peak_mem_bytes"] for r in sorted(results, key=lambda r: r["rank"])]
        return {**next(r for r in results if r["rank"] == 0), "peak_mem_bytes": max(peaks), "peak_mem_bytes_per_rank": peaks}
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    return {"error": "\n".join(tail)}


def child_spec(argv: list[str]) -> dict | None:
    """The spec if this process was started as a child (`--child JSON`), else None."""
    if len(argv) >= 3 and argv[1] == "--child":
        return json.loads(argv[2])
    return None


# ---------------------------------------------------------------------------------------------------
# Machine peak and statistics


def matmul_peak(n: int = 2048, repeats: int = 10, dtype: str = "float32") -> dict:
    """Measured dense matmul FLOP/s of this machine (n x n @ n x n), the denominator of MFU.

    Median of `repeats` timed products after one warm-up; on GPU bf16 by default is what training
    uses, on CPU fp32. Run it in the same conditions (threads, load) as the benchmark.
    """
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dt = getattr(torch, dtype)
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    times = []
    for i in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"flops_per_s": 2 * n**3 / med, "best_flops_per_s": 2 * n**3 / min(times), "n": n, "dtype": dtype,
            "device": device, "threads": torch.get_num_threads()}  # fmt: skip


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def machine_info() -> dict:
    import platform

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
            "loadavg_1min": os.getloadavg()[0]}  # fmt: skip
    try:
        info["cpu_model"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))  # noqa: E741
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


# ---------------------------------------------------------------------------------------------------
# Output


def fmt(value, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return format(value, spec)
    return str(value)


def mib(num_bytes) -> float | None:
    return None if num_bytes is None else num_bytes / 2**20


def print_table(rows: list[dict], columns: list[tuple[str, str, str]], title: str = "") -> str:
    """A markdown table. columns: (header, key, format spec). Returns the text (also printed)."""
    lines = [f"\n### {title}\n"] if title else []
    lines.append("| " + " | ".join(h for h, _, _ in columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(k), spec) for _, k, spec in columns) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))
    print(f"\nwrote {path}", flush=True)
