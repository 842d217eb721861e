"""The prepared GPU check: what nanoalign has only ever run on CPUs, run once on a GPU machine, judged.

    bash bench/gpu_check.sh                 # one GPU (an H200 lent for 15 minutes): inside an 8-minute budget
    bash bench/gpu_check.sh --cpu           # every stage at tiny sizes on the CPU (the test suite runs this)

Every stage prints one line, PASS or FAIL, with what it measured and its threshold, and the results
file (bench/results/gpu_check.json, or --out) is rewritten after each stage, so a run cut short keeps
what it measured. Out of memory ends a configuration, recorded as "oom", never the run. A stage the
budget (--budget-s) has no room left for is recorded as "skipped: budget".

  env            versions, the device, a one-rank NCCL group (all-reduce), the measured bf16 matmul peak
  fsdp_vs_cpu    fp32: one SFT step's loss and gradients, FSDP2 on the device (loaded by the sharded
                 loader) vs the unsharded model on the CPU: equal to 1e-5 (relative to the largest)
  bf16_vs_fp32   the same step in bf16 mixed precision vs fp32: loss within 1e-2 (relative),
                 gradient cosine >= 0.99
  sampler_logps  log-probs nanoalign's sampler returns = the trainer's forward on the sampled rows (fp32, 1e-4)
  export_reload  the fp32 policy exported, reloaded with from_pretrained: the same log-probs (1e-4)
  sft, sft_ckpt, grpo, grpo_ckpt
                 bf16 steps on a random-init model with Qwen2.5-VL-3B's shapes (vocabulary 151,936,
                 images of about 1 megapixel), without and with activation checkpointing: step time split
                 into rollout / forward / backward / optimizer, tokens/s, MFU against the measured bf16
                 matmul peak, peak memory, memory per token, and nanoalign.plan's prediction of it.
                 PASS: no out-of-memory, MFU >= 0.25 (0.15 for GRPO, whose steps are short), peak within 20%
                 of the plan. MFU's FLOPs are 6 x parameters x tokens, each prompt (and its image) of an
                 RL group counted once (the shared-prompt forward reads it once), lm_head on the tokens
                 whose log-probs are computed.
  fwd_bwd_7b     7B widths: forward and backward of one SFT micro-batch (no optimizer: one GPU cannot
                 hold 7B's AdamW state); PASS: no out-of-memory.
  two_process_grads
                 with 2 GPUs (skipped with one): one SFT step from 2 processes (NCCL) equals one process's
On the CPU (--cpu) the same stages run tiny models and judge what a CPU can show: correctness as above,
the training stages by a finite loss (MFU and memory are GPU figures).
It needs torch, transformers, tokenizers, pillow and safetensors; tyro and math-verify are replaced by
inert stand-ins when missing (the check builds its Config itself and scores a format reward).
"""

import argparse
import dataclasses
import gc
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SIZES, ModelSize, machine_info, median, model_config, model_dir, write_json  # noqa: E402

# Qwen2.5-VL-3B-Instruct's sizes (bench/configs/qwen2.5-vl-3b/config.json), and 7B's text widths.
QWEN25_VL_3B = ModelSize(hidden=2048, layers=36, heads=16, kv_heads=2, intermediate=11008, vision_hidden=1280,
                         vision_depth=32, vision_heads=16, vision_intermediate=3420, max_positions=8192)  # fmt: skip
QWEN25_VL_7B = dataclasses.replace(QWEN25_VL_3B, hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944)
TINY_3B_SHAPED = ModelSize(hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128, vision_hidden=32, vision_depth=2,
                           vision_heads=1, vision_intermediate=64, max_positions=1024)  # fmt: skip
TINY_7B_SHAPED = dataclasses.replace(TINY_3B_SHAPED, hidden=112, heads=2, intermediate=224)
# Seconds each stage is expected to take on one H200 (the budget skips what no longer fits).
GPU_COST = {"env": 20, "fsdp_vs_cpu": 25, "bf16_vs_fp32": 20, "sampler_logps": 15, "export_reload": 15, "sft": 60,
            "sft_ckpt": 60, "grpo": 75, "grpo_ckpt": 75, "fwd_bwd_7b": 60, "two_process_grads": 40}  # fmt: skip
STAGES = list(GPU_COST)


def stub_missing_packages() -> list[str]:
    """Stand-ins for tyro and math-verify where they are not installed (see the module docstring)."""
    notes = []
    for name in ("tyro", "math_verify", "sympy"):
        if importlib.util.find_spec(name) is not None:
            continue

        class Unavailable:  # importable and instantiable (rewards.py builds a config at import), useless
            def __init__(self, *args, **kwargs):
                pass

        module = types.ModuleType(name)
        module.__getattr__ = lambda attr, _name=name: Unavailable
        sys.modules[name] = module
        notes.append(f"{name} is not installed: a stand-in is used")
    return notes


def boxed_reward(completions: list[str], **columns) -> list[float]:
    """1 for a completion with a \\boxed{...} answer, else 0 (needs no math-verify)."""
    return [1.0 if "\\boxed{" in c else 0.0 for c in completions]


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- models and runs


def config_only_dir(size: ModelSize, vocab: int | None, max_pixels: int | None) -> str:
    """A model directory for `size` with a config (the real vocabulary when given) and the tiny model's
    tokenizer and processor (images up to max_pixels), no weights: random_weights fills them."""
    out = Path(tempfile.mkdtemp(prefix="gpu_check_config_"))
    tiny = Path(model_dir("tiny"))
    config = model_config(tiny, size)
    if vocab:
        config.text_config.vocab_size = vocab
    config.save_pretrained(out)
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
        if (tiny / name).exists():
            (out / name).write_bytes((tiny / name).read_bytes())
    if max_pixels:
        processor = json.loads((out / "processor_config.json").read_text())
        processor["image_processor"]["size"]["longest_edge"] = max_pixels
        (out / "processor_config.json").write_text(json.dumps(processor, indent=2))
    return str(out)


def random_weights(policy, model_dir: str, device) -> None:
    """Stands in for build_policy's checkpoint loading: allocate the shards, draw N(0, 0.02) weights
    (norm weights 1, biases 0). The loader itself is exercised by fsdp_vs_cpu."""
    import torch

    from nanoalign.loading import materialize

    materialize(policy, device)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
            else:
                p.fill_(0.0 if name.endswith("bias") else 1.0)


def make_run(cfg, model: str, device, mesh, *, bf16: bool, random_init: bool = False):
    """A Run as train.py builds one (policy, in-process rollouts, reward), on one rank."""
    from nanoalign import model as model_module
    from nanoalign.model import build_policy, load_processor, stop_and_pad_ids
    from nanoalign.rewards import load_reward_funcs
    from nanoalign.rollout import InProcess
    from nanoalign.runtime import Run

    loader = model_module.load_hf_weights
    if random_init:
        model_module.load_hf_weights = random_weights
    try:
        processor = load_processor(model)
        policy = build_policy(model, cfg, mesh, bf16, trainable=True)
    finally:
        model_module.load_hf_weights = loader
    stop_ids, pad_id = stop_and_pad_ids(processor, policy.hf)
    rollouts = InProcess(cfg, policy, processor, stop_ids=stop_ids, pad_id=pad_id, device=device)
    run = Run(cfg, processor, policy, None, 0, 1, device, stop_ids, pad_id, rollouts=rollouts,
              reward_funcs=load_reward_funcs(["bench.gpu_check:boxed_reward"]))  # fmt: skip
    return run


def samples(fmt: str, n: int, image_size: int) -> list[dict]:
    from nanoalign.data import prepare_sample
    from nanoalign.shapes import shapes_sample

    return [prepare_sample(shapes_sample("train", i, fmt, image_size=image_size), fmt, f"gpu check {i}") for i in range(n)]


def parity_batch(run):
    """One SFT micro-batch of the 4 parity samples (tests/parity_worker.py: different lengths, image sizes)."""
    from nanoalign import sft

    sys.path.insert(0, str(ROOT / "tests"))
    from parity_worker import parity_samples

    micro, _ = sft.prepare(parity_samples(), run)
    return micro[0]


def loss_and_grads(run, micro) -> tuple[float, dict]:
    """One SFT loss and backward; the full fp32 gradients on the CPU, by parameter name."""
    from nanoalign import sft

    loss, _ = sft.loss(micro, run)
    loss.backward()
    grads = {}
    for name, p in run.policy.named_parameters():
        if p.grad is not None:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[name.removeprefix("hf.")] = g.detach().float().cpu()
    return float(loss.detach()), grads


# --------------------------------------------------------------------------- stages


def stage_env(ctx) -> dict:
    import torch
    import torch.distributed as dist
    import transformers

    from common import matmul_peak

    t = torch.ones(4, device=ctx.device) * 3
    dist.all_reduce(t)
    backend = dist.get_backend()
    if ctx.device.type == "cuda":
        ctx.peak = matmul_peak(8192, 10, "bfloat16")["best_flops_per_s"]
        name = torch.cuda.get_device_name()
    else:
        ctx.peak, name = matmul_peak(512, 5, "float32")["best_flops_per_s"], "cpu"
    ok = float(t.sum()) == 12.0 and backend == ("nccl" if ctx.device.type == "cuda" else "gloo")
    return {"pass": ok, "threshold": "one-rank all-reduce gives 12 on the expected backend", "backend": backend, "device": name,
            "matmul_peak_tflops": ctx.peak / 1e12, "torch": torch.__version__, "transformers": transformers.__version__}  # fmt: skip


def stage_fsdp_vs_cpu(ctx) -> dict:
    import torch

    from bench.common import load_hf_model
    from nanoalign.config import Config
    from nanoalign.model import Policy
    from nanoalign.runtime import Run

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32 (the patch conv too)
    cfg = Config(batch_size=4, max_length=512, logps_chunk_size=32)
    run = make_run(cfg, ctx.small, ctx.device, ctx.mesh, bf16=False)
    micro = parity_batch(run)
    loss, grads = loss_and_grads(run, micro)
    reference = Policy(load_hf_model(ctx.small), logps_chunk_size=32)  # unsharded, CPU, fp32
    cpu = torch.device("cpu")
    ref_run = Run(cfg, run.processor, reference, None, 0, 1, cpu, run.stop_ids, run.pad_id)
    ref_micro = dataclasses.replace(micro, batch=micro.batch.to(cpu))
    ref_loss, ref_grads = loss_and_grads(ref_run, ref_micro)
    scale = max(float(g.abs().max()) for g in ref_grads.values())
    grad_diff = max(float((grads[k] - g).abs().max()) for k, g in ref_grads.items()) / scale
    loss_diff = abs(loss - ref_loss) / abs(ref_loss)
    return {"pass": loss_diff <= 1e-5 and grad_diff <= 1e-5 and set(grads) == set(ref_grads),
            "threshold": "loss and gradients equal to 1e-5 (relative to the loss, to the largest gradient)",
            "loss": loss, "loss_cpu": ref_loss, "loss_rel_diff": loss_diff, "grad_max_diff_rel": grad_diff}  # fmt: skip


def stage_bf16_vs_fp32(ctx) -> dict:
    import torch

    from nanoalign.config import Config

    cfg = Config(batch_size=4, max_length=512)
    out = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        run = make_run(cfg, ctx.small, ctx.device, ctx.mesh, bf16=bf16)
        out[name] = loss_and_grads(run, parity_batch(run))
        del run
    (loss32, g32), (loss16, g16) = out["fp32"], out["bf16"]
    a = torch.cat([g32[k].reshape(-1) for k in sorted(g32)])
    b = torch.cat([g16[k].reshape(-1) for k in sorted(g32)])
    cosine = float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))
    rel = abs(loss16 - loss32) / abs(loss32)
    return {"pass": rel <= 1e-2 and cosine >= 0.99, "threshold": "loss within 1e-2 (relative), gradient cosine >= 0.99",
            "loss_fp32": loss32, "loss_bf16": loss16, "loss_rel_diff": rel, "grad_cosine": cosine}  # fmt: skip


def stage_sampler_logps(ctx) -> dict:
    import torch

    from nanoalign.batch import image_token_ids, process_prompts, render
    from nanoalign.config import Config
    from nanoalign.model import gathered_for_generation
    from nanoalign.rl import completion_batch, completion_values
    from nanoalign.rollout import Rollout

    run = make_run(Config(batch_size=4, max_length=512), ctx.small, ctx.device, ctx.mesh, bf16=False)
    prompts = samples("rl", 2, 112)
    texts = [render(run.processor, s["prompt"], add_generation_prompt=True) for s in prompts]
    distinct = process_prompts(run.processor, texts, [s["images"] for s in prompts], padding_side="left")
    rows = process_prompts(run.processor, [t for t in texts for _ in range(3)], [s["images"] for s in prompts for _ in range(3)],
                           padding_side="left")  # fmt: skip
    torch.manual_seed(0)
    with gathered_for_generation(run.policy):
        result = run.policy.sample({k: v.to(ctx.device) for k, v in distinct.items()}, num_samples=3, max_new_tokens=16,
                                   temperature=0.7, stop_ids=run.stop_ids, pad_id=run.pad_id, with_logps=True,
                                   end_ids=image_token_ids(run.processor))  # fmt: skip
    rollout = Rollout(rows, result.ids, result.has_eos, texts=[])
    batch = completion_batch(rollout, run, mask_truncated=False).to(ctx.device)
    with torch.no_grad():
        trainer, _ = run.policy(**batch.model_inputs(), temperature=0.7, logps_mask=batch.mask)
    sampler = completion_values(batch, rollout, result.logps).to(ctx.device)
    counted = batch.mask.bool()
    diff = float((sampler[counted] - trainer[counted]).abs().max()) if counted.any() else float("nan")
    return {"pass": counted.any().item() and diff <= 1e-4, "threshold": "max |sampler - trainer| log-prob <= 1e-4 (fp32)",
            "max_abs_diff": diff, "tokens": int(counted.sum())}  # fmt: skip


def stage_export_reload(ctx) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText

    from nanoalign.config import Config
    from nanoalign.loading import export_hf

    run = make_run(Config(batch_size=4, max_length=512), ctx.small, ctx.device, ctx.mesh, bf16=False)
    micro = parity_batch(run)
    out = Path(tempfile.mkdtemp(prefix="gpu_check_export_"))
    export_hf(run.policy, run.processor, out, 0)
    batch = micro.batch
    with torch.no_grad():
        logps, _ = run.policy(**batch.model_inputs())
        exported = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).to(ctx.device).eval()
        logits = exported(**batch.model_inputs()).logits[:, :-1].float()
    expected = torch.log_softmax(logits, -1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    real = batch.attention_mask[:, 1:].bool()
    diff = float((logps[:, 1:] - expected)[real].abs().max())
    return {"pass": diff <= 1e-4, "threshold": "max |log-prob difference| <= 1e-4 (fp32)", "max_abs_logp_diff": diff}


def step_flops(run, micro) -> tuple[float, float]:
    """(tokens, model FLOPs) of one micro-batch: 6 x (text parameters x text tokens + vision
    parameters x patches + lm_head parameters x tokens whose log-probs are computed), each prompt of
    an RL group (and its image) counted once, as the shared-prompt forward reads it."""
    from nanoalign.model import decoder_layers, vision_module

    hf, batch = run.policy.hf, micro.batch
    text = sum(p.numel() for layer in decoder_layers(hf) for p in layer.parameters())
    vision = sum(p.numel() for p in vision_module(hf).parameters())
    lm_head = hf.get_output_embeddings().weight.numel()
    shared = batch.shared_prompts
    inputs = shared or batch.mm_inputs
    patches = float(inputs["image_grid_thw"].prod(-1).sum()) if "image_grid_thw" in inputs else 0.0
    tokens = float(batch.attention_mask.sum())
    if shared:  # rows = prompt + completion; the prompt is read once per group
        group = batch.input_ids.shape[0] // shared["input_ids"].shape[0]
        tokens -= float(shared["attention_mask"].sum()) * (group - 1)
    return tokens, 6 * (text * tokens + vision * patches + lm_head * float(batch.mask.sum()))


def train_stage(ctx, algo_name: str, checkpointing: bool) -> dict:
    """A few bf16 optimizer steps on the 3B-shaped model, timed part by part (train.py's loop, inlined)."""
    import torch

    import train
    from nanoalign.config import PRESETS
    from nanoalign.plan import plan, read_shape

    algo = train.ALGOS[algo_name]
    gpu = ctx.device.type == "cuda"
    rl = algo_name == "grpo"
    # GRPO: one prompt's group per micro-batch (its image read once without checkpointing).
    batch_size = ctx.args.generations if rl else ctx.args.batch_size
    overrides = {"batch_size": batch_size, "max_length": 4096, "activation_checkpointing": checkpointing, "lr": 1e-5}
    if rl:
        overrides.update(num_generations=ctx.args.generations, max_completion_length=ctx.args.completion_length,
                         reward_funcs=("bench.gpu_check:boxed_reward",), reward_weights=(1.0,))  # fmt: skip
    cfg = dataclasses.replace(PRESETS[algo_name](), model=ctx.big, dtype="bfloat16" if gpu else "auto", **overrides)
    run = make_run(cfg, ctx.big, ctx.device, ctx.mesh, bf16=gpu, random_init=True)
    params = [p for p in run.policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, fused=True)
    num_prompts = cfg.batch_size // cfg.num_generations if rl else cfg.batch_size
    steps, shapes = [], []
    for step in range(ctx.args.warmup + ctx.args.steps):
        batch_samples = samples("rl" if rl else "sft", num_prompts, ctx.image_size)
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        sync(ctx.device)
        t0 = time.perf_counter()
        micro_batches, _ = algo.prepare(batch_samples, run)
        sync(ctx.device)
        t1 = time.perf_counter()
        prepare_s = t1 - t0  # GRPO: the rollouts, their rewards and old log-probs
        forward = backward = tokens = flops = 0.0
        losses = []
        for micro in micro_batches:
            loss, _ = algo.loss(micro, run)
            sync(ctx.device)
            t2 = time.perf_counter()
            loss.backward()
            sync(ctx.device)
            t3 = time.perf_counter()
            forward, backward = forward + t2 - t1, backward + t3 - t2
            t1 = t3
            n, f = step_flops(run, micro)
            tokens, flops = tokens + n, flops + f
            losses.append(float(loss.detach()))
            batch = micro.batch  # its shape, for the plan: width, prompt width, patches per image
            grid = (batch.shared_prompts or batch.mm_inputs).get("image_grid_thw")
            shapes.append((batch.input_ids.shape[1], batch.shared_prompts["input_ids"].shape[1] if batch.shared_prompts else 0,
                           int(grid.prod(-1).float().mean()) if grid is not None else 0))  # fmt: skip
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(ctx.device)
        t4 = time.perf_counter()
        if step >= ctx.args.warmup:
            steps.append({"prepare_s": prepare_s, "forward_s": forward, "backward_s": backward, "optimizer_s": t4 - t1,
                          "tokens": tokens, "flops": flops, "loss": losses[0],
                          "peak_bytes": torch.cuda.max_memory_allocated() if gpu else None})  # fmt: skip
    train_s = median([s["forward_s"] + s["backward_s"] + s["optimizer_s"] for s in steps])
    result = {
        "rollout_or_prepare_s": median([s["prepare_s"] for s in steps]), "forward_s": median([s["forward_s"] for s in steps]),
        "backward_s": median([s["backward_s"] for s in steps]), "optimizer_s": median([s["optimizer_s"] for s in steps]),
        "tokens_per_s": median([s["tokens"] for s in steps]) / train_s, "mfu": median([s["flops"] for s in steps]) / train_s / ctx.peak,
        "loss": steps[-1]["loss"], "params_M": sum(p.numel() for p in run.policy.parameters()) / 1e6,
    }  # fmt: skip
    finite = all(math.isfinite(s["loss"]) for s in steps)
    # nanoalign.plan for the widest micro-batch's shape (on the CPU too, so its inputs are checked there).
    width, prompt, patches = max(shapes)
    shape = read_shape(ctx.big)
    predicted = plan(shape, cfg, gpus=1, device=ctx.device.type, row_length=width, prompt_length=prompt or width,
                     image_pixels=patches * shape.patch_pixels, gpu_memory_gib=0, needs_reference=False)["peak"]  # fmt: skip
    result["plan_gib"] = predicted / 2**30
    if not gpu:
        return {**result, "pass": finite, "threshold": "finite loss (CPU: MFU and memory are GPU figures)"}
    peak = max(s["peak_bytes"] for s in steps)
    floor = 0.15 if rl else 0.25
    result.update(peak_mem_gib=peak / 2**30, mem_per_token_kib=peak / median([s["tokens"] for s in steps]) / 1024,
                  plan_error=predicted / peak - 1)  # fmt: skip
    ok = finite and result["mfu"] >= floor and abs(result["plan_error"]) <= 0.2
    return {**result, "pass": ok, "threshold": f"no OOM, MFU >= {floor}, peak within 20% of nanoalign.plan"}


def stage_fwd_bwd_7b(ctx) -> dict:
    import torch

    from nanoalign import sft
    from nanoalign.config import Config

    gpu = ctx.device.type == "cuda"
    cfg = Config(batch_size=ctx.args.batch_size, max_length=4096, activation_checkpointing=True, dtype="bfloat16" if gpu else "auto")
    run = make_run(cfg, ctx.big7, ctx.device, ctx.mesh, bf16=gpu, random_init=True)
    micro, _ = sft.prepare(samples("sft", cfg.batch_size, ctx.image_size), run)
    sync(ctx.device)
    t0 = time.perf_counter()
    loss, _ = sft.loss(micro[0], run)
    sync(ctx.device)
    t1 = time.perf_counter()
    loss.backward()
    sync(ctx.device)
    t2 = time.perf_counter()
    return {"pass": math.isfinite(float(loss.detach())), "threshold": "no OOM, finite loss", "forward_s": t1 - t0, "backward_s": t2 - t1,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None}  # fmt: skip


def stage_two_process_grads(ctx) -> dict:
    """One SFT step's loss and gradients: 2 processes (torchrun: NCCL on 2 GPUs, gloo on the CPU) vs one."""
    import subprocess

    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from parity_worker import parity_step

    out = Path(tempfile.mkdtemp(prefix="gpu_check_grads_")) / "two.pt"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    env.pop("RANK", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "parity_worker.py"), ctx.small, str(out), "sft:2:1"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT, check=False)
    if proc.returncode != 0:
        raise RuntimeError("torchrun failed:\n" + "\n".join((proc.stdout + proc.stderr).splitlines()[-15:]))
    two = torch.load(out, weights_only=False)["sft:2:1"]
    one = parity_step(ctx.small, "sft", 4, 1)
    scale = max(float(g.abs().max()) for g in one["grads"].values())
    grad_diff = max(float((one["grads"][k].cpu() - two["grads"][k].cpu()).abs().max()) for k in one["grads"]) / scale
    loss_diff = abs(one["loss"] - two["loss"]) / abs(one["loss"])
    return {"pass": loss_diff <= 1e-5 and grad_diff <= 1e-4, "threshold": "loss to 1e-5, gradients to 1e-4 (relative)",
            "loss_1proc": one["loss"], "loss_2proc": two["loss"], "grad_max_diff_rel": grad_diff}  # fmt: skip


# --------------------------------------------------------------------------- the runner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (the test suite's variant)")
    parser.add_argument("--stages", nargs="+", default=STAGES, choices=STAGES)
    parser.add_argument("--budget-s", type=float, default=None, help="stop starting stages after this (default 450 GPU, 300 CPU)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per training stage (default 3, CPU 1)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=None, help="SFT rows per micro-batch (default 4: 3B's AdamW state and a 1-megapixel "
                        "image per row fill most of an H200 without checkpointing; nanoalign.plan says so)")
    parser.add_argument("--generations", type=int, default=None, help="GRPO: completions per prompt (default 8, CPU 2)")
    parser.add_argument("--completion-length", type=int, default=None, help="GRPO: max new tokens (default 128, CPU 8)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_check.json"))
    args = parser.parse_args()
    cpu = args.cpu
    args.steps = args.steps or (1 if cpu else 3)
    args.batch_size = args.batch_size or 4
    args.generations = args.generations or (2 if cpu else 8)
    args.completion_length = args.completion_length or (8 if cpu else 128)
    budget = args.budget_s or (300.0 if cpu else 450.0)
    if cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA
    start = time.perf_counter()
    notes = stub_missing_packages()

    import torch

    sys.path.insert(0, str(ROOT))
    from nanoalign.runtime import device_mesh, end_distributed, init_distributed

    _, world_size, device = init_distributed()
    ctx = types.SimpleNamespace(args=args, device=device, mesh=device_mesh(world_size, device), peak=float("nan"))
    ctx.small = model_dir("tiny") if cpu else model_dir("small", SIZES["small"])
    ctx.big = config_only_dir(TINY_3B_SHAPED if cpu else QWEN25_VL_3B, 2000 if cpu else 151936, None if cpu else 1003520)
    ctx.big7 = config_only_dir(TINY_7B_SHAPED if cpu else QWEN25_VL_7B, 2000 if cpu else 152064, None if cpu else 1003520)
    ctx.image_size = 112 if cpu else 1000  # ~1 megapixel: 1,296 image tokens per row after the 2 x 2 merge
    functions = {"env": stage_env, "fsdp_vs_cpu": stage_fsdp_vs_cpu, "bf16_vs_fp32": stage_bf16_vs_fp32,
                 "sampler_logps": stage_sampler_logps, "export_reload": stage_export_reload,
                 "sft": lambda c: train_stage(c, "sft", False), "sft_ckpt": lambda c: train_stage(c, "sft", True),
                 "grpo": lambda c: train_stage(c, "grpo", False), "grpo_ckpt": lambda c: train_stage(c, "grpo", True),
                 "fwd_bwd_7b": stage_fwd_bwd_7b, "two_process_grads": stage_two_process_grads}  # fmt: skip
    results = {}
    for name in args.stages:
        elapsed = time.perf_counter() - start
        if not cpu and elapsed + GPU_COST[name] > budget:
            results[name] = {"status": "skipped: budget", "pass": None}
        elif name == "two_process_grads" and not cpu and torch.cuda.device_count() < 2:
            results[name] = {"status": f"skipped: {torch.cuda.device_count()} GPU, the check needs 2", "pass": None}
        else:
            t0 = time.perf_counter()
            try:
                results[name] = {"status": "ok", **functions[name](ctx)}
            except torch.OutOfMemoryError as err:  # this configuration does not fit: recorded, the run goes on
                results[name] = {"status": "oom", "pass": False, "error": str(err)[:300]}
            except Exception as err:  # one broken stage must not hide the others' figures
                traceback.print_exc()
                results[name] = {"status": f"failed: {type(err).__name__}: {str(err)[:300]}", "pass": False}
            results[name]["wall_s"] = time.perf_counter() - t0
        gc.collect()  # the stage's model and optimizer state (reference cycles in HF modules)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        verdict = {True: "PASS", False: "FAIL", None: "SKIP"}[results[name]["pass"]]
        shown = {k: v for k, v in results[name].items() if k not in ("pass", "threshold")}
        print(f"{verdict} {name}: {json.dumps(shown)} | threshold: {results[name].get('threshold', '-')}", flush=True)
        write_json(args.out, {"machine": machine_info(), "notes": notes, "cpu_variant": cpu, "budget_s": budget, "results": results})
    end_distributed()
    if any(r["pass"] is False for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
