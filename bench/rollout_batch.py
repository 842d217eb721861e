"""A generation round sampled in one decode batch vs one micro-batch chunk at a time.

    python bench/rollout_batch.py                               # tiny and small, 4 and 16 chunks of 2 prompts x G = 8
    python bench/rollout_batch.py --models small --chunks 16 --max-new-tokens 64

One measurement = the in-process rollouts of one RL round: `chunks` micro-batches of `prompts`
prompts x G completions each (--batch-size = prompts x G rows). "chunked" calls
nanoalign.rollout.sample_completions once per chunk (what InProcess.sample did before
--rollout-batch-size: the decode batch is one micro-batch); "batched" calls
nanoalign.rollout.sample_round with max_rows 0 (all the round's rows in one decode batch, the new
default). Both use nanoalign's sampler (each prompt prefilled once, its cache copied G times) at
temperature 1 from the same seed. Each (model, chunks) runs in a fresh process; the two modes
alternate, one warm-up call of one chunk first, the median of --repeats reported: wall time, the
process's CPU time (all threads; other jobs on a shared machine disturb it far less than wall time)
and sampled tokens per CPU second. A random-init model rarely samples a stop id, so most rows run
to --max-new-tokens in both modes (the mean lengths are shown).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (
    child_spec,
    emit,
    load_hf_model,
    machine_info,
    model_dir,
    num_params,
    print_table,
    run_child,
    write_json,
)

MODES = ("chunked", "batched")


def child(spec: dict) -> None:
    import torch

    from nanoalign.model import load_processor, stop_and_pad_ids
    from nanoalign.rollout import sample_completions, sample_round
    from nanoalign.shapes import shapes_sample

    torch.set_num_threads(spec["threads"])
    processor, model = load_processor(spec["model"]), load_hf_model(spec["model"]).eval()
    stop_ids, pad_id = stop_and_pad_ids(processor, model)
    G, per_chunk = spec["num_generations"], spec["prompts"]
    samples = [shapes_sample("train", i, "rl", image_size=spec["image_size"]) for i in range(per_chunk * spec["chunks"])]
    chunks = [samples[i : i + per_chunk] for i in range(0, len(samples), per_chunk)]
    common = {"max_new_tokens": spec["max_new_tokens"], "stop_ids": stop_ids, "pad_id": pad_id, "device": "cpu"}

    def run(mode: str, chunks=chunks):
        if mode == "chunked":
            return [sample_completions(model, processor, [s["prompt"] for s in c], [s["images"] for s in c], num_generations=G, **common)
                    for c in chunks]  # fmt: skip
        return sample_round(model, processor, chunks, num_generations=G, max_rows=0, temperature=1.0, top_p=1.0, **common)

    for mode in MODES:
        run(mode, chunks[:1])  # warm-up
    seconds, cpu_seconds, tokens = ({m: [] for m in MODES} for _ in range(3))
    for repeat in range(spec["repeats"]):
        for mode in MODES:
            torch.manual_seed(repeat)
            start, cpu_start = time.perf_counter(), time.process_time()
            rollouts = run(mode)
            seconds[mode].append(time.perf_counter() - start)
            cpu_seconds[mode].append(time.process_time() - cpu_start)
            tokens[mode].append(sum(len(ids) for r in rollouts for ids in r.completion_ids))
    emit({"seconds": {m: statistics.median(v) for m, v in seconds.items()}, "all_seconds": seconds,
          "cpu_seconds": {m: statistics.median(v) for m, v in cpu_seconds.items()}, "all_cpu_seconds": cpu_seconds,
          "tokens": {m: statistics.median(v) for m, v in tokens.items()}, "threads": torch.get_num_threads()})  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "small"], help="tiny, small (bench/common.py) or model directories")
    parser.add_argument("--chunks", nargs="+", type=int, default=[4, 16], help="micro-batches per round")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per micro-batch (batch size / G)")
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224, help="side of each prompt's image, in pixels")
    parser.add_argument("--repeats", type=int, default=1, help="timed rounds per mode (median reported), after a one-chunk warm-up")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each child")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "rollout_batch.json"))
    parser.add_argument("--verbose", action="store_true", help="show the children's output")
    args = parser.parse_args()

    table = []
    for name in args.models:
        path = model_dir(name) if name in ("tiny", "small") else name
        for chunks in args.chunks:
            spec = {"model": path, "num_generations": args.num_generations, "prompts": args.prompts, "chunks": chunks,
                    "max_new_tokens": args.max_new_tokens, "image_size": args.image_size, "repeats": args.repeats,
                    "threads": args.threads}  # fmt: skip
            result = run_child(__file__, spec, verbose=args.verbose)
            row = {"model": Path(name).name, "params_m": num_params(path)["total"] / 1e6, "chunks": chunks,
                   "rows": chunks * args.prompts * args.num_generations}  # fmt: skip
            if "error" in result:
                print(f"{name} chunks={chunks}: FAILED\n{result['error']}", flush=True)
                table.append({**row, "error": result["error"]})
                continue
            for mode in MODES:
                row[f"{mode}_s"], row[f"{mode}_cpu_s"] = result["seconds"][mode], result["cpu_seconds"][mode]
                row[f"{mode}_tok_per_cpu_s"] = result["tokens"][mode] / result["cpu_seconds"][mode]
                row[f"{mode}_len"] = result["tokens"][mode] / row["rows"]
            row["cpu_speedup"] = result["cpu_seconds"]["chunked"] / result["cpu_seconds"]["batched"]
            row["peak_mem_mib"], row["raw"] = result["peak_mem_bytes"] / 2**20, result
            table.append(row)
    print_table(table, [
        ("model", "model", "s"), ("params (M)", "params_m", ".1f"), ("chunks", "chunks", "d"), ("rows", "rows", "d"),
        ("chunked (s)", "chunked_s", ".2f"), ("batched (s)", "batched_s", ".2f"),
        ("chunked CPU s", "chunked_cpu_s", ".2f"), ("batched CPU s", "batched_cpu_s", ".2f"),
        ("chunked tok/CPU s", "chunked_tok_per_cpu_s", ".0f"), ("batched tok/CPU s", "batched_tok_per_cpu_s", ".0f"),
        ("CPU speed-up", "cpu_speedup", ".2f"), ("mean len chunked", "chunked_len", ".1f"), ("mean len batched", "batched_len", ".1f"),
    ], title=f"one RL round: chunks x {args.prompts} prompts x G={args.num_generations}, {args.max_new_tokens} new tokens, "
             f"one {args.image_size}-px image per prompt, {args.threads} thread(s), median of {args.repeats}")  # fmt: skip
    write_json(args.out, {"machine": machine_info(), "args": vars(args), "rows": table})


if __name__ == "__main__":
    spec = child_spec(sys.argv)
    child(spec) if spec else main()
