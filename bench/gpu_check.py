"""The prepared GPU check: what nanoalign has only ever run on CPUs, run once on a GPU machine.

    bash bench/gpu_check.sh                 # a GPU machine: the 3B-class model, well under 8 minutes on one H200
    bash bench/gpu_check.sh --cpu           # the same stages at tiny sizes on CPU (CI runs this)

Stages (each reports "ok", "skipped: why" or "failed: error"; one failing does not stop the others):
  1. sft_3b, gspo_3b: bf16 FSDP2 training steps, run by train.train (train.py's own setup and loop),
     on a random-init Qwen2.5-VL with the 3B model's configuration (text 2048 x 36 layers, vision
     1280 x 32 blocks; the tokenizer, and so the vocabulary, is nanoalign's tiny one, so lm_head is
     small). GSPO samples in-process (nanoalign's sampler under gathered_for_generation). Reported:
     median step time (train.py's step_time without the prepare/rollout part, which is reported
     apart), tokens/s, MFU and peak memory; the step times come from the run's metrics.jsonl.
     MFU = 6 * (text parameters * text tokens + vision parameters * patches) / step time / peak, the
     peak being the GPU's dense bf16 figure from its data sheet (attention's T^2 term left out: under
     2% at these lengths).
  2. bf16_vs_fp32: the same first SFT step of the 74M "small" model in bf16 mixed precision and in
     fp32, loaded through the meta-device loader (rank 0 reads, scatters: NCCL on a GPU); then the
     fp32 model exported by rank 0 and reloaded with from_pretrained gives the same log-probs.
  3. two_process_grads: with 2 GPUs (or --cpu), one step's loss and gradients from 2 processes
     (torchrun, NCCL) equal one process's on the same global batch.

It needs torch, transformers, tokenizers, pillow and safetensors; datasets and vLLM are not used.
tyro (train.py's command line) and math-verify + sympy (the accuracy reward) are replaced by inert
stand-ins when missing, with a note: the check builds train.py's Config itself (the preset with
dataclasses.replace) and calls train.train, and GSPO scores a "\\boxed{}" format reward.
Results: a table on stdout and bench/results/gpu_check.json (or --out).
"""

import argparse
import dataclasses
import gc
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SIZES, ModelSize, machine_info, median, model_config, model_dir, print_table, write_json  # noqa: E402

# Qwen2.5-VL-3B-Instruct's sizes (its config.json), with nanoalign's tiny vocabulary.
QWEN25_VL_3B = ModelSize(hidden=2048, layers=36, heads=16, kv_heads=2, intermediate=11008, vision_hidden=1280,
                         vision_depth=32, vision_heads=16, vision_intermediate=3420, max_positions=4096)  # fmt: skip
TINY_3B_SHAPED = ModelSize(hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128, vision_hidden=32, vision_depth=2,
                           vision_heads=1, vision_intermediate=64, max_positions=1024)  # fmt: skip
# Dense bf16 peaks from the data sheets (FLOP/s); other GPUs: the measured matmul peak is used.
BF16_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def stub_missing_packages() -> list[str]:
    """Stand-ins for math-verify and sympy where they are not installed (see the module docstring)."""
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
        why = "train.py's command line is unavailable; train.train is called with a Config" if name == "tyro" else "the accuracy reward is unavailable"
        notes.append(f"{name} is not installed: a stand-in is used ({why})")
    return notes


def boxed_reward(completions: list[str], **columns) -> list[float]:
    """1 for a completion with a \\boxed{...} answer, else 0 (needs no math-verify)."""
    return [1.0 if "\\boxed{" in c else 0.0 for c in completions]


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_gib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def bf16_peak(device) -> tuple[float, str]:
    """(FLOP/s, where it came from): the data-sheet figure for known GPUs, else a measured matmul."""
    import torch

    from common import matmul_peak

    if device.type == "cuda":
        name = torch.cuda.get_device_name()
        for key, peak in BF16_PEAKS.items():
            if key in name:
                return peak, f"data sheet ({key})"
        return matmul_peak(8192, 10, "bfloat16")["best_flops_per_s"], "measured bf16 matmul"
    return matmul_peak(512, 5, "float32")["best_flops_per_s"], "measured fp32 matmul (CPU)"


def random_weights(policy, model_dir: str, device) -> None:
    """Stands in for the checkpoint loading of build_policy (nanoalign/model.py): allocate the shards and draw
    N(0, 0.02) weights (norm weights 1, biases 0). Writing and reading 14 GB of random fp32 weights
    would take longer than the steps; the loader itself is exercised by bf16_vs_fp32."""
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


def config_only_dir(size: ModelSize) -> str:
    """A model directory for `size` with a config and the tiny model's tokenizer and processor, no weights."""
    out = Path(tempfile.mkdtemp(prefix="gpu_check_config_"))
    tiny = Path(model_dir("tiny"))
    model_config(tiny, size).save_pretrained(out)
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
        if (tiny / name).exists():
            (out / name).write_bytes((tiny / name).read_bytes())
    return str(out)


def counts(policy) -> dict:
    """Parameters of the text decoder (without embeddings) and of the vision tower."""
    from nanoalign.model import vision_module

    vision = sum(p.numel() for p in vision_module(policy.hf).parameters())
    embed = policy.hf.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in policy.parameters())
    return {"total": total, "vision": vision, "text": total - vision - embed}


def model_flops(n: dict, batch) -> float:
    """6 N D per step: text parameters x text tokens + vision parameters x vision patches."""
    tokens = float(batch.attention_mask.sum())
    inputs = batch.model_inputs()
    patches = float(inputs["pixel_values"].shape[0]) if "pixel_values" in inputs else 0.0
    return 6 * (n["text"] * tokens + n["vision"] * patches)


class Measured:
    """An algorithm module as train.py calls it, with prepare() timed (GSPO: the rollouts) and the
    tokens and FLOPs of each step's micro-batches counted, keyed by the step (run.step) they serve."""

    def __init__(self, algo, device):
        self.algo, self.device = algo, device
        self.prepare_s, self.tokens, self.flops, self.params = {}, {}, {}, None

    def __getattr__(self, name):  # DATA_FORMAT, needs_reference, samples_per_round, evaluate
        return getattr(self.algo, name)

    def prepare(self, samples, run):
        sync(self.device)
        t0 = time.perf_counter()
        prepared = self.algo.prepare(samples, run)
        sync(self.device)
        self.prepare_s[run.step] = time.perf_counter() - t0
        return prepared

    def loss(self, micro, run):
        if self.params is None:
            self.params = counts(run.policy)
        self.tokens[run.step] = self.tokens.get(run.step, 0.0) + float(micro.batch.attention_mask.sum())
        self.flops[run.step] = self.flops.get(run.step, 0.0) + model_flops(self.params, micro.batch)
        return self.algo.loss(micro, run)


def train_steps(algo_name: str, size: ModelSize, args, device) -> dict:
    """A few bf16 optimizer steps of SFT or GSPO on the random-init model, run by train.train itself
    (its setup, loop and metrics.jsonl); timings of the steps after the warm-up ones."""
    import train
    from nanoalign import model
    from nanoalign.config import PRESETS
    from nanoalign.metrics import read_metrics

    from common import suppress_image_token_in_rollouts

    path, out_dir = config_only_dir(size), tempfile.mkdtemp(prefix="gpu_check_run_")
    overrides = dict(
        model=path, out_dir=out_dir, dtype="bfloat16", batch_size=args.batch_size, max_length=1024,
        max_completion_length=args.completion_length, lr=1e-5, max_steps=args.warmup + args.steps, eval_split="",
        log_every=1, save_every=0, export=False, resume=False,
    )  # fmt: skip
    if algo_name == "gspo":  # one generation per step; the accuracy reward needs math-verify, a format reward nothing
        overrides.update(num_generations=args.generations, steps_per_generation=1,
                         reward_funcs=("bench.gpu_check:boxed_reward",), reward_weights=(1.0,))  # fmt: skip
        suppress_image_token_in_rollouts(path)  # a random model samples <|image_pad|> like any token
    # The preset with these flags: what train.parse_config builds from a command line, without tyro
    # (not installed on the bare GPU image).
    cfg = dataclasses.replace(PRESETS[algo_name](), **overrides)
    measured = Measured(train.ALGOS[algo_name], device)
    # Names train.train looks up: the measured algorithm, random weights instead of a checkpoint
    # (build_policy's loader, in nanoalign/model.py), and no checkpoint of 3B parameters and their
    # optimizer state at the last step.
    replaced = [(train, "ALGOS", {**train.ALGOS, algo_name: measured}), (model, "load_hf_weights", random_weights),
                (train, "save_checkpoint", lambda *args, **kwargs: None)]  # fmt: skip
    saved = [(module, name, getattr(module, name)) for module, name, _ in replaced]
    for module, name, value in replaced:
        setattr(module, name, value)
    try:
        train.train(cfg)
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
    records = read_metrics(Path(out_dir) / "metrics.jsonl")
    steps = []
    for record in records[args.warmup :]:
        index = record["step"] - 1  # run.step while the step was prepared and computed
        step_s = record["step_time"] - measured.prepare_s.get(index, 0.0)  # training alone, as MFU counts it
        steps.append({"step_s": step_s, "prepare_s": measured.prepare_s.get(index, 0.0), "tokens": measured.tokens[index],
                      "flops": measured.flops[index]})  # fmt: skip
    peak, peak_source = bf16_peak(device)
    step_s = median([s["step_s"] for s in steps])
    return {
        "params_M": measured.params["total"] / 1e6, "step_s": step_s, "prepare_s": median([s["prepare_s"] for s in steps]),
        "tokens_per_s": median([s["tokens"] for s in steps]) / step_s, "mfu": median([s["flops"] for s in steps]) / step_s / peak,
        "peak_source": peak_source, "peak_mem_gib": peak_memory_gib(device), "first_loss": records[0]["loss"],
    }  # fmt: skip


def bf16_vs_fp32(model: str, device, mesh, rank: int, world_size: int) -> dict:
    """First-step SFT loss of the same model and batch in bf16 mixed precision and in fp32; then the
    fp32 policy exported (rank 0 writes) and reloaded gives the same log-probs."""
    import torch

    from nanoalign import sft
    from nanoalign.config import Config
    from nanoalign.loading import export_hf
    from nanoalign.model import build_policy, load_processor
    from nanoalign.runtime import Run

    sys.path.insert(0, str(ROOT / "tests"))
    from parity_worker import parity_samples

    processor = load_processor(model)
    cfg = Config(batch_size=4, max_length=512)
    result = {}
    for name, bf16 in (("bf16", True), ("fp32", False)):
        policy = build_policy(model, cfg, mesh, bf16, trainable=True)
        run = Run(cfg, processor, policy, None, rank, world_size, device, {processor.tokenizer.eos_token_id}, processor.tokenizer.pad_token_id)
        micro_batches, _ = sft.prepare(parity_samples(), run)
        loss, _ = sft.loss(micro_batches[0], run)
        loss.backward()
        result[f"loss_{name}"] = float(loss.detach())
    result["rel_diff"] = abs(result["loss_bf16"] - result["loss_fp32"]) / abs(result["loss_fp32"])
    out = Path(tempfile.mkdtemp(prefix="gpu_check_export_"))
    export_hf(policy, processor, out, rank)
    batch = micro_batches[0].batch
    with torch.no_grad():
        logps, _ = policy(**batch.model_inputs())
        if rank == 0:
            from transformers import AutoModelForImageTextToText

            exported = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).to(device).eval()
            logits = exported(**batch.model_inputs()).logits[:, :-1].float()
            expected = torch.log_softmax(logits, -1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
            result["export_max_abs_logp_diff"] = float((logps[:, 1:] - expected).abs().max())
    return result


def two_process_grads(model: str, device) -> dict:
    """One SFT step's loss and gradients: 2 processes (torchrun) vs one process, same global batch."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from parity_worker import parity_step

    out = Path(tempfile.mkdtemp(prefix="gpu_check_grads_")) / "two.pt"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    env.pop("RANK", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "parity_worker.py"), model, str(out), "sft:2:1"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError("torchrun failed:\n" + "\n".join((proc.stdout + proc.stderr).splitlines()[-15:]))
    two = torch.load(out, weights_only=False)["sft:2:1"]
    one = parity_step(model, "sft", 4, 1)
    diffs = [float((one["grads"][k].cpu() - two["grads"][k].cpu()).abs().max()) for k in one["grads"]]
    scale = max(float(g.abs().max()) for g in one["grads"].values())
    return {"loss_1proc": one["loss"], "loss_2proc": two["loss"], "max_abs_grad_diff": max(diffs), "max_abs_grad": scale,
            "equal": abs(one["loss"] - two["loss"]) <= 1e-5 * abs(one["loss"]) and max(diffs) <= 1e-4 * scale}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny sizes on CPU (the CI variant)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per algorithm (default 4, CPU 1)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=None, help="rows per step (default 16, CPU 4)")
    parser.add_argument("--generations", type=int, default=8, help="GSPO: completions per prompt")
    parser.add_argument("--completion-length", type=int, default=None, help="GSPO: max new tokens (default 64, CPU 8)")
    parser.add_argument("--stages", nargs="+", default=["sft_3b", "gspo_3b", "bf16_vs_fp32", "two_process_grads"])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_check.json"))
    args = parser.parse_args()
    args.steps = args.steps or (1 if args.cpu else 4)
    args.batch_size = args.batch_size or (4 if args.cpu else 16)
    args.completion_length = args.completion_length or (8 if args.cpu else 64)
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA
        args.generations = min(args.generations, 2)
    notes = stub_missing_packages()
    for note in notes:
        print("note:", note, flush=True)

    import torch

    sys.path.insert(0, str(ROOT))
    from nanoalign.runtime import device_mesh, init_distributed

    rank, world_size, device = init_distributed()
    mesh = device_mesh(world_size, device)
    big = TINY_3B_SHAPED if args.cpu else QWEN25_VL_3B
    small = model_dir("tiny") if args.cpu else model_dir("small", SIZES["small"])
    num_gpus = torch.cuda.device_count()
    stages = {
        "sft_3b": lambda: train_steps("sft", big, args, device),
        "gspo_3b": lambda: train_steps("gspo", big, args, device),
        "bf16_vs_fp32": lambda: bf16_vs_fp32(small, device, mesh, rank, world_size),
        "two_process_grads": lambda: two_process_grads(small, device),
    }
    results = {}
    for name in args.stages:
        if name == "two_process_grads" and not args.cpu and num_gpus < 2:
            results[name] = {"status": f"skipped: {num_gpus} GPU(s), the check needs 2"}
        else:
            t0 = time.perf_counter()
            try:
                results[name] = {"status": "ok", **stages[name]()}
            except Exception as err:  # one broken stage must not hide the others' figures
                traceback.print_exc()
                results[name] = {"status": f"failed: {type(err).__name__}: {str(err)[:300]}"}
            results[name]["wall_s"] = time.perf_counter() - t0
            gc.collect()  # the stage's model and optimizer state (reference cycles in HF modules)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
        print(name, json.dumps(results[name]), flush=True)
    rows = [{"stage": name, **values} for name, values in results.items()]
    table = print_table(rows, [("stage", "stage", ""), ("status", "status", ""), ("params M", "params_M", ".0f"),
                               ("step s", "step_s", ".3f"), ("rollout s", "prepare_s", ".2f"), ("tokens/s", "tokens_per_s", ".0f"),
                               ("MFU", "mfu", ".3f"), ("peak GiB", "peak_mem_gib", ".1f"), ("wall s", "wall_s", ".0f")],
                        "GPU check" + (" (CPU variant)" if args.cpu else ""))  # fmt: skip
    write_json(args.out, {"machine": machine_info(), "notes": notes, "cpu_variant": args.cpu, "results": results, "table": table})
    if any(r["status"].startswith("failed") for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
