"""Peak host memory (RSS) of each rank while loading a model and while exporting it: before and after.

    python bench/load_memory.py                          # small (74M) and 500m, 1 and 2 ranks, both paths
    python bench/load_memory.py --models small --ranks 2

"before" is the path nanoalign had: every rank runs from_pretrained (a full fp32 copy), then
fully_shard; at export every rank all-gathers every tensor into a full CPU state dict and rank 0
calls save_pretrained. "after" is nanoalign/loading.py: meta-device build, rank 0 reads one tensor
at a time and scatters the rows; export gathers each tensor to rank 0 only and streams it to disk.

Each configuration runs under its own torchrun (fresh processes). A rank measures its RSS after
imports and process-group setup (its baseline), then the kernel's high-water mark (VmHWM, reset
through /proc/self/clear_refs between phases) during load and during export. Targets, with
M = the model's fp32 bytes and W ranks:
    rank > 0:  peak - baseline <= 1.25 * M / W     (its shard, plus 25%)
    rank 0:    peak - baseline <= 1.25 * M         (one model copy, plus 25%)
Results: a table on stdout and bench/results/load_memory.json.
"""

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULT_PREFIX, ROOT, SIZES, ModelSize, load_hf_model, machine_info, mib, model_dir, num_params, print_table, write_json  # noqa: E402

# ~0.5B parameters: the 3B model's width class, fewer layers (fits 2 ranks x the old path's copies in RAM)
SIZES_HERE = {**SIZES, "500m": dataclasses.replace(ModelSize(), hidden=1536, layers=14, heads=12, kv_heads=2, intermediate=6144,
                                                     vision_hidden=512, vision_depth=4, vision_heads=8, vision_intermediate=2048)}  # fmt: skip


def vm_hwm_bytes() -> int:
    """The kernel's peak RSS of this process since the last reset (VmHWM)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def vm_rss_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def export_before(policy, processor, out_dir, rank: int) -> None:
    """The export nanoalign had: a full CPU state dict on every rank, then save_pretrained on rank 0."""
    import re

    state = {}
    for name, tensor in policy.state_dict().items():
        tensor = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        state[re.sub(r"^hf\.", "", name)] = tensor.detach().cpu()
    if rank == 0:
        policy.hf.save_pretrained(out_dir, state_dict=state)
        processor.save_pretrained(out_dir)


def child(spec: dict) -> None:
    """One rank of one configuration (under torchrun): load, then export, measuring each phase."""
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(ROOT))
    from nanoalign.model import build_policy
    from nanoalign.config import Config
    from nanoalign.loading import export_hf
    from nanoalign.model import Policy, load_processor, shard_policy
    from nanoalign.runtime import device_mesh, end_distributed, init_distributed

    torch.set_num_threads(1)
    rank, world_size, device = init_distributed()
    processor = load_processor(spec["model"])
    mesh = device_mesh(world_size, device)
    dist.barrier()
    baseline = vm_rss_bytes()
    reset_peak()
    t0 = time.perf_counter()
    if spec["path"] == "before":
        policy = shard_policy(Policy(load_hf_model(spec["model"])), mesh, bf16=False)
    else:
        policy = build_policy(spec["model"], Config(), mesh, bf16=False, trainable=True)
    dist.barrier()
    load_s, load_peak, after_load = time.perf_counter() - t0, vm_hwm_bytes(), vm_rss_bytes()
    reset_peak()
    t0 = time.perf_counter()
    (export_before if spec["path"] == "before" else export_hf)(policy, processor, spec["out"], rank)
    dist.barrier()
    export_s, export_peak = time.perf_counter() - t0, vm_hwm_bytes()
    result = {"rank": rank, "baseline": baseline, "load_peak": load_peak, "after_load": after_load, "export_peak": export_peak,
              "load_s": load_s, "export_s": export_s}  # fmt: skip
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    end_distributed()


def run(model: str, model_path: str, world_size: int, path: str, timeout: float) -> list[dict]:
    """One configuration under torchrun; the per-rank result lines, or one {"error"} row."""
    out = tempfile.mkdtemp(prefix="load_memory_export_")
    spec = {"model": model_path, "path": path, "out": out}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world_size),
           __file__, "--child", json.dumps(spec)]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return [{"model": model, "ranks": world_size, "path": path, "error": f"timed out after {timeout:.0f} s"}]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    rows = [json.loads(line[len(RESULT_PREFIX) :]) for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if len(rows) != world_size:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        return [{"model": model, "ranks": world_size, "path": path, "error": tail}]
    return [{"model": model, "ranks": world_size, "path": path, **row} for row in sorted(rows, key=lambda r: r["rank"])]


def judge(row: dict, model_bytes: int) -> dict:
    """The row with its peaks above baseline and whether they meet the target of its rank."""
    if "error" in row:
        return row
    allowed = 1.25 * (model_bytes if row["rank"] == 0 else model_bytes / row["ranks"])
    load, export = row["load_peak"] - row["baseline"], row["export_peak"] - row["baseline"]
    return {**row, "load_mib": mib(load), "export_mib": mib(export), "allowed_mib": mib(allowed),
            "load_met": load <= allowed, "export_met": export <= allowed}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["small", "500m"], choices=sorted(SIZES_HERE))
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--paths", nargs="+", default=["before", "after"], choices=["before", "after"])
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "load_memory.json"))
    args = parser.parse_args()
    rows, models = [], {}
    for model in args.models:
        path = model_dir(model, SIZES_HERE[model])
        count = num_params(path)["total"]
        models[model] = {"path": path, "params": count, "fp32_mib": mib(4 * count)}
        print(f"{model}: {count / 1e6:.0f}M parameters, {4 * count / 2**20:.0f} MiB in fp32", flush=True)
        for world_size in args.ranks:
            for which in args.paths:
                for row in run(model, path, world_size, which, args.timeout):
                    rows.append(judge(row, 4 * count))
                    print(json.dumps({k: v for k, v in rows[-1].items() if k != "error"}) if "error" not in rows[-1] else rows[-1]["error"], flush=True)
    columns = [("model", "model", ""), ("ranks", "ranks", ""), ("path", "path", ""), ("rank", "rank", ""),
               ("baseline MiB", "baseline", ".0f"), ("load peak - base MiB", "load_mib", ".0f"),
               ("export peak - base MiB", "export_mib", ".0f"), ("target MiB", "allowed_mib", ".0f"),
               ("load met", "load_met", ""), ("export met", "export_met", ""), ("load s", "load_s", ".1f"),
               ("export s", "export_s", ".1f")]  # fmt: skip
    table_rows = [{**r, "baseline": mib(r.get("baseline"))} for r in rows]
    table = print_table(table_rows, columns, "Peak host RSS per rank above its baseline, load and export")
    write_json(args.out, {"machine": machine_info(), "models": models, "rows": rows, "table": table})


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--child":
        child(json.loads(sys.argv[2]))
    else:
        main()
