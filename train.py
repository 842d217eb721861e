"""nanoalign's training loop: one file, every algorithm, FSDP2 in plain sight.

    torchrun --nproc_per_node 2 train.py --algo sft          # built-in tiny VLM + synthetic shapes task
    torchrun --nproc_per_node 2 train.py --algo gspo         # RL from the SFT-warmed tiny model
    python train.py --algo dpo --model DIR --dataset DIR     # one process works too; --help: every flag

The loop reads top to bottom: set up processes, models, optimizer and data; then each optimizer step
asks the algorithm module for micro-batches (`prepare`: SFT/DPO the step's samples, RL a generation
batch) and each one's loss, then backward, clip, step, log, evaluate, checkpoint. It never branches on
the algorithm's name; each algorithm is one module with the same names:

    DATA_FORMAT                  "sft" | "preference" | "rl": which columns its samples carry
    needs_reference(cfg)         whether a frozen reference model is loaded
    samples_per_round(cfg)       samples each rank draws per prepare() call
    prepare(samples, run)        -> (micro_batches, metrics); may span several optimizer steps (RL)
    loss(micro_batch, run)       -> (loss to backward, metrics)
    evaluate(samples, run)       -> held-out metrics (optional; every run gets train.py's accuracy eval)

One normalisation rule for every loss: FSDP2 sums gradients over ranks (model.shard_policy), the loop
backwards each micro-batch's loss as it is, and each loss is a sum over its micro-batch divided by a
normaliser `prepare` computed: a count of the whole optimizer step, all micro-batches and ranks (tokens
for SFT and dapo, pairs (and chosen tokens for MPO's sft term) for DPO, MPO and online DPO, sequences for
grpo and RLOO, x max_completion_length for dr_grpo). So the step's gradient is that of one big batch
however it is split; bnpo alone keeps TRL's token mean per micro-batch (tokens x micro-batches x ranks).

Non-goals: no Trainer class, no callbacks, no config nesting, no tensor/pipeline parallelism.
"""

import dataclasses
import difflib
import json
import math
import os
import random
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import tyro
from tqdm import tqdm
from transformers.utils import logging as hf_logging

from nanoalign import grpo, lora, mpo, online_dpo, rloo, sft
from nanoalign.batch import check_prompt_fits
from nanoalign.checkpoint import (
    check_resumable, latest_checkpoint, load_checkpoint, resume_state, save_before_stopping, save_checkpoint, truncate_metrics,
)
from nanoalign.config import PRESETS, Config, check_config
from nanoalign.data import accuracy_prompts, fetch_samples, load_split, stream_indices
from nanoalign.loading import export_hf
from nanoalign.metrics import COUNTS, MetricsLog, Tracker, logged, plot_metrics, sample_table
from nanoalign.model import build_policy, load_processor, stop_and_pad_ids
from nanoalign.preference import reference_table
from nanoalign.rewards import accuracy, load_reward_funcs
from nanoalign.rollout import InProcess
from nanoalign.runtime import (
    Run, agree_on_failure, all_reduce_sum, device_mesh, end_distributed, init_distributed, mean_over_ranks, on_every_rank,
)
from nanoalign.tiny import BUILDERS, ensure_tiny, tiny_sft_dir, tiny_sft_stages
from nanoalign.vllm_server import VLLMServer

ALGOS = {"sft": sft, "dpo": mpo, "mpo": mpo, "grpo": grpo, "gspo": grpo, "rloo": rloo, "online_dpo": online_dpo}


def parse_config(argv: list[str]) -> Config:
    """`--algo` picks the preset (nanoalign/config.py); every other flag overrides the preset's value."""
    algo = "sft"
    for i, arg in enumerate(argv):
        if arg == "--algo" and i + 1 < len(argv):
            algo = argv[i + 1]
        elif arg.startswith("--algo="):
            algo = arg.split("=", 1)[1]
    if algo not in PRESETS:
        raise SystemExit(f"--algo {algo!r} is not one of {sorted(PRESETS)}")
    return tyro.cli(Config, default=PRESETS[algo](), args=argv)


def resolve_model(cfg: Config, rank: int, device) -> str:
    """--model as a local directory: a built-in is built once (by one rank) and cached, a hub id downloaded once
    (by each node's first process); anything else fails now, clearly."""
    if cfg.model == "tiny-sft":
        if tiny_sft_stages():
            raise ValueError("--model tiny-sft is not built yet: `python -m nanoalign.tiny build tiny-sft` builds it (two SFT "
                             "runs of this loop, about 3 minutes, once), as train.py's command line does on first use")  # fmt: skip
        return tiny_sft_dir()
    if cfg.model in BUILDERS:
        if rank == 0:  # on a shared filesystem one rank builds; the others wait at the barrier
            ensure_tiny(cfg.model)
        dist.barrier()
        return str(ensure_tiny(cfg.model))
    path = Path(cfg.model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"--model {cfg.model}: the directory has no config.json; point it at a saved checkpoint")
        return str(path)
    if path.exists() or cfg.model.count("/") != 1 or cfg.model.startswith((".", "/", "~")):
        builtins = ["tiny-sft", *BUILDERS]
        close = difflib.get_close_matches(cfg.model, builtins, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"--model {cfg.model!r} is not a built-in model ({', '.join(builtins)}), not a local checkpoint "
                         f"directory, and not a hub id of the form org/name.{hint}")  # fmt: skip
    return download_from_hub(cfg.model, device)


def download_from_hub(repo_id: str, device) -> str:
    """A hub model's files as a local directory, fetched by each node's first process (the others read the
    cache); HF_HUB_OFFLINE=1 reads only the local cache."""
    from huggingface_hub import snapshot_download

    files = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
    error = None
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        try:
            snapshot_download(repo_id, allow_patterns=files)
        except Exception as err:  # no network, no such repo, no access: all end here, with the id
            error = ValueError(f"--model {repo_id}: could not get it from the Hugging Face hub ({type(err).__name__}: {err}). "
                               "Offline, download it elsewhere and pass its local directory, or set HF_HUB_OFFLINE=1 to use "
                               "the local hub cache.")  # fmt: skip
    agree_on_failure(error, device)
    return snapshot_download(repo_id, allow_patterns=files, local_files_only=True)


def lr_factor(step: int, cfg: Config) -> float:
    """Linear warm-up to lr, then cosine decay to min_lr_ratio * lr at max_steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def eval_samples(dataset, fmt: str, cfg: Config, run: Run, check=None) -> tuple[list[dict], float]:
    """This rank's equal share of the first num_eval_samples held-out samples (every rank runs as many
    forwards), and how many bad ones all ranks skipped; a bad sample stops every rank, with its name."""
    per_rank = min(cfg.num_eval_samples, len(dataset)) // run.world_size
    if per_rank == 0:  # the same on every rank: all of them stop here
        raise ValueError(f"--num-eval-samples {cfg.num_eval_samples} (split {cfg.eval_split!r} has {len(dataset)} rows) leaves "
                         f"no held-out sample for some of the {run.world_size} rank(s), and each needs one: set it to at least "
                         f"{run.world_size}, or pass --eval-split '' to train without evaluation")  # fmt: skip
    indices = list(range(run.rank * per_rank, (run.rank + 1) * per_rank))
    fetch = lambda: fetch_samples(dataset, indices, fmt, cfg.eval_split, cfg.skip_bad_samples, check)  # noqa: E731
    samples, num_skipped = on_every_rank(fetch, run.device)
    return samples, all_reduce_sum([num_skipped], run.device)[0]


def evaluate(algo, run: Run, algo_eval: list[dict], accuracy_eval: list[dict], model=None) -> dict:
    """Held-out metrics: the algorithm's own (e.g. eval loss) and greedy-decoding accuracy."""
    own_eval = getattr(algo, "evaluate", None)  # optional: the RL methods have no held-out metric of their own
    metrics = own_eval(algo_eval, run) if own_eval and algo_eval else {}
    if accuracy_eval:
        *counts, answers = accuracy(model or run.policy, run.processor, accuracy_eval, batch_size=max(run.cfg.batch_size, 16),
                                    max_new_tokens=run.cfg.max_completion_length, stop_ids=run.stop_ids, pad_id=run.pad_id,
                                    device=run.device, sampler=run.cfg.sampler)  # fmt: skip
        correct, total, num_tokens = all_reduce_sum(counts, run.device)
        run.tables["eval/samples"] = sample_table(accuracy_eval, answer=[a for a, _ in answers],
                                                  gold=[s["solution"] for s in accuracy_eval], right=[r for _, r in answers])  # fmt: skip
        metrics["eval/accuracy"] = correct / total
        metrics["eval/completion_length"] = num_tokens / total  # mean tokens of the greedy answers
    return metrics


def train(cfg: Config) -> dict:
    """Run training as configured. Returns the last step's metrics (with the final eval)."""
    check_config(cfg)  # every cross-field rule, before anything is loaded
    hf_logging.disable_progress_bar()  # per-file loading bars would bury the step lines
    # ---------------------------------------------------------------- setup: processes, model, data
    rank, world_size, device = init_distributed()
    model_dir = resolve_model(cfg, rank, device)
    random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed + rank)  # different rollouts on different ranks
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    algo = ALGOS[cfg.algo]
    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
    mesh = device_mesh(world_size, device)

    processor = load_processor(model_dir)
    policy = build_policy(model_dir, cfg, mesh, bf16, trainable=True)
    ref_policy = None
    if algo.needs_reference(cfg):  # with LoRA the base model is the policy with its adapters off: no second copy
        ref_policy = lora.without_adapters(policy) if cfg.lora_rank else build_policy(model_dir, cfg, mesh, bf16, trainable=False)
    stop_ids, pad_id = stop_and_pad_ids(processor, policy.hf)
    if cfg.vllm_mode == "server":  # a vLLM server whose weights we keep in sync
        rollouts = VLLMServer(cfg, policy, processor, stop_ids=stop_ids, rank=rank, device=device,
                              dtype=torch.bfloat16 if bf16 else torch.float32)  # fmt: skip
    elif cfg.vllm_mode == "colocate":  # a vLLM engine in this process (vllm is optional: imported only here)
        from nanoalign.vllm_colocate import VLLMColocate

        rollouts = VLLMColocate(cfg, policy, processor, model_dir=model_dir, stop_ids=stop_ids, rank=rank,
                                world_size=world_size, device=device, dtype="bfloat16" if bf16 else "float32")  # fmt: skip
    else:  # the policy being trained samples
        rollouts = InProcess(cfg, policy, processor, stop_ids=stop_ids, pad_id=pad_id, device=device)

    params = [p for p in policy.parameters() if p.requires_grad]
    # fused: one kernel; else torch loops over parameters in Python on CPU (13% of a small step, BENCHMARKS.md 5).
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))

    train_data = load_split(cfg.dataset, cfg.train_split, algo.DATA_FORMAT, cfg.num_shapes_samples, cfg.columns, cfg.shapes_overcount)
    eval_data = None
    if cfg.eval_split:
        eval_data = load_split(cfg.dataset, cfg.eval_split, algo.DATA_FORMAT, cfg.num_eval_samples, cfg.columns, held_out=True)
        if eval_data is None and rank == 0:
            print(f"no evaluation: --dataset {cfg.dataset} has no held-out split {cfg.eval_split!r} (a single file holds "
                  "training rows only; a directory needs e.g. eval.jsonl or test.jsonl beside train.jsonl). Pass "
                  "--eval-split '' to say so, or the name of its held-out split.", flush=True)  # fmt: skip
    # Samples too long for --max-length are found when fetched: always for RL (before anything is generated
    # for them), with --skip-bad-samples for the others (the fetch replaces them; else the batch builder stops).
    check_sample = None
    if algo.DATA_FORMAT == "rl" or cfg.skip_bad_samples:
        check_sample = partial(check_prompt_fits, processor, cfg.max_length, algo.DATA_FORMAT)
    reward_funcs = load_reward_funcs(list(cfg.reward_funcs)) if algo.DATA_FORMAT == "rl" else []
    run = Run(cfg, processor, policy, ref_policy, rank, world_size, device, stop_ids, pad_id, train_data=train_data,
              eval_data=eval_data, reward_funcs=reward_funcs, rollouts=rollouts, check_sample=check_sample)  # fmt: skip
    algo_eval, accuracy_eval, eval_skips = [], [], {}
    if eval_data is not None:
        algo_eval, num_eval_skipped = eval_samples(eval_data, algo.DATA_FORMAT, cfg, run, check_sample)
        eval_skips = {"eval/skipped_samples": num_eval_skipped}  # logged with every evaluation
        accuracy_eval = accuracy_prompts(algo_eval)  # the held-out samples with a gold `solution`, if any

    # ---------------------------------------------------------------- resume
    step, num_drawn = 0, 0  # optimizer steps done; samples drawn from the data stream (all ranks)
    if cfg.resume and (ckpt := latest_checkpoint(out_dir)) is not None:
        counters = load_checkpoint(ckpt, policy, optimizer, scheduler, rank)
        check_resumable(counters.get("config"), cfg, ckpt)
        step, num_drawn = counters["step"], counters["num_drawn"]
        run.step = step
        if rank == 0:
            truncate_metrics(out_dir / "metrics.jsonl", step)
            print(f"resumed from {ckpt} (step {step})", flush=True)
    elif rank == 0:
        (out_dir / "metrics.jsonl").unlink(missing_ok=True)
    if rank == 0:
        (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    tracker = Tracker(cfg, out_dir, resumed=step > 0) if cfg.report_to != "none" and rank == 0 else None
    log = MetricsLog(out_dir, rank, cfg.log_every, tracker, run.tables)
    if cfg.precompute_ref_logps:  # the reference's scores, computed once, replace a second model
        run.ref_logps_table.update(reference_table(run, out_dir / "ref_logps.pt", resumed=step > 0))
    metrics: dict = {}  # the last logged step's (step 0's evaluation until a step runs: --max-steps 0 only evaluates)
    if step == 0 and eval_data is not None:
        metrics = {**evaluate(algo, run, algo_eval, accuracy_eval), **eval_skips}
        log.log(0, metrics, force_print=True)

    # ---------------------------------------------------------------- the loop
    per_rank = algo.samples_per_round(cfg)
    buffer: list = []  # micro-batches prepared but not yet trained on (RL generation batches span steps)
    # Periodic checkpoints: the first step at or after each multiple of save_every that ends a round (no rollout state).
    next_save = (step // cfg.save_every + 1) * cfg.save_every if cfg.save_every else None
    progress = tqdm(total=cfg.max_steps, initial=step, desc=cfg.algo, disable=rank != 0, dynamic_ncols=True)
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        round_metrics = {}
        round_started = not buffer  # this step starts a new round (prepare runs; nothing is pending)
        drawn_before_round = num_drawn
        if round_started:
            try:
                round_metrics.update(run.rollouts.sync(step))  # the backend samples from this step's weights
                # Every rank reads its own slice of the same seeded stream (data.stream_indices).
                start = num_drawn + rank * per_rank
                indices = stream_indices(start, per_rank, len(train_data), cfg.seed)
                fetch = lambda: fetch_samples(train_data, indices, algo.DATA_FORMAT, cfg.train_split, cfg.skip_bad_samples, run.check_sample)
                samples, num_skipped = on_every_rank(fetch, device)  # a bad sample stops every rank, at a step boundary
                num_drawn += per_rank * world_size
                buffer, prepared_metrics = algo.prepare(samples, run)
                # prepare_time: seconds of the round before training (sync, data, RL rollouts + rewards + scoring)
                round_metrics.update(prepared_metrics, skipped_samples=num_skipped, prepare_time=time.perf_counter() - t0)
            except Exception as err:  # a bad sample, a raising reward function, a dead vLLM server, ...
                save_before_stopping(err, out_dir, resume_state(step, drawn_before_round, cfg), policy, optimizer, scheduler, rank)
                raise
        # A token budget groups one step's samples into as many micro-batches as it needs (agreed by the ranks).
        per_step = len(buffer) if cfg.max_tokens_per_micro_batch else cfg.grad_accum_steps
        micro_batches, buffer = buffer[:per_step], buffer[per_step:]

        micro_values: dict[str, list[float]] = {}
        loss_sum = 0.0
        for micro in micro_batches:
            loss, micro_metrics = algo.loss(micro, run)
            loss.backward()
            loss_sum += float(loss.detach())
            for key, value in micro_metrics.items():
                micro_values.setdefault(key, []).append(float(value))
        # mean over the micro-batches that measured it (NaN: nothing to measure, e.g. no rankable pair)
        step_metrics = {k: float(torch.tensor(v, dtype=torch.float64).nanmean()) for k, v in micro_values.items()}
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        if not math.isfinite(grad_norm):  # same value on every rank: the norm is all-reduced
            optimizer.zero_grad(set_to_none=True)
            error = FloatingPointError(f"step {step + 1}: the loss or gradients are not finite (grad norm {grad_norm}); no update was "
                                       "applied. Lower --lr or --max-grad-norm, or check the batch's samples: "
                                       + ", ".join(s for m in micro_batches for s in getattr(getattr(m, "batch", None), "sample_ids", []))[:500])  # fmt: skip
            error.raised_on_every_rank = True
            if round_started:  # else the rest of a generation batch is pending: the last checkpoint stands
                save_before_stopping(error, out_dir, resume_state(step, drawn_before_round, cfg), policy, optimizer, scheduler, rank)
            raise error
        lr = scheduler.get_last_lr()[0]  # the rate this step uses (scheduler.step() moves to the next)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        run.step = step
        progress.update(1)

        # ------------------------------------------------------------ log, evaluate, checkpoint
        # Each rank's loss is its share of the step's (the normalisation rule above): the step's is world_size x their mean.
        metrics = mean_over_ranks({**round_metrics, **step_metrics, "loss": loss_sum * world_size}, device, COUNTS)
        metrics.update(grad_norm=grad_norm, lr=lr, step_time=time.perf_counter() - t0)
        if eval_data is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps):
            metrics.update(evaluate(algo, run, algo_eval, accuracy_eval), **eval_skips)
        log.log(step, metrics, force_print=step == cfg.max_steps)
        # The last step always saves (a generation batch it leaves unfinished is dropped).
        if (not buffer and next_save is not None and step >= next_save) or step == cfg.max_steps:
            save_checkpoint(out_dir, step, policy, optimizer, scheduler, resume_state(step, num_drawn, cfg), rank)
            next_save = (step // cfg.save_every + 1) * cfg.save_every if cfg.save_every else None
    progress.close()

    # ---------------------------------------------------------------- export, final check, plot
    if cfg.export:
        if cfg.lora_rank and cfg.lora_export != "merged":  # PEFT's format, for peft.PeftModel.from_pretrained
            lora.save_adapter(policy.hf, out_dir / "adapter", rank, model_dir)
        merged = not cfg.lora_rank or cfg.lora_export != "adapter"
        if merged:  # a plain HF checkpoint (LoRA: adapters merged into their layers)
            export_hf(policy, processor, out_dir / "final", rank)
        dist.barrier()
        checked = ""
        if accuracy_eval and merged:  # reload what was written (sharded, like the reference) and check its answers
            exported = build_policy(str(out_dir / "final"), cfg, mesh, bf16, trainable=False)
            final = evaluate(algo, run, [], accuracy_eval, model=exported)
            del exported
            metrics["final/exported_accuracy"] = final["eval/accuracy"]
            log.amend_last({"final/exported_accuracy": final["eval/accuracy"]})
            checked = f": eval accuracy {final['eval/accuracy']:.3f}"
        if rank == 0:
            what = f"model ({out_dir / 'final'})" if merged else f"adapter ({out_dir / 'adapter'})"
            print(f"exported {what}{checked}", flush=True)
    if rank == 0:
        if accuracies := logged(out_dir, "eval/accuracy"):  # from the file: a run resumed at its last step evaluates nothing
            print(f"eval accuracy: start {accuracies[0]:.3f} -> end {accuracies[-1]:.3f}")
        plotted = plot_metrics(out_dir / "metrics.jsonl", out_dir / "curves.png")
        print(f"plots of {', '.join(plotted)} -> {out_dir / 'curves.png'}", flush=True)
    log.close()
    run.rollouts.close()  # last: a colocated vLLM engine's shutdown also ends the process group
    return metrics


def main(argv: list[str]) -> None:
    """The command line: the built-in warm start first when a run asks for it, then the run."""
    cfg = parse_config(argv)
    check_config(cfg)  # a mistake in the flags shows now, not after the warm start's minutes
    if cfg.model == "tiny-sft":  # two SFT runs of this same loop (nanoalign/tiny.py), cached: first use only
        for stage in tiny_sft_stages():
            if int(os.environ.get("RANK", 0)) == 0:
                print(f"building the SFT-warmed tiny model: {stage.out_dir} (first use only)", flush=True)
            train(stage)
    train(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
    if dist.is_initialized():  # a colocated vLLM engine's shutdown (at the end of train()) already ended it
        end_distributed()
