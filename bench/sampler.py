"""In-process generation: nanoalign's sampler against HF generate, P prompts x G samples.

    python bench/sampler.py                              # tiny and small, G = 1 4 8 16
    python bench/sampler.py --models small --generations 8 --repeats 5

One measurement = one `nanoalign.rollout.sample_completions` call, what an RL step pays for its
rollouts: the processor on the P*G training rows, then either nanoalign's sampler (--sampler
nanoalign: the P distinct prompts processed again and prefilled once, the KV cache copied G times,
all rows decoded together) or HF generate on all P*G rows (--sampler hf). Prompts are the shapes
task's (one 224-px image each by default), sampling at temperature 1, up to max_new_tokens new
tokens. A random-init model seldom samples its EOS, but it does sample the image placeholder: our
sampler ends such a row there (and stops computing it), HF generate decodes it to the cap and the
trainer drops it afterwards, so part of the gap at this setting comes from those rows (the mean
completion lengths are in the table; for a trained policy, rows end at EOS on both sides). Each (model, G) runs in a fresh process with --threads torch threads; the two samplers
alternate, the first call of each is dropped, the median of --repeats is reported: wall time, and
the process's CPU time (all threads), which other jobs on a shared machine disturb far less.

Also per configuration: the prefill alone (one forward with cache over the P distinct prompts, and
over the P*G rows as HF generate does it), and the FLOPs of one call of each sampler counted by
torch.utils.flop_counter (matmuls and attention).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import child_spec, emit, load_hf_model, machine_info, model_dir, num_params, print_table, run_child, write_json  # noqa: E402

SAMPLERS = ("nanoalign", "hf")


def child(spec: dict) -> None:
    """Time both samplers on one (model, G) and emit the medians, prefill times and FLOPs."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from nanoalign.batch import process_prompts, render
    from nanoalign.model import load_processor
    from nanoalign.rollout import sample_completions
    from nanoalign.sampler import prefill
    from nanoalign.shapes import shapes_sample

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    processor, model = load_processor(spec["model"]), load_hf_model(spec["model"]).eval()
    tokenizer = processor.tokenizer
    eos = model.generation_config.eos_token_id
    stop_ids = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
    samples = [shapes_sample("train", i, "rl", image_size=spec["image_size"]) for i in range(spec["prompts"])]
    prompts, images, G = [s["prompt"] for s in samples], [s["images"] for s in samples], spec["num_generations"]

    def run(sampler: str):
        return sample_completions(
            model, processor, prompts, images, num_generations=G, max_new_tokens=spec["max_new_tokens"],
            stop_ids=stop_ids, pad_id=tokenizer.pad_token_id, device="cpu", sampler=sampler,
        )  # fmt: skip

    seconds, cpu_seconds, lengths = ({s: [] for s in SAMPLERS} for _ in range(3))
    for _ in range(spec["repeats"] + 1):  # the first round warms up
        for sampler in SAMPLERS:
            start, cpu_start = time.perf_counter(), time.process_time()
            rollout = run(sampler)
            seconds[sampler].append(time.perf_counter() - start)
            cpu_seconds[sampler].append(time.process_time() - cpu_start)
            lengths[sampler].append(statistics.mean(len(ids) for ids in rollout.completion_ids))
    texts = [render(processor, p, add_generation_prompt=True) for p in prompts]
    distinct = process_prompts(processor, texts, images, padding_side="left")
    rows = process_prompts(processor, [t for t in texts for _ in range(G)], [i for i in images for _ in range(G)], padding_side="left")
    prefill_s = {}
    for name, enc in (("distinct", distinct), ("rows", rows)):
        times = []
        for _ in range(spec["repeats"] + 1):
            start = time.perf_counter()
            with torch.no_grad():
                prefill(model, enc)
            times.append(time.perf_counter() - start)
        prefill_s[name] = statistics.median(times[1:])
    flops = {}
    for sampler in SAMPLERS:
        with FlopCounterMode(display=False) as counter:
            run(sampler)
        flops[sampler] = counter.get_total_flops()
    emit({
        "seconds": {s: statistics.median(v[1:]) for s, v in seconds.items()}, "all_seconds": seconds,
        "cpu_seconds": {s: statistics.median(v[1:]) for s, v in cpu_seconds.items()},
        "mean_length": {s: statistics.mean(v) for s, v in lengths.items()}, "prefill_s": prefill_s, "flops": flops,
        "prompt_tokens": int(distinct["attention_mask"].sum()) // len(prompts), "threads": torch.get_num_threads(),
    })  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "small"], help="tiny, small (bench/common.py) or model directories")
    parser.add_argument("--generations", nargs="+", type=int, default=[1, 4, 8, 16], help="samples per prompt (G)")
    parser.add_argument("--prompts", type=int, default=4, help="distinct prompts (P)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224, help="side of each prompt's image, in pixels")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per sampler (median reported), after one warm-up")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each child")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "sampler.json"))
    parser.add_argument("--verbose", action="store_true", help="show the children's output")
    args = parser.parse_args()

    table = []
    for name in args.models:
        path = model_dir(name) if name in ("tiny", "small") else name
        params = num_params(path)["total"]
        for G in args.generations:
            spec = {"model": path, "num_generations": G, "prompts": args.prompts, "max_new_tokens": args.max_new_tokens,
                    "image_size": args.image_size, "repeats": args.repeats, "threads": args.threads}  # fmt: skip
            result = run_child(__file__, spec, verbose=args.verbose)
            row = {"model": Path(name).name, "params_m": params / 1e6, "G": G, "rows": args.prompts * G}
            if "error" in result:
                print(f"{name} G={G}: FAILED\n{result['error']}", flush=True)
                table.append({**row, "error": result["error"]})
                continue
            ours, hf = result["seconds"]["nanoalign"], result["seconds"]["hf"]
            ours_cpu, hf_cpu = result["cpu_seconds"]["nanoalign"], result["cpu_seconds"]["hf"]
            row.update(
                ours_s=ours, hf_s=hf, speedup=hf / ours, ours_cpu_s=ours_cpu, hf_cpu_s=hf_cpu, cpu_speedup=hf_cpu / ours_cpu, ours_gflop=result["flops"]["nanoalign"] / 1e9,
                hf_gflop=result["flops"]["hf"] / 1e9, flop_ratio=result["flops"]["hf"] / result["flops"]["nanoalign"],
                prefill_distinct_s=result["prefill_s"]["distinct"], prefill_rows_s=result["prefill_s"]["rows"],
                ours_len=result["mean_length"]["nanoalign"], hf_len=result["mean_length"]["hf"],
                prompt_tokens=result["prompt_tokens"], peak_mem_mib=result["peak_mem_bytes"] / 2**20, raw=result,
            )  # fmt: skip
            table.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "raw"}, default=str), flush=True)
    print_table(table, [
        ("model", "model", "s"), ("params (M)", "params_m", ".1f"), ("G", "G", "d"), ("rows", "rows", "d"),
        ("nanoalign (s)", "ours_s", ".3f"), ("HF generate (s)", "hf_s", ".3f"), ("speed-up", "speedup", ".2f"),
        ("CPU s ours", "ours_cpu_s", ".3f"), ("CPU s HF", "hf_cpu_s", ".3f"), ("CPU speed-up", "cpu_speedup", ".2f"),
        ("GFLOP ours", "ours_gflop", ".3g"), ("GFLOP HF", "hf_gflop", ".3g"), ("FLOP ratio", "flop_ratio", ".2f"),
        ("prefill P rows (s)", "prefill_distinct_s", ".3f"), ("prefill P*G rows (s)", "prefill_rows_s", ".3f"),
        ("mean len ours", "ours_len", ".1f"), ("mean len HF", "hf_len", ".1f"),
    ], title=f"generation: {args.prompts} prompts x G samples, {args.max_new_tokens} new tokens, one {args.image_size}-px image "
             f"per prompt, {args.threads} threads, median of {args.repeats}")  # fmt: skip
    write_json(args.out, {"machine": machine_info(), "args": vars(args), "rows": table})


if __name__ == "__main__":
    spec = child_spec(sys.argv)
    child(spec) if spec else main()
