"""nanoalign.plan's prediction against the measured peak of real runs on CPUs (2 ranks).

    python bench/plan_check.py                       # every configuration below, ~15 minutes on 2 cores
    python bench/plan_check.py --configs small-sft   # one of them
    python bench/plan_check.py --configs real-sft real-sft-ckpt real-grpo --out bench/results/plan_check-real.json

Each configuration is a short train.train run (2 optimizer steps, no evaluation, no checkpoint) under
its own `torchrun --nproc_per_node 2`. A rank's measured peak is its resident memory's high-water
mark (VmHWM) over the run less its resident memory just before the model is built: the tensors the
planner counts, plus what Python allocates on the way. glibc is told to serve every allocation over
64 KiB with its own mmap (MALLOC_MMAP_THRESHOLD_), so a freed tensor leaves RSS at once, as it
leaves torch.cuda.memory_allocated on a GPU. The planner is then given the shape the run saw (the
widest row, the prompt width, image patches per row) and --device cpu (fp32, chunks of 128).
Results: a table and bench/results/plan_check.json.
"""

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SIZES, machine_info, model_dir, print_table, write_json  # noqa: E402

# ~150M parameters: the small model twice as wide in its text tower.
MEDIUM = dataclasses.replace(SIZES["small"], hidden=1024, layers=12, heads=16, kv_heads=2, intermediate=4096)
RL = {"num_generations": 4, "max_completion_length": 24, "reward_funcs": ("format",), "reward_weights": (1.0,), "lr": 1e-5}
CONFIGS = {  # name: (model size, algo, Config overrides)
    "small-sft": ("small", "sft", {"batch_size": 8}),
    "small-sft-ckpt": ("small", "sft", {"batch_size": 8, "activation_checkpointing": True}),
    "medium-sft": ("medium", "sft", {"batch_size": 8}),
    "medium-sft-ckpt": ("medium", "sft", {"batch_size": 8, "activation_checkpointing": True}),
    "small-sft-b32": ("small", "sft", {"batch_size": 32}),  # activations the largest part
    "small-sft-b32-ckpt": ("small", "sft", {"batch_size": 32, "activation_checkpointing": True}),
    "small-dpo": ("small", "dpo", {"batch_size": 4}),
    "small-grpo": ("small", "grpo", {**RL, "batch_size": 8, "beta": 0.04}),
    "small-grpo-noref": ("small", "grpo", {**RL, "batch_size": 8}),
    "medium-grpo-ckpt": ("medium", "grpo", {**RL, "batch_size": 8, "activation_checkpointing": True}),
    # The realistic-shape model (bench/real_shapes.py: Qwen2.5-VL-3B's widths and 151,936-row vocabulary,
    # 2 text + 2 vision layers, 543M parameters): small batches, as 2 ranks of it share 24 GiB here.
    "real-sft": ("real", "sft", {"batch_size": 4}),
    "real-sft-ckpt": ("real", "sft", {"batch_size": 4, "activation_checkpointing": True}),
    "real-grpo": ("real", "grpo", {**RL, "num_generations": 2, "max_completion_length": 8, "batch_size": 4}),
}
SIZES_HERE = {"small": SIZES["small"], "medium": MEDIUM}


def config_model(size: str) -> str:
    """The directory of a configuration's model: a bench/common.py size, or "real" (the 3B-shaped one)."""
    if size == "real":
        from real_shapes import build_real_model

        return str(build_real_model("3b"))
    return model_dir("small", SIZES_HERE[size])


def vm_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(spec: dict) -> None:
    """One rank of one configuration, under torchrun: train.train for 2 steps, measuring RSS."""
    import torch

    sys.path.insert(0, str(ROOT))
    import math_verify  # noqa: F401  (the rewards' imports: loaded before the baseline, not counted)

    import train
    from nanoalign import model
    from nanoalign.config import PRESETS

    torch.set_num_threads(1)
    seen = {"width": 0, "prompt": 0, "patches": 0, "rows": 0}
    baseline = {}
    build_policy = model.build_policy

    def measured_build(*args, **kwargs):  # the baseline: all set up but the model
        if not baseline:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
            baseline["kib"] = vm_kib("VmRSS")
        return build_policy(*args, **kwargs)

    algo = train.ALGOS[spec["algo"]]

    class Watched:  # the algorithm module, noting the shapes its micro-batches have and the peak by phase
        def __getattr__(self, name):
            return getattr(algo, name)

        def prepare(self, samples, run):
            before = vm_kib("VmHWM")
            prepared = algo.prepare(samples, run)
            if vm_kib("VmHWM") > before:  # the peak so far was reached while preparing (RL: the rollouts)
                seen["prepare_peak_bytes"] = (vm_kib("VmHWM") - baseline["kib"]) * 1024
            return prepared

        def loss(self, micro, run):
            batch = getattr(micro, "batch", None) or micro
            ids = batch.input_ids if hasattr(batch, "input_ids") else None
            if ids is not None:
                seen["width"] = max(seen["width"], ids.shape[1])
                seen["rows"] = max(seen["rows"], ids.shape[0])
                grid = batch.mm_inputs.get("image_grid_thw")
                if grid is not None:
                    seen["patches"] = max(seen["patches"], int(grid.prod(-1).sum()) // len(grid))
                if batch.shared_prompts:
                    seen["prompt"] = max(seen["prompt"], batch.shared_prompts["input_ids"].shape[1])
                elif spec["algo"] in ("grpo", "gspo", "rloo"):
                    seen["prompt"] = max(seen["prompt"], int((batch.mask.cumsum(1) == 0).sum(1).max()))
            return algo.loss(micro, run)

    replaced = [(model, "build_policy", measured_build), (train, "build_policy", measured_build),
                (train, "ALGOS", {**train.ALGOS, spec["algo"]: Watched()}), (train, "save_checkpoint", lambda *a, **k: None)]  # fmt: skip
    for module, name, value in replaced:
        setattr(module, name, value)
    cfg = dataclasses.replace(
        PRESETS[spec["algo"]](), model=spec["model"], out_dir=spec["out_dir"], max_steps=2, eval_split="", export=False,
        resume=False, save_every=0, num_shapes_samples=256, warmup_steps=1, **spec["overrides"],
    )  # fmt: skip
    train.train(cfg)
    result = {"rank": int(os.environ["RANK"]), "peak_bytes": (vm_kib("VmHWM") - baseline["kib"]) * 1024, **seen}
    print("PLAN_RESULT " + json.dumps(result), flush=True)


def measure(name: str) -> dict:
    size, algo, overrides = CONFIGS[name]
    path = config_model(size)
    spec = {"model": path, "algo": algo, "overrides": overrides, "out_dir": tempfile.mkdtemp(prefix="plan_check_")}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, "--child", json.dumps(spec)]
    start, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800, check=False)
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    cost = {"wall_s": time.perf_counter() - start, "cpu_s": used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime}
    lines = [json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines() if line.startswith("PLAN_RESULT ")]
    if proc.returncode != 0 or len(lines) != 2:
        raise RuntimeError(f"{name}: torchrun failed:\n" + "\n".join((proc.stdout + proc.stderr).splitlines()[-20:]))
    return {"model": path, "algo": algo, "overrides": overrides, "ranks": lines, **cost}


def predict(run: dict) -> dict:
    """nanoalign.plan's components for the configuration and the shape the run saw."""
    from nanoalign.config import PRESETS
    from nanoalign.plan import needs_reference, plan, read_shape

    seen = max(run["ranks"], key=lambda r: r["width"])
    cfg = dataclasses.replace(PRESETS[run["algo"]](), model=run["model"], **run["overrides"])
    shape = read_shape(run["model"])
    return plan(shape, cfg, gpus=2, device="cpu", row_length=seen["width"], prompt_length=seen["prompt"] or seen["width"],
                image_pixels=seen["patches"] * shape.patch_pixels, gpu_memory_gib=0, needs_reference=needs_reference(cfg))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "plan_check.json"))
    parser.add_argument("--from-json", default=None, help="judge the planner again against the measurements of an earlier --out")
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    stored = {r["config"]: r for r in json.loads(Path(args.from_json).read_text())["rows"]} if args.from_json else {}
    rows = []
    for name in stored or args.configs:
        run = stored[name] if stored else measure(name)
        size, _, overrides = CONFIGS[name.split(" ")[0]]  # "small-grpo (2nd run)": a repeat of small-grpo
        run["model"], run["overrides"] = run.get("model") or config_model(size), run.get("overrides", overrides)
        predicted = predict(run)
        measured = max(r["peak_bytes"] for r in run["ranks"])
        row = {"config": name, "algo": run["algo"], "model": run["model"], "overrides": run["overrides"],
               "width": max(r["width"] for r in run["ranks"]),
               "measured_mib": measured / 2**20, "predicted_mib": predicted["peak"] / 2**20,
               "error": predicted["peak"] / measured - 1, "ranks": run["ranks"], "wall_s": run.get("wall_s"), "cpu_s": run.get("cpu_s"),
               "components_mib": {k: v / 2**20 for k, v in predicted.items()}}  # fmt: skip
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "components_mib"}), flush=True)
        write_json(args.out, {"machine": machine_info(), "rows": rows})  # what is measured survives a later failure
    table = print_table(rows, [("config", "config", ""), ("row tokens", "width", "d"), ("measured MiB", "measured_mib", ".0f"),
                               ("predicted MiB", "predicted_mib", ".0f"), ("error", "error", "+.1%")],
                        "nanoalign.plan vs measured peak per rank (CPU, 2 ranks)")  # fmt: skip
    write_json(args.out, {"machine": machine_info(), "rows": rows, "table": table})


if __name__ == "__main__":
    main()
