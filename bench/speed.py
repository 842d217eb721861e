"""Step time, tokens/s, peak memory and MFU of every algorithm, through train.py's own loop.

    python bench/speed.py                                  # tiny model, all 7 algorithms, CPU or GPU
    python bench/speed.py --model small --algos sft dpo    # the ~70M-parameter config
    python bench/speed.py --model small --layers 12        # any size (see bench/common.py)

Each (model, algorithm) runs `train.train(cfg)` in a fresh process: the algorithm's preset, the
given model, no evaluation, no checkpoints, no export; `--warmup` steps are dropped and the median
of the remaining `step_time`s in metrics.jsonl is reported. The step time is the loop's own: data
loading and encoding, the reference forward (DPO/MPO, RLOO, Online DPO), generation and rewards
(RL: steps_per_generation is set to 1, so every step samples), forward, backward, optimizer.

Tokens/s counts the real (unpadded) tokens of the rows the loss trains on, prompt and image tokens
included. FLOPs are counted by torch.utils.flop_counter (matmuls and attention: the work that
dominates) in a second fresh run of the same steps, which includes generation, reference forwards
and the chunked log-probs' recompute of the logits in backward; MFU = those FLOPs / step time /
the best of ten 2048^3 fp32 (CPU) or bf16 (GPU) matmuls, timed in a child like the runs (so under the
same load). Counted FLOPs include recomputation (strictly, hardware FLOPs utilisation); with the
small vocabularies here the recomputed lm_head is under 1% of them. Peak memory is the child's
high-water mark (RSS on CPU: Python, torch and the model included; allocator peak on GPU).
"""

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (  # noqa: E402
    add_step_flags, child_spec, current_rss_bytes, emit, machine_info, matmul_peak, median, mib,
    model_from_args, num_params, print_table, run_child, write_json,
)  # fmt: skip

ALGOS = ["sft", "dpo", "mpo", "grpo", "gspo", "rloo", "online_dpo"]


def bench_config(algo: str, model: str, out_dir: str, steps: int, overrides: dict):
    """The algorithm's preset with the benchmark's settings (what the table is measured with)."""
    from nanoalign.config import PRESETS

    cfg = dataclasses.replace(
        PRESETS[algo](), model=model, out_dir=out_dir, max_steps=steps, eval_split="", save_every=0,
        export=False, resume=False, log_every=10**6, steps_per_generation=1,
    )  # fmt: skip
    return dataclasses.replace(cfg, **overrides)


def child(spec: dict) -> None:
    """Run train() for spec["steps"] steps and emit step times, token counts, FLOPs, memory."""
    import torch

    torch.set_num_threads(spec["threads"])
    if spec.get("peak"):  # the machine's matmul FLOP/s, measured in a child like the runs
        return emit(matmul_peak(dtype="bfloat16" if torch.cuda.is_available() else "float32"))
    import train as loop
    from bench.common import suppress_image_token_in_rollouts

    suppress_image_token_in_rollouts(spec["model"])

    with tempfile.TemporaryDirectory() as out_dir:
        cfg = bench_config(spec["algo"], spec["model"], out_dir, spec["steps"], spec["overrides"])
        algo = loop.ALGOS[cfg.algo]
        record = {"setup_rss": None, "train_tokens": [], "padded_tokens": [], "rows": [], "loss_tokens": []}
        prepare, loss = algo.prepare, algo.loss

        def counting_prepare(samples, run):  # the first call marks the end of setup (model, data loaded)
            if record["setup_rss"] is None:
                record["setup_rss"] = current_rss_bytes()
            return prepare(samples, run)

        def counting_loss(micro, run):
            step = run.step  # 0-based index of the step this micro-batch belongs to
            for key in ("train_tokens", "padded_tokens", "rows", "loss_tokens"):
                while len(record[key]) <= step:
                    record[key].append(0)
            batch = micro.batch
            record["train_tokens"][step] += int(batch.attention_mask.sum())
            record["padded_tokens"][step] += batch.input_ids.numel()
            record["rows"][step] += batch.input_ids.shape[0]
            record["loss_tokens"][step] += int(batch.mask.sum())
            return loss(micro, run)

        algo.prepare, algo.loss = counting_prepare, counting_loss
        flops = None
        if spec["count_flops"]:
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as counter:
                loop.train(cfg)
            flops = counter.get_total_flops()
        else:
            loop.train(cfg)
        lines = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    emit({"step_times": [m["step_time"] for m in lines], "flops": flops, **record})


def measure(algo: str, model: str, args, overrides: dict | None = None) -> dict:
    """Timed run + (optionally) FLOP-counting run of one (model, algorithm), each in a fresh process."""
    steps = args.warmup + args.steps
    spec = {"algo": algo, "model": model, "steps": steps, "threads": args.threads, "count_flops": False,
            "overrides": dict(overrides or {})}  # fmt: skip
    if args.batch_size:
        spec["overrides"]["batch_size"] = args.batch_size
    timed = run_child(__file__, spec, verbose=args.verbose)
    if "error" in timed:
        print(f"{algo}: FAILED\n{timed['error']}", flush=True)
        return {"algo": algo, "error": timed["error"]}
    kept = slice(args.warmup, None)
    step_time = median(timed["step_times"][kept])
    tokens = median(timed["train_tokens"][kept])
    row = {
        "algo": algo,
        "step_time_s": step_time,
        "step_times_s": timed["step_times"],
        "rows_per_step": median(timed["rows"][kept]),
        "train_tokens_per_step": tokens,
        "padded_tokens_per_step": median(timed["padded_tokens"][kept]),
        "loss_tokens_per_step": median(timed["loss_tokens"][kept]),
        "tokens_per_s": tokens / step_time,
        "peak_mem_mib": mib(timed["peak_mem_bytes"]),
        "setup_rss_mib": mib(timed["setup_rss"]),
    }
    if args.flops:
        counted = run_child(__file__, {**spec, "count_flops": True, "steps": min(steps, args.flop_steps)}, verbose=args.verbose)
        if "error" not in counted and counted["flops"]:
            # FLOPs per train token of the counted run (same seed, same steps) x this run's tokens.
            per_token = counted["flops"] / max(1, sum(counted["train_tokens"]))
            row["flops_per_step"] = per_token * tokens
            row["flops_per_s"] = row["flops_per_step"] / step_time
            row["mfu"] = row["flops_per_s"] / args.peak["best_flops_per_s"]  # against the best measured matmul rate
            row["gflop_per_step"], row["gflop_per_s"] = row["flops_per_step"] / 1e9, row["flops_per_s"] / 1e9
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_flags(parser, ALGOS)  # --model, --algos, --steps, --warmup, --batch-size, --threads
    parser.add_argument("--no-flops", dest="flops", action="store_false", help="skip the FLOP-counting runs")
    parser.add_argument("--flop-steps", type=int, default=2, help="steps of the FLOP-counting run (FLOPs per token are scaled)")
    parser.add_argument("--out", default=None, help="JSON output (default bench/results/speed-<model>.json)")
    parser.add_argument("--verbose", action="store_true", help="show the children's output")
    args = parser.parse_args()
    model = model_from_args(args)

    args.peak = run_child(__file__, {"peak": True, "threads": args.threads})  # same environment as the runs
    params = num_params(model)
    print(f"model {model}: {params['total'] / 1e6:.1f}M parameters; matmul {args.peak['flops_per_s'] / 1e9:.1f} GFLOP/s "
          f"median, {args.peak['best_flops_per_s'] / 1e9:.1f} best ({args.peak['dtype']}, {args.threads} threads)", flush=True)  # fmt: skip
    rows = []
    for algo in args.algos:
        rows.append(measure(algo, model, args))
        print(f"{algo}: {json.dumps({k: v for k, v in rows[-1].items() if k != 'step_times_s'}, default=str)}", flush=True)
    name = args.model if args.model in ("tiny", "small") else Path(model).name
    print_table(rows, [
        ("algo", "algo", "s"), ("step (s)", "step_time_s", ".3f"), ("rows", "rows_per_step", ".0f"),
        ("train tokens", "train_tokens_per_step", ".0f"), ("tokens/s", "tokens_per_s", ".0f"),
        ("GFLOP/step", "gflop_per_step", ".3g"), ("GFLOP/s", "gflop_per_s", ".3g"), ("MFU", "mfu", ".1%"),
        ("peak mem (MiB)", "peak_mem_mib", ".0f"), ("after setup (MiB)", "setup_rss_mib", ".0f"),
    ], title=f"speed: {name} ({params['total'] / 1e6:.1f}M params), {args.threads} threads, median of {args.steps} steps after {args.warmup}")  # fmt: skip
    out = args.out or Path(__file__).parent / "results" / f"speed-{name}.json"
    write_json(out, {"model": model, "params": params, "matmul_peak": args.peak, "machine": machine_info(),
                     "args": {k: v for k, v in vars(args).items() if k != "peak"}, "rows": rows})  # fmt: skip


if __name__ == "__main__":
    spec = child_spec(sys.argv)
    child(spec) if spec else main()
