"""Padded vs padding-free vs token-budget micro-batches: SFT training tokens/s and peak memory.

    python bench/padding_free.py                       # small model (~70M), 2 steps of 16 samples each mode
    python bench/padding_free.py --model tiny --steps 3
    python bench/padding_free.py --mix rl --modes padded padding-free   # RL rows: completions up to the cap

Each mode runs in a fresh child process (bench/common.run_child: its own peak RSS) through the real
path: build_policy (FSDP2 over a world of 1), sft.prepare (encoding, token-budget grouping) and
sft.loss + backward on every micro-batch of the step, the same samples in the same order:

    padded          --batch-size 4 (4 micro-batches of 4 rows per step of 16 samples)
    padded+budget   --max-tokens-per-micro-batch B, counted as rows x longest row
    padding-free    --padding-free, 4 rows per micro-batch
    pf+budget       --padding-free --max-tokens-per-micro-batch B, counted as real tokens
    trl             TRL 1.16's SFTTrainer on the same rows (prompt-completion), --batch-size rows per
                    micro-batch, padded as TRL builds VLM batches (--trl-python: an interpreter with trl)

tokens/s = real (non-pad) tokens of the step / seconds of forward + backward (encoding is timed
apart: `encode_s`); seconds are the child's CPU seconds on CPU (time.process_time, one thread: the
figure does not depend on what else shares the cores), wall seconds on GPU. Peak memory = the child's peak RSS (CPU) or allocator high-water mark (GPU).

The length mix, modelled on llava-instruct-mix (scaled to CPU: Qwen2.5-VL at its defaults gives 64
to 1,300+ tokens an image and answers of 10 to 1,000+ tokens):
    images   1 per sample (80%) or 2 (20%); sizes drawn from 112x112, 224x224, 336x252, 448x336 and
             448x448 (weights 1, 3, 3, 2, 1): 16 to 256 image tokens each (max_pixels 448 x 448)
    prompt   a question of 4..120 words, log-normal, median 16
    answer   4..700 words, log-normal, median 60, sigma 1 (a long tail: the one row that pads the rest)
The tiny tokenizer makes most of these words one token; the measured row lengths are printed.
"""

import argparse
import dataclasses
import math
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (  # noqa: E402
    add_model_flags, child_spec, emit, machine_info, median, mib, model_from_args, print_table, run_child,
    trl_training_args, write_json,
)  # fmt: skip

IMAGE_PIXELS = {"shortest_edge": 56 * 56, "longest_edge": 448 * 448}  # the processor's limits on both sides
IMAGE_SIZES = [((112, 112), 1), ((224, 224), 3), ((336, 252), 3), ((448, 336), 2), ((448, 448), 1)]
WORDS = ["red", "blue", "green", "circle", "square", "triangle", "shapes", "the", "image", "is", "there", "are", "sides"]
MODES = {
    "padded": {"padding_free": False, "budget": False},
    "padded+budget": {"padding_free": False, "budget": True},
    "padding-free": {"padding_free": True, "budget": False},
    "pf+budget": {"padding_free": True, "budget": True},
}


def step_clock() -> float:
    """Seconds for the step timings: this process's CPU seconds on CPU (whatever else shares the cores),
    wall seconds on GPU."""
    import torch

    return time.perf_counter() if torch.cuda.is_available() else time.process_time()


def lognormal_int(rng: random.Random, median_value: float, sigma: float, low: int, high: int) -> int:
    return max(low, min(high, round(math.exp(rng.gauss(math.log(median_value), sigma)))))


def length_mix(num_samples: int, mix: str = "sft", seed: int = 0) -> list[dict]:
    """Prepared SFT samples with the module docstring's distribution (deterministic for a seed).

    mix "rl": RL training rows instead, G = 4 completions per prompt (each its own row, as rollouts
    from vLLM or HF generate come: no shared prompt), a 224x224 image and a 16-word question per
    prompt, completions of 8..256 words (the cap), uniform, a quarter of them cut at the cap.
    """
    from nanoalign.data import prepare_sample
    from nanoalign.shapes import draw_shapes

    rng = random.Random(seed)
    samples = []
    for i in range(num_samples):
        if mix == "rl":
            if i % 4 == 0:  # a new prompt for each group of 4 completions
                images = [draw_shapes(rng, 2, 224, 28)]
                question = " ".join(rng.choices(WORDS, k=16)) + "?"
            answer = " ".join(rng.choices(WORDS, k=256 if rng.random() < 0.25 else rng.randint(8, 256)))
            raw = {"images": images, "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
            samples.append(prepare_sample(raw, "sft", f"rl {i}"))
            continue
        num_images = 1 if rng.random() < 0.8 else 2
        sizes = rng.choices([s for s, _ in IMAGE_SIZES], weights=[w for _, w in IMAGE_SIZES], k=num_images)
        images = [draw_shapes(rng, 2, max(size), max(size) / 8).resize(size) for size in sizes]
        question = " ".join(rng.choices(WORDS, k=lognormal_int(rng, 16, 0.8, 4, 120))) + "?"
        answer = " ".join(rng.choices(WORDS, k=lognormal_int(rng, 60, 1.0, 4, 700))) + "."
        raw = {"images": images, "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
        samples.append(prepare_sample(raw, "sft", f"mix {i}"))
    return samples


def child(spec: dict) -> None:
    import torch

    from nanoalign import sft
    from nanoalign.config import PRESETS
    from nanoalign.model import build_policy, load_processor, stop_and_pad_ids
    from nanoalign.runtime import Run, device_mesh, end_distributed, init_distributed

    torch.set_num_threads(spec["threads"])
    rank, world_size, device = init_distributed()
    mode = MODES[spec["mode"]]
    cfg = dataclasses.replace(
        PRESETS["sft"](), batch_size=spec["batch_size"], grad_accum_steps=spec["samples_per_step"] // spec["batch_size"],
        max_length=4096, padding_free=mode["padding_free"], max_tokens_per_micro_batch=spec["budget"] if mode["budget"] else 0,
        logps_chunk_size=256,
    )  # fmt: skip
    processor = load_processor(spec["model_dir"])
    processor.image_processor.size = IMAGE_PIXELS
    policy = build_policy(spec["model_dir"], cfg, device_mesh(world_size, device), bf16=device.type == "cuda", trainable=True)
    stop_ids, pad_id = stop_and_pad_ids(processor, policy.hf)
    run = Run(cfg, processor, policy, None, rank, world_size, device, stop_ids, pad_id)
    samples = length_mix(spec["samples_per_step"] * (spec["warmup"] + spec["steps"]), spec.get("mix", "sft"))
    steps = []
    for step in range(spec["warmup"] + spec["steps"]):
        t0 = step_clock()
        micro, _ = sft.prepare(samples[step * spec["samples_per_step"] : (step + 1) * spec["samples_per_step"]], run)
        t1 = step_clock()
        for m in micro:
            loss, _ = sft.loss(m, run)
            loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t2 = step_clock()
        policy.zero_grad(set_to_none=True)
        real = sum(int(m.batch.attention_mask.sum()) for m in micro)
        computed = real if mode["padding_free"] else sum(m.batch.input_ids.numel() for m in micro)
        if step >= spec["warmup"]:
            steps.append({"encode_s": t1 - t0, "train_s": t2 - t1, "real_tokens": real, "computed_tokens": computed,
                          "micro_batches": len(micro), "row_lengths": [n for m in micro for n in m.batch.attention_mask.sum(1).tolist()]})  # fmt: skip
    emit({"steps": steps, "machine": machine_info()})
    end_distributed()


def child_trl(spec: dict) -> None:
    """The same samples through TRL's SFTTrainer (prompt-completion rows: completion-only loss, padded
    batches of --batch-size rows, as TRL 1.16 builds VLM batches), timed like `child`: CPU seconds of
    its training_step (forward + backward of one micro-batch; the collator runs before it)."""
    import datasets
    import torch
    import trl
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback

    torch.set_num_threads(spec["threads"])
    total_steps = spec["warmup"] + spec["steps"]
    samples = length_mix(spec["samples_per_step"] * total_steps, spec.get("mix", "sft"))
    rows = [{"prompt": s["messages"][:1], "completion": s["messages"][1:], "images": s["images"]} for s in samples]
    processor = AutoProcessor.from_pretrained(spec["model_dir"])
    processor.image_processor.size = IMAGE_PIXELS
    model = AutoModelForImageTextToText.from_pretrained(spec["model_dir"], dtype=torch.float32)
    args = trl.SFTConfig(
        **trl_training_args(spec["work"]), max_steps=total_steps, per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=spec["samples_per_step"] // spec["batch_size"], max_length=4096,
        train_sampling_strategy="sequential",
    )  # fmt: skip
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=processor)
    steps, current = [], {"train_s": 0.0, "real_tokens": 0, "computed_tokens": 0, "micro_batches": 0, "row_lengths": []}
    training_step = trainer.training_step

    def timed_training_step(model, inputs, *args, **kwargs):
        t0 = step_clock()
        out = training_step(model, inputs, *args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        current["train_s"] += step_clock() - t0
        current["real_tokens"] += int(inputs["attention_mask"].sum())
        current["computed_tokens"] += inputs["input_ids"].numel()
        current["micro_batches"] += 1
        current["row_lengths"] += inputs["attention_mask"].sum(1).tolist()
        return out

    class EveryStep(TrainerCallback):
        def on_step_end(self, *a, **k):
            steps.append(dict(current, encode_s=0.0))
            current.update(train_s=0.0, real_tokens=0, computed_tokens=0, micro_batches=0, row_lengths=[])

    trainer.training_step = timed_training_step
    trainer.add_callback(EveryStep())
    trainer.train()
    emit({"steps": steps[spec["warmup"] :], "machine": machine_info(), "trl": trl.__version__})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(parser)
    parser.set_defaults(model="small")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=[*MODES, "trl"], help="trl: TRL's SFTTrainer on the same rows (needs --trl-python)")
    parser.add_argument("--trl-python", default="/work/venv-trl/bin/python", help="interpreter with trl installed, for --modes trl")
    parser.add_argument("--mix", default="sft", choices=["sft", "rl"], help="the length mix (module docstring)")
    parser.add_argument("--samples-per-step", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4, help="rows per micro-batch without a budget")
    parser.add_argument("--budget", type=int, default=2048, help="--max-tokens-per-micro-batch in the budget modes")
    parser.add_argument("--steps", type=int, default=2, help="measured steps (the total over them is reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="results JSON (default bench/results/padding_free-MODEL.json)")
    args = parser.parse_args()
    model_dir = model_from_args(args)
    rows = []
    for mode in args.modes:
        spec = {"mode": mode, "model_dir": model_dir, "threads": args.threads, "samples_per_step": args.samples_per_step,
                "batch_size": args.batch_size, "budget": args.budget, "steps": args.steps, "warmup": args.warmup, "mix": args.mix}  # fmt: skip
        if mode == "trl":
            with tempfile.TemporaryDirectory() as work:
                result = run_child(__file__, {**spec, "side": "trl", "work": work}, python=args.trl_python, timeout=3600)
        else:
            result = run_child(__file__, spec, timeout=3600)
        if "error" in result:
            print(f"{mode}: {result['error']}", flush=True)
            rows.append({"mode": mode, "error": result["error"]})
            continue
        steps = result["steps"]
        train_s = sum(s["train_s"] for s in steps)
        real = sum(s["real_tokens"] for s in steps)
        lengths = sorted(n for s in steps for n in s["row_lengths"])
        rows.append({
            "mode": mode, "tokens_per_s": real / train_s, "train_s": train_s, "encode_s": sum(s["encode_s"] for s in steps),
            "real_tokens": real, "computed_tokens": sum(s["computed_tokens"] for s in steps),
            "micro_batches": median([s["micro_batches"] for s in steps]), "peak_mib": mib(result["peak_mem_bytes"]),
            "row_length_median": median(lengths), "row_length_max": lengths[-1], "machine": result["machine"],
        })  # fmt: skip
    padded = next((r for r in rows if r["mode"] == "padded" and "error" not in r), None)
    for r in rows:
        if padded and "error" not in r:
            r["speedup"] = r["tokens_per_s"] / padded["tokens_per_s"]
            r["pad_fraction"] = 1 - r["real_tokens"] / r["computed_tokens"]
    print_table(rows, [("mode", "mode", ""), ("tokens/s", "tokens_per_s", ".0f"), ("x padded", "speedup", ".2f"),
                       ("pad share of computed", "pad_fraction", ".2f"), ("micro-batches/step", "micro_batches", ".3g"),
                       ("fwd+bwd s", "train_s", ".1f"), ("encode s", "encode_s", ".1f"), ("peak MiB", "peak_mib", ".0f")],
                title=f"{args.mix} length mix, {args.model}, {args.samples_per_step} samples/step x {args.steps} steps")  # fmt: skip
    out = args.out or f"bench/results/padding_free-{args.mix}-{args.model}.json"
    write_json(out, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    if (spec := child_spec(sys.argv)) is not None:
        child_trl(spec) if spec.get("side") == "trl" else child(spec)
    else:
        main()
