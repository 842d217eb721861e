"""How step time and peak memory grow when sequence length, images per sample or G double.

    python bench/scaling.py                          # tiny model, 3 points per axis
    python bench/scaling.py --model small --axes seq images
    python bench/scaling.py --seq 256 512 1024 2048   # bigger settings

Three axes, each through train.py's loop in fresh processes (the same measurement as speed.py):
    seq      SFT, 8 rows of about T tokens each: a shapes sample (1 image, 224 px = 64 image
             tokens) whose answer's reasoning sentence is repeated until the row reaches T tokens
    images   SFT, 8 rows with k images each (224 px: 64 image tokens and 256 vision patches per
             image), the shapes "how many shapes in these k images" question
    G        GRPO, 2 prompts per step x G completions (batch = 2G rows), 32 new tokens each:
             generation, rewards, forward and backward all grow with G
The datasets for seq and images are written as jsonl (+ png files) into a temporary directory and
loaded by nanoalign's own local-file path, so the data path is the one users take.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import add_model_flags, machine_info, model_from_args, num_params, print_table, write_json  # noqa: E402
from bench.speed import measure  # noqa: E402

IMAGE_SIZE = 224


def write_dataset(out: Path, rows: list[dict]) -> str:
    """jsonl with images saved as png files next to it; returns the file path."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "data.jsonl", "w") as f:
        for i, row in enumerate(rows):
            paths = []
            for j, image in enumerate(row.pop("images")):
                path = out / f"{i}-{j}.png"
                image.save(path)
                paths.append(str(path))
            f.write(json.dumps({**row, "images": paths}) + "\n")
    return str(out / "data.jsonl")


def seq_dataset(out: Path, target_tokens: int, tokenizer, count: int) -> str:
    """SFT rows of about target_tokens tokens: the answer's reasoning repeated."""
    from nanoalign.shapes import shapes_sample

    rows = []
    for i in range(count):
        s = shapes_sample("train", i, "sft", image_size=IMAGE_SIZE)
        answer = s["messages"][1]["content"][0]["text"]  # "<think>R</think> The answer is ..."
        reasoning = answer[len("<think>") : answer.index("</think>")]
        fixed = 30 + IMAGE_SIZE**2 // 28**2 + len(tokenizer(answer)["input_ids"])  # template + image + answer
        repeats = max(1, (target_tokens - fixed) // max(1, len(tokenizer(" " + reasoning)["input_ids"])) + 1)
        long = "<think>" + " ".join([reasoning] * repeats) + answer[answer.index("</think>") :]
        s["messages"][1]["content"][0]["text"] = long
        rows.append(s)
    return write_dataset(out, rows)


def images_dataset(out: Path, num_images: int, count: int) -> str:
    from nanoalign.shapes import shapes_sample

    rows = [shapes_sample("train", i, "sft", image_size=IMAGE_SIZE, images_per_sample=num_images) for i in range(count)]
    return write_dataset(out, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(parser)
    parser.add_argument("--axes", nargs="+", default=["seq", "images", "G"], choices=["seq", "images", "G"])
    parser.add_argument("--seq", type=int, nargs="+", default=[128, 256, 512], help="row lengths (tokens)")
    parser.add_argument("--images", type=int, nargs="+", default=[1, 2, 4], help="images per sample")
    parser.add_argument("--generations", type=int, nargs="+", default=[2, 4, 8], help="G (2 prompts per step)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    model = model_from_args(args)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    opts = SimpleNamespace(warmup=args.warmup, steps=args.steps, threads=args.threads, batch_size=None, flops=False,
                           verbose=args.verbose, peak=None)  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        points = []
        if "seq" in args.axes:
            for t in args.seq:
                data = seq_dataset(Path(tmp) / f"seq{t}", t, tokenizer, 8 * (args.warmup + args.steps))
                points.append(("seq", t, "sft", {"dataset": data, "max_length": max(512, 2 * t), "num_eval_samples": 0}))
        if "images" in args.axes:
            for k in args.images:
                data = images_dataset(Path(tmp) / f"img{k}", k, 8 * (args.warmup + args.steps))
                points.append(("images", k, "sft", {"dataset": data, "num_eval_samples": 0}))
        if "G" in args.axes:
            for g in args.generations:
                points.append(("G", g, "grpo", {"num_generations": g, "batch_size": 2 * g}))
        for axis, value, algo, overrides in points:
            opts_point = SimpleNamespace(**vars(opts))
            row = measure(algo, model, opts_point, overrides)
            row.update(axis=axis, value=value)
            rows.append(row)
            print(f"{axis}={value}: {row.get('step_time_s', float('nan')):.3f} s, {row.get('peak_mem_mib', float('nan')):.0f} MiB", flush=True)
    for axis in args.axes:
        sel = [r for r in rows if r["axis"] == axis and "step_time_s" in r]
        for r in sel:  # growth relative to the first point of the axis
            r["time_x"] = r["step_time_s"] / sel[0]["step_time_s"]
            r["mem_x"] = (r["peak_mem_mib"] - r["setup_rss_mib"]) / max(1e-9, sel[0]["peak_mem_mib"] - sel[0]["setup_rss_mib"])
            r["step_mem_mib"] = r["peak_mem_mib"] - r["setup_rss_mib"]
    name = args.model if args.model in ("tiny", "small") else Path(model).name
    print_table(rows, [
        ("axis", "axis", "s"), ("value", "value", "d"), ("algo", "algo", "s"), ("rows", "rows_per_step", ".0f"),
        ("tokens/step", "padded_tokens_per_step", ".0f"), ("step (s)", "step_time_s", ".3f"), ("time x", "time_x", ".2f"),
        ("peak (MiB)", "peak_mem_mib", ".0f"), ("peak - setup (MiB)", "step_mem_mib", ".0f"), ("mem x", "mem_x", ".2f"),
    ], title=f"scaling: {name} ({num_params(model)['total'] / 1e6:.1f}M params), {args.threads} threads, median of {args.steps} steps after {args.warmup}")  # fmt: skip
    out = args.out or Path(__file__).parent / "results" / f"scaling-{name}.json"
    write_json(out, {"model": model, "machine": machine_info(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
