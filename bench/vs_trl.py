"""nanoalign side by side with Hugging Face TRL: step time, peak memory, first-step loss.

    python bench/vs_trl.py                                   # tiny model: sft dpo mpo grpo gspo
    python bench/vs_trl.py --model small --algos sft dpo     # the ~70M config
    python bench/vs_trl.py --trl-python /work/venv-trl/bin/python
    python bench/vs_trl.py --model real3b --image-size 448 --batch-size 8 --num-generations 4 \
        --completion-tokens 128 --steps 2 --warmup 1 --rounds 1   # Qwen2.5-VL-3B's widths (bench/real_shapes.py)
    python bench/vs_trl.py --nproc 2 --threads 1               # 2 ranks each (torchrun): peak = the highest rank's

TRL is optional: it runs in the interpreter given by --trl-python (default: this one if it can
import trl, else /work/venv-trl/bin/python if present); without it the TRL columns are skipped
with a message. nanoalign runs in this interpreter.

Same setup on both sides, each in a fresh single process with the same torch threads:
    model      the same saved checkpoint (fp32 on CPU; bf16 compute on GPU on both sides)
    data       the built-in shapes task, the same samples in the same order (TRL gets nanoalign's
               stream order and a sequential sampler, resp. shuffle_dataset=False)
    sft        batch 8, max_length 512, TRL prompt-completion data (completion-only loss)
    dpo / mpo  batch 8 pairs, beta 0.1, frozen reference model; mpo = sigmoid + bco_pair + sft
               with weights 0.8 / 0.2 / 1.0 (TRL's loss_type list)
    grpo       16 rows = 2 prompts x 8 generations, max_completion_length 32, temperature 1,
               loss dapo, eps 0.2, beta 0, rewards accuracy + 0.2 format (nanoalign's functions)
    gspo       grpo with importance_sampling_level "sequence", eps 3e-4 / 4e-4, loss grpo
    both RL    steps_per_generation 1: every step samples with HF generate (no vLLM), so the
               step time includes generation and rewards on both sides; the image token is
               suppressed in sampling on both sides (TRL does it; nanoalign is patched here)
    optimizer  AdamW (betas 0.9/0.95, no weight decay), grad clipping 1.0, no gradient
               checkpointing, a log line every step
    images     --image-size px a side (default 112, the built-in task's; 448 = 256 image tokens)
    ranks      --nproc N: both stacks under torchrun, --batch-size rows per rank. nanoalign shards with
               FSDP2; TRL gets what accelerate does on CPU, DDP (it applies FSDP only on accelerators),
               so each TRL rank holds whole weights, gradients and Adam moments. No first-step check.

Step time: nanoalign's `step_time` from metrics.jsonl; TRL's the time between two consecutive
on_step_end callbacks (data collation, generation, forward, backward and optimizer included on
both). CPU s/step: the process's CPU time (all threads) between two optimizer steps, which other
jobs on a shared machine disturb far less than wall time. The two stacks run alternately,
--rounds times each, and the medians pool the steps after --warmup of every run. Peak memory: the
child's ru_maxrss (Python, torch, the libraries each stack imports and the models included); the
RSS once set up is shown next to it.

First-step loss. The two stacks do not build identical rows, on purpose (BENCHMARKS.md):
    - TRL counts the template's "\\n" after <|im_end|> as a completion token; nanoalign stops the
      mask at the stop token (the model never generates that newline).
    - RL: the sampled completions differ (different RNG streams), so RL losses can only be
      compared on one batch.
So a third fresh process ("check") recomputes, from the same initial weights:
    nanoalign(TRL batch): nanoalign's Policy + loss functions on the exact batch TRL trained its
        first step on (saved by the TRL run) -> must equal TRL's logged first loss (~1e-6);
    nanoalign(own batch, TRL mask) (sft/dpo/mpo): nanoalign's own rows with the mask extended to
        the template tokens after the stop token -> must also equal TRL's loss;
    RL: nanoalign's group_advantages on the rewards of TRL's completions vs TRL's advantages.
"""

import argparse
import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (  # noqa: E402
    add_step_flags, child_spec, current_rss_bytes, emit, load_hf_model, machine_info, median, mib, model_from_args,
    num_params, print_table, run_child, suppress_image_token_in_rollouts, trl_normaliser, trl_training_args, write_json,
)  # fmt: skip

ALGOS = ["sft", "dpo", "mpo", "grpo", "gspo"]
NUM_SHAPES = 20000  # size of the shapes train split both stacks draw from
FORMATS = {"sft": "sft", "dpo": "preference", "mpo": "preference", "grpo": "rl", "gspo": "rl"}


def variety_reward(completions: list[str], **_) -> list[float]:
    """Distinct characters / 10: a cheap reward that differs between completions of a random model.

    The shapes rewards (accuracy, format) are 0 for every completion of a random-init model, so every
    advantage, the first-step RL loss and its gradient would be exactly 0 on both stacks and the
    comparison would prove nothing. This third reward (weight 1) makes them non-zero.
    """
    return [len(set(text)) / 10 for text in completions]


def nanoalign_config(spec: dict, out_dir: str, steps: int):
    """nanoalign's preset for spec["algo"], with the settings both stacks share (module docstring) and
    the spec's overrides (batch size, completion tokens, generations)."""
    from nanoalign.config import PRESETS

    algo = spec["algo"]
    cfg = dataclasses.replace(
        PRESETS[algo](), model=spec["model"], out_dir=out_dir, max_steps=steps, eval_split="", save_every=0,
        export=False, resume=False, log_every=10**6, seed=0, num_shapes_samples=NUM_SHAPES, grad_accum_steps=1,
        weight_decay=0.0, adam_betas=(0.9, 0.95), max_grad_norm=1.0,
    )  # fmt: skip
    overrides = {"batch_size": spec.get("batch_size")}
    if FORMATS[algo] == "rl":  # train.py refuses RL flags on the other methods
        overrides.update(
            steps_per_generation=1, reward_funcs=("accuracy", "format", "bench.vs_trl:variety_reward"),
            reward_weights=(1.0, 0.2, 1.0), max_completion_length=spec.get("completion_tokens"),
            num_generations=spec.get("num_generations"),
        )  # fmt: skip
    return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v})


def first_samples(algo: str, count: int, image_size: int) -> list[dict]:
    """The first `count` samples of nanoalign's data stream (seed 0), as raw shapes rows."""
    from nanoalign.data import stream_indices
    from nanoalign.shapes import shapes_sample

    return [shapes_sample("train", i, FORMATS[algo], image_size=image_size) for i in stream_indices(0, count, NUM_SHAPES, 0)]


# ---------------------------------------------------------------------------------------------------
# nanoalign child: train.py's loop


def child_nanoalign(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    import nanoalign.data
    import train as loop

    suppress_image_token_in_rollouts(spec["model"])
    # the built-in task draws 112-px images; both stacks get spec["image_size"] px ones
    nanoalign.data.shapes_sample = functools.partial(nanoalign.data.shapes_sample, image_size=spec["image_size"])
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = spec.get("out_dir") or tmp  # under torchrun the parent's, one for every rank
        cfg = nanoalign_config(spec, out_dir, spec["steps"])
        algo = loop.ALGOS[cfg.algo]
        setup = {}
        prepare = algo.prepare

        def marking_prepare(samples, run):
            setup.setdefault("rss", current_rss_bytes())
            return prepare(samples, run)

        algo.prepare = marking_prepare
        marks = cpu_marks_after_optimizer_steps()
        loop.train(cfg)
        if int(os.environ.get("RANK", 0)) != 0:  # rank 0 writes metrics.jsonl; the others report their peak
            emit({"cpu_times": marks[1:]})
            return
        lines = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    emit({"step_times": [m["step_time"] for m in lines], "first_loss": lines[0]["loss"], "cpu_times": marks[1:],
          "prepare_times": [m.get("prepare_time") for m in lines],  # RL: rollouts + rewards, within step_times
          "first_grad_norm": lines[0]["grad_norm"], "setup_rss": setup.get("rss")})  # fmt: skip


def cpu_marks_after_optimizer_steps() -> list[float]:
    """CPU seconds (all threads) used between consecutive optimizer steps, recorded after each step.

    Unlike wall time, the CPU time a process uses hardly changes when other jobs share the cores
    (idle OpenMP threads sleep: OMP_WAIT_POLICY=PASSIVE), so it is the steadier of the two here.
    """
    import torch

    marks, deltas = [time.process_time()], []
    step = torch.optim.AdamW.step

    def marking_step(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        now = time.process_time()
        deltas.append(now - marks[-1])
        marks.append(now)
        return out

    torch.optim.AdamW.step = marking_step
    return deltas


# ---------------------------------------------------------------------------------------------------
# TRL child: SFTTrainer / DPOTrainer / GRPOTrainer


def trl_dataset(algo: str, count: int, image_size: int):
    """TRL's vision dataset formats, rows in nanoalign's stream order."""
    import datasets

    rows = []
    for s in first_samples(algo, count, image_size):
        if algo == "sft":  # prompt-completion: TRL then trains on the completion only, like nanoalign
            rows.append({"prompt": s["messages"][:1], "completion": s["messages"][1:], "images": s["images"]})
        else:
            rows.append(s)
    return datasets.Dataset.from_list(rows)


def trl_reward_funcs():
    """nanoalign's reward functions behind TRL's calling convention (conversational completions)."""
    from nanoalign.rewards import accuracy_reward, format_reward

    def wrap(fn):
        def reward(completions, solution, **_):
            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
            return fn(texts, solution=solution) if fn is accuracy_reward else fn(texts)

        reward.__name__ = fn.__name__
        return reward

    return [wrap(accuracy_reward), wrap(format_reward), wrap(variety_reward)]


def child_trl(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    import transformers
    import trl
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback

    algo, steps = spec["algo"], spec["steps"]
    out_dir = tempfile.mkdtemp()
    cfg = nanoalign_config(spec, out_dir, steps)
    processor = AutoProcessor.from_pretrained(spec["model"])
    model = AutoModelForImageTextToText.from_pretrained(spec["model"], dtype=torch.float32)
    common = dict(
        **trl_training_args(out_dir), max_steps=steps, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=1, learning_rate=cfg.lr, adam_beta1=cfg.adam_betas[0], adam_beta2=cfg.adam_betas[1],
        weight_decay=0.0, max_grad_norm=cfg.max_grad_norm, remove_unused_columns=False,
    )  # fmt: skip
    if algo == "sft":
        args = trl.SFTConfig(**common, max_length=cfg.max_length, train_sampling_strategy="sequential")
        dataset = trl_dataset(algo, cfg.batch_size * steps * spec.get("nproc", 1), spec["image_size"])
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
    elif algo in ("dpo", "mpo"):
        args = trl.DPOConfig(
            **common, max_length=cfg.max_length, beta=cfg.beta, loss_type=list(cfg.loss_types),
            loss_weights=list(cfg.loss_weights), train_sampling_strategy="sequential",
        )  # fmt: skip
        dataset = trl_dataset(algo, cfg.batch_size * steps * spec.get("nproc", 1), spec["image_size"])
        trainer = trl.DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
    else:
        args = trl.GRPOConfig(
            **common, num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_length,
            temperature=cfg.temperature, top_p=cfg.top_p, loss_type=cfg.loss_type, epsilon=cfg.epsilon,
            epsilon_high=cfg.epsilon_high, beta=cfg.beta, importance_sampling_level=cfg.importance_sampling_level,
            scale_rewards=cfg.scale_rewards, steps_per_generation=1, num_iterations=1, shuffle_dataset=False,
            reward_weights=list(cfg.reward_weights), mask_truncated_completions=cfg.mask_truncated_completions,
            use_vllm=False, log_completions=False,
        )  # fmt: skip
        dataset = trl_dataset(algo, cfg.batch_size // cfg.num_generations * steps * spec.get("nproc", 1), spec["image_size"])
        trainer = trl.GRPOTrainer(
            model=model, reward_funcs=trl_reward_funcs(), args=args, train_dataset=dataset, processing_class=processor
        )

    times, cpu, setup = [], [], {}

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            setup["rss"] = current_rss_bytes()
            times.append(time.perf_counter())
            cpu.append(time.process_time())

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter())
            cpu.append(time.process_time())

    trainer.add_callback(Timer())
    first = {}
    compute_loss = trainer.compute_loss

    def recording_compute_loss(model, inputs, *a, **k):
        result = compute_loss(model, inputs, *a, **k)
        if not first:
            loss = result[0] if isinstance(result, tuple) else result
            first["loss"] = float(loss.detach())
            saved = {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
            if int(os.environ.get("RANK", 0)) == 0:
                torch.save(saved, spec["batch_file"])
        return result

    trainer.compute_loss = recording_compute_loss
    trainer.train()
    shutil.rmtree(out_dir, ignore_errors=True)
    emit({
        "step_times": [b - a for a, b in zip(times, times[1:])], "first_loss": first["loss"], "setup_rss": setup.get("rss"),
        "cpu_times": [b - a for a, b in zip(cpu, cpu[1:])],
        "first_grad_norm": next((h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h), None),
        "trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
    })  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Check child: nanoalign's functions on TRL's first batch, from the initial weights


def child_check(spec: dict) -> None:
    import torch

    from nanoalign.model import Policy, load_processor, logps_chunk_size

    torch.set_num_threads(spec["threads"])
    algo = spec["algo"]
    cfg = nanoalign_config(spec, "unused", 1)
    policy = Policy(load_hf_model(spec["model"]), logps_chunk_size(cfg.logps_chunk_size, "cpu"))  # initial weights, trainable
    processor = load_processor(spec["model"])
    batch = torch.load(spec["batch_file"], weights_only=False)
    if algo in ("sft", "dpo", "mpo"):
        mm = {k: v for k, v in batch.items() if k in ("pixel_values", "image_grid_thw", "mm_token_type_ids")}
        # TRL's label (sft) / completion_mask (dpo) at token t marks log p(token t | < t) as counted.
        mask = (batch["labels"] != -100).float() if algo == "sft" else batch["completion_mask"].float()
        result = loss_and_grad_norm(policy, lambda: offline_loss(algo, policy(batch["input_ids"], batch["attention_mask"], **mm)[0], mask, cfg), "on_trl_batch")
        result.update(own_batch_losses(algo, policy, processor, cfg, spec["image_size"]))
    else:
        result = rl_check(batch, policy, processor, cfg, spec)
    emit(result)


def loss_and_grad_norm(policy, compute, name: str) -> dict:
    """{name: loss, name_grad_norm: total gradient norm} of one backward from fresh gradients."""
    import torch

    policy.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    params = [p for p in policy.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
    policy.zero_grad(set_to_none=True)
    return {name: float(loss.detach()), f"{name}_grad_norm": float(grad_norm)}


def offline_loss(algo: str, logps, mask, cfg):
    """nanoalign's SFT / DPO / MPO loss of one whole step (one micro-batch, one rank) from (B, T) log-probs."""
    from nanoalign.mpo import mpo_loss
    from nanoalign.sft import sft_loss

    if algo == "sft":
        return sft_loss(logps, mask, mask.sum())[0]
    sums = (logps * mask).sum(1)
    chosen, rejected = sums.chunk(2)
    chosen_mask = mask.chunk(2)[0]
    chosen_nll = -(logps.chunk(2)[0] * chosen_mask).sum() / chosen_mask.sum()
    lengths = mask.sum(1).chunk(2)
    # The frozen reference equals the policy at step 1: its sums are the policy's values, detached.
    loss, _ = mpo_loss(chosen, rejected, chosen.detach(), rejected.detach(), chosen_nll, cfg.beta, cfg.loss_types,
                       cfg.loss_weights, chosen_lengths=lengths[0], rejected_lengths=lengths[1])  # fmt: skip
    return loss


def own_batch_losses(algo, policy, processor, cfg, image_size: int) -> dict:
    """nanoalign's own rows for the first step's samples: its mask, and TRL's mask convention."""
    from nanoalign.batch import encode_conversations
    from nanoalign.data import prepare_sample

    eos = policy.hf.generation_config.eos_token_id
    stop_ids = {processor.tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
    raw = first_samples(algo, cfg.batch_size, image_size)
    samples = [prepare_sample(r, FORMATS[algo], f"sample {i}") for i, r in enumerate(raw)]
    if algo == "sft":
        convs, images, last_only = [s["messages"] for s in samples], [s["images"] for s in samples], False
    else:
        convs = [s["prompt"] + s["chosen"] for s in samples] + [s["prompt"] + s["rejected"] for s in samples]
        images, last_only = [s["images"] for s in samples] * 2, True
    batch = encode_conversations(processor, convs, images, [str(i) for i in range(len(convs))],
                                 max_length=cfg.max_length, stop_ids=stop_ids, last_turn_only=last_only)  # fmt: skip
    # TRL's convention: every token of the completion text counts, including what the chat template
    # puts after the stop token (Qwen: "\n" after <|im_end|>): the real tokens after the first counted
    # position that nanoalign's mask leaves out.
    extra = (batch.mask.cumsum(1) > 0) & batch.attention_mask.bool() & (batch.mask == 0)
    trl_mask = batch.mask + extra.float()
    result = {}
    for name, mask in (("own_batch", batch.mask), ("own_batch_trl_mask", trl_mask)):
        result.update(loss_and_grad_norm(policy, lambda: offline_loss(algo, policy(**batch.model_inputs())[0], mask, cfg), name))
    result["extra_tokens_per_row"] = float(extra.sum()) / batch.input_ids.shape[0]
    result["extra_token_strings"] = sorted({processor.tokenizer.decode([int(t)]) for t in batch.input_ids[extra]})
    return result


def rl_check(batch, policy, processor, cfg, spec) -> dict:
    """nanoalign's grpo_loss on TRL's first generation batch, and its advantages on TRL's rewards."""
    import torch

    from nanoalign.grpo import group_advantages, grpo_loss
    from nanoalign.rewards import load_reward_funcs, score_completions

    prompt_ids, completion_ids = batch["prompt_ids"], batch["completion_ids"]
    input_ids = torch.cat([prompt_ids, completion_ids], 1)  # TRL's rows: left-padded prompt + completion
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    mask = torch.cat([torch.zeros_like(batch["prompt_mask"]), batch["completion_mask"]], 1).float()
    mm = {k: batch[k] for k in ("pixel_values", "image_grid_thw", "mm_token_type_ids") if batch.get(k) is not None}

    def compute():
        logps, _ = policy(input_ids, attention_mask, temperature=cfg.temperature, **mm)
        loss, _ = grpo_loss(
            logps, logps.detach(), None, batch["advantages"], mask, loss_type=cfg.loss_type, epsilon=cfg.epsilon,
            epsilon_high=cfg.epsilon_high, delta=cfg.delta, beta=cfg.beta,
            importance_sampling_level=cfg.importance_sampling_level,
            normaliser=trl_normaliser(cfg.loss_type, mask, cfg.max_completion_length, float(batch["num_items_in_batch"])),
        )  # fmt: skip
        return loss

    result = loss_and_grad_norm(policy, compute, "on_trl_batch")
    # The rewards of TRL's completions with the same functions, then nanoalign's advantages. TRL
    # shuffles the rows of a generation batch before cutting it into micro-batches, so each row's
    # prompt is found again by its image: the hash of its pixel_values rows.
    ids = [row[m.bool()].tolist() for row, m in zip(completion_ids, batch["completion_mask"])]
    texts = processor.tokenizer.batch_decode(ids, skip_special_tokens=True)
    raw = first_samples(spec["algo"], cfg.batch_size // cfg.num_generations, spec["image_size"])
    keys = [hash(processor.image_processor(images=r["images"], return_tensors="pt")["pixel_values"].numpy().tobytes()) for r in raw]
    patches_per_row = [int(t.sum()) for t in batch["image_grid_thw"].prod(-1).split(list(batch["num_images"]))]
    row_keys = [hash(p.numpy().tobytes()) for p in batch["pixel_values"].split(patches_per_row)]
    sample_of_row = [keys.index(k) for k in row_keys]  # ValueError here = a row matching no prompt
    order = sorted(range(len(texts)), key=lambda i: sample_of_row[i])  # prompt-major, as nanoalign lays groups out
    solutions = [raw[sample_of_row[i]]["solution"] for i in order]
    funcs = load_reward_funcs(list(cfg.reward_funcs))
    rewards, _ = score_completions(funcs, list(cfg.reward_weights), [texts[i] for i in order], {"solution": solutions})
    grouped = group_advantages(rewards, cfg.num_generations, cfg.scale_rewards)
    advantages = torch.empty_like(grouped)
    advantages[torch.tensor(order)] = grouped  # back to TRL's row order
    result["advantages_max_abs_diff"] = float((advantages - batch["advantages"].float()).abs().max())
    result["advantages_max_abs"] = float(batch["advantages"].abs().max())
    return result


# ---------------------------------------------------------------------------------------------------
# Parent


def find_trl_python(flag: str | None) -> str | None:
    candidates = [flag] if flag else [sys.executable, "/work/venv-trl/bin/python"]
    for python in candidates:
        if python and Path(python).exists():
            ok = subprocess.run([python, "-c", "import trl"], capture_output=True).returncode == 0
            if ok:
                return python
    return None


def compare(algo: str, model: str, args, trl_python: str | None) -> dict:
    """--rounds alternating runs of both stacks (so a burst of load from other jobs hits both), then
    one check run on TRL's first batch."""
    steps = args.warmup + args.steps
    spec = {"algo": algo, "model": model, "steps": steps, "threads": args.threads, "batch_size": args.batch_size,
            "image_size": args.image_size, "completion_tokens": args.completion_tokens, "num_generations": args.num_generations,
            "nproc": args.nproc}  # fmt: skip
    row = {"algo": algo}
    kept = slice(args.warmup, None)
    runs = {"na": [], "trl": []}
    with tempfile.TemporaryDirectory() as tmp:
        batch_file = str(Path(tmp) / "first_batch.pt")
        for i in range(args.rounds):
            out_dir = str(Path(tmp) / f"nanoalign-{i}")
            ours = run_child(__file__, {**spec, "side": "nanoalign", "out_dir": out_dir}, verbose=args.verbose, nproc=args.nproc)
            if "error" in ours:
                print(f"{algo} nanoalign FAILED:\n{ours['error']}", flush=True)
                row["error"] = ours["error"]
                return row
            runs["na"].append(ours)
            if trl_python is None:
                continue
            theirs = run_child(__file__, {**spec, "side": "trl", "batch_file": batch_file}, python=trl_python, verbose=args.verbose,
                               nproc=args.nproc)  # fmt: skip
            if "error" in theirs:
                print(f"{algo} TRL FAILED:\n{theirs['error']}", flush=True)
                row["trl_error"] = theirs["error"]
                trl_python = None
                continue
            runs["trl"].append(theirs)
        for side, results in runs.items():
            if not results:
                continue
            row.update({
                f"{side}_step_s": median([t for r in results for t in r["step_times"][kept]]),
                f"{side}_cpu_s": median([t for r in results for t in r["cpu_times"][kept]]),
                f"{side}_peak_mib": median([mib(r["peak_mem_bytes"]) for r in results]),
                f"{side}_peak_mib_per_rank": [[mib(b) for b in r.get("peak_mem_bytes_per_rank", [r["peak_mem_bytes"]])] for r in results],
                f"{side}_setup_mib": median([mib(r["setup_rss"]) for r in results]),
                # the last run's: the check below uses the first batch the last TRL run saved
                f"{side}_first_loss": results[-1]["first_loss"], f"{side}_first_grad_norm": results[-1]["first_grad_norm"],
                f"{side}_step_times": [r["step_times"] for r in results], f"{side}_cpu_times": [r["cpu_times"] for r in results],
                f"{side}_prepare_times": [r.get("prepare_times") for r in results],
            })  # fmt: skip
        if not runs["trl"]:
            return row
        row["trl_version"] = runs["trl"][0]["trl"]
        row["time_ratio"] = row["na_step_s"] / row["trl_step_s"]
        row["cpu_ratio"] = row["na_cpu_s"] / row["trl_cpu_s"]
        row["mem_ratio"] = row["na_peak_mib"] / row["trl_peak_mib"]
        if args.nproc > 1:  # the first-step check is a one-process comparison (module docstring)
            return row
        check = run_child(__file__, {**spec, "side": "check", "batch_file": batch_file}, verbose=args.verbose)
    if "error" in check:
        print(f"{algo} check FAILED:\n{check['error']}", flush=True)
        return row
    row["check"] = check
    row["na_on_trl_batch"] = check["on_trl_batch"]
    row["diff_on_trl_batch"] = abs(check["on_trl_batch"] - row["trl_first_loss"])
    row["na_on_trl_batch_grad_norm"] = check["on_trl_batch_grad_norm"]
    if row.get("trl_first_grad_norm"):  # 0 when every advantage of TRL's first batch is 0
        row["grad_norm_rel_diff"] = abs(check["on_trl_batch_grad_norm"] / row["trl_first_grad_norm"] - 1)
    if "own_batch_trl_mask" in check:
        row["na_own_trl_mask"] = check["own_batch_trl_mask"]
        row["diff_own_trl_mask"] = abs(check["own_batch_trl_mask"] - row["trl_first_loss"])
        row["diff_own_vs_logged"] = abs(check["own_batch"] - row.get("na_first_loss", float("nan")))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_flags(parser, ALGOS)  # --model, --algos, --steps, --warmup, --batch-size, --threads
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each stack (medians pool their steps)")
    parser.add_argument("--trl-python", default=None, help="interpreter with trl installed")
    parser.add_argument("--out", default=None, help="JSON output (default bench/results/vs_trl-<model>.json)")
    parser.add_argument("--image-size", type=int, default=112, help="px a side of each sample's image (448 = 256 tokens for Qwen2.5-VL)")
    parser.add_argument("--completion-tokens", type=int, default=None, help="RL: max_completion_length (default: the preset's)")
    parser.add_argument("--num-generations", type=int, default=None, help="RL: completions per prompt (default: the preset's)")
    parser.add_argument("--nproc", type=int, default=1, help="ranks per stack (torchrun): nanoalign FSDP2, TRL what accelerate does on CPU (DDP)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    model = model_from_args(args)
    trl_python = find_trl_python(args.trl_python)
    if trl_python is None:
        print("TRL not found (pip install trl, or pass --trl-python): showing nanoalign only", flush=True)
    params = num_params(model)
    print(f"model {model}: {params['total'] / 1e6:.1f}M parameters; TRL from {trl_python}", flush=True)
    rows = []
    for algo in args.algos:
        rows.append(compare(algo, model, args, trl_python))
        print(algo, json.dumps({k: v for k, v in rows[-1].items() if not k.endswith("step_times")}, default=str), flush=True)
    name = args.model if args.model in ("tiny", "small", "real", "real3b", "real7b") else Path(model).name
    print_table(rows, [
        ("algo", "algo", "s"), ("nanoalign step (s)", "na_step_s", ".3f"), ("TRL step (s)", "trl_step_s", ".3f"),
        ("ratio", "time_ratio", ".2f"), ("nanoalign CPU s/step", "na_cpu_s", ".3f"), ("TRL CPU s/step", "trl_cpu_s", ".3f"),
        ("CPU ratio", "cpu_ratio", ".2f"), ("nanoalign peak (MiB)", "na_peak_mib", ".0f"),
        ("TRL peak (MiB)", "trl_peak_mib", ".0f"), ("mem ratio", "mem_ratio", ".2f"),
        ("nanoalign setup (MiB)", "na_setup_mib", ".0f"), ("TRL setup (MiB)", "trl_setup_mib", ".0f"),
    ], title=f"nanoalign vs TRL: {name} ({params['total'] / 1e6:.1f}M params), {args.threads} threads, median of {args.rounds} x {args.steps} steps after {args.warmup}")  # fmt: skip
    print_table(rows, [
        ("algo", "algo", "s"), ("nanoalign loss (own rows)", "na_first_loss", ".7f"), ("TRL loss", "trl_first_loss", ".7f"),
        ("nanoalign on TRL batch", "na_on_trl_batch", ".7f"), ("|diff|", "diff_on_trl_batch", ".1e"),
        ("nanoalign own rows, TRL mask", "na_own_trl_mask", ".7f"), ("|diff|", "diff_own_trl_mask", ".1e"),
        ("TRL grad norm", "trl_first_grad_norm", ".6g"), ("nanoalign grad norm on TRL batch", "na_on_trl_batch_grad_norm", ".6g"),
        ("rel. diff", "grad_norm_rel_diff", ".1e"),
    ], title="first-step loss and gradient norm (same initial weights)")  # fmt: skip
    out = args.out or Path(__file__).parent / "results" / f"vs_trl-{name}.json"
    write_json(out, {"model": model, "params": params, "machine": machine_info(), "trl_python": trl_python,
                     "args": vars(args), "rows": rows})  # fmt: skip


if __name__ == "__main__":
    spec = child_spec(sys.argv)
    if spec is None:
        main()
    else:
        {"nanoalign": child_nanoalign, "trl": child_trl, "check": child_check}[spec["side"]](spec)
