"""LoRA vs full fine-tuning: peak memory per rank, checkpoint size, vLLM sync bytes, step time.

    python bench/lora.py                          # the small model (~70M, bench/common.py), sft and dpo, 2 ranks
    python bench/lora.py --model tiny --algos sft --steps 4
    python bench/lora.py --model real --algos sft dpo --steps 3 --warmup 1 --batch-size 2   # Qwen2.5-VL-3B's widths

Each configuration is one `train.py` run (train.train) under torchrun with 2 ranks, in its own
processes: --lora-rank 0 (full) and --lora-rank R (LoRA on every linear layer of the language model),
the same data, batch and steps. Reported per run:
  * peak RSS per rank (ru_maxrss of each rank's process: weights, gradients, AdamW state, the
    reference model for dpo in full fine-tuning, activations, and the Python/torch baseline);
  * checkpoint size on disk (the last step's sharded checkpoint: model + optimizer, both ranks);
  * bytes one vLLM sync sends (what vllm/sync_mb reports: every parameter, or with LoRA the
    adapted layers' merged weights; tests/test_lora.py checks a real sync sends exactly that);
  * median step time over the steps after --warmup.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import add_model_flags, machine_info, model_from_args, print_table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def child(spec: dict) -> None:
    """One rank of one configuration: train, then rank 0 writes every rank's figures to spec["out"]."""
    import torch
    import torch.distributed as dist

    import train
    from nanoalign.runtime import end_distributed

    argv = ["--algo", spec["algo"], "--model", spec["model"], "--out-dir", spec["out_dir"], "--max-steps", str(spec["steps"]),
            "--batch-size", str(spec["batch_size"]), "--warmup-steps", "1", "--eval-split", "", "--save-every", "0",
            "--no-export", "--no-resume", "--lora-rank", str(spec["rank"]), "--logps-chunk-size", "64"]  # fmt: skip
    train.train(train.parse_config(argv))
    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024], dtype=torch.float64)
    peaks = [torch.zeros_like(peak) for _ in range(dist.get_world_size())]
    dist.all_gather(peaks, peak)
    if dist.get_rank() == 0:
        Path(spec["out"]).write_text(json.dumps({"peak_rss_bytes": [int(p.item()) for p in peaks]}))
    end_distributed()


def sync_bytes(model_dir: str, lora_rank: int) -> int:
    """What one vLLM sync sends (nanoalign.lora.sync_parameters on the model, fp32 as the trainer keeps it)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from nanoalign import lora

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(model_dir))
    if lora_rank:
        return sum(m.weight.numel() * 4 for m in lora.target_layers(model).values())
    return sum(p.numel() * 4 for p in model.parameters())


def run(model_dir: str, algo: str, lora_rank: int, args, work: Path) -> dict:
    out_dir = work / f"{algo}-r{lora_rank}"
    figures = work / f"{algo}-r{lora_rank}.json"
    spec = {"algo": algo, "model": model_dir, "out_dir": str(out_dir), "steps": args.steps, "batch_size": args.batch_size,
            "rank": lora_rank, "out": str(figures)}  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, "--child", json.dumps(spec)]
    env = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=3600, check=False)
    if proc.returncode != 0:
        return {"algo": algo, "lora_rank": lora_rank, "error": (proc.stdout + proc.stderr)[-3000:]}
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    times = [r["step_time"] for r in records if r["step"] > args.warmup]
    ckpt = max((out_dir / "checkpoints").glob("step_*"))
    peaks = json.loads(figures.read_text())["peak_rss_bytes"]
    return {"algo": algo, "lora_rank": lora_rank, "peak_rss_mib_per_rank": [p / 2**20 for p in peaks],
            "peak_rss_mib": max(peaks) / 2**20, "checkpoint_mib": sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) / 2**20,
            "sync_mib": sync_bytes(model_dir, lora_rank) / 2**20, "step_s": statistics.median(times), "step_times": times}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(parser)
    parser.set_defaults(model="small")
    parser.add_argument("--algos", nargs="+", default=["sft", "dpo"], choices=["sft", "dpo", "mpo"])
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the median")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--work", default="runs/bench-lora")
    parser.add_argument("--out", default=None, help="results JSON (default bench/results/lora-MODEL.json)")
    args = parser.parse_args()
    model_dir = model_from_args(args)  # "real": Qwen2.5-VL-3B's widths and vocabulary at 2 + 2 layers
    rows = []
    for algo in args.algos:
        for rank in (0, args.lora_rank):
            rows.append(run(model_dir, algo, rank, args, Path(args.work)))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "step_times"}), flush=True)
    table = print_table(rows, [("algo", "algo", ""), ("LoRA rank", "lora_rank", ""), ("peak RSS / rank (MiB)", "peak_rss_mib", ".0f"),
                               ("checkpoint (MiB)", "checkpoint_mib", ".3g"), ("vLLM sync (MiB)", "sync_mib", ".3g"),
                               ("step (s)", "step_s", ".3g")], title=f"LoRA vs full fine-tuning, {args.model}, 2 ranks")  # fmt: skip
    out = args.out or f"bench/results/lora-{args.model if args.model in ('tiny', 'small', 'real') else 'custom'}.json"
    write_json(out, {"args": vars(args), "model_dir": model_dir, "machine": machine_info(), "rows": rows, "table": table})


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--child":
        child(json.loads(sys.argv[2]))
    else:
        main()
