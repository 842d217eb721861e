"""Sharded checkpoints with exact resume (torch.distributed.checkpoint), and the guards around resuming.

out_dir/checkpoints/step_NNNNNN holds the model and optimizer state, sharded (each rank writes and reads
back its own shards, never gathering the full model), and per rank the LR scheduler, the loop's counters
(step, samples drawn) and the RNG states (so a resume needs the world size that saved it). The data order
is a pure function of (seed, samples drawn) (data.stream_indices), so that is all an exact resume needs.

`latest` is written last, atomically, after every rank has finished: a run killed while saving resumes
from the previous checkpoint. Nothing is written into an existing directory: a second save of a step goes
to step_NNNNNN.1, .2, ..., or is skipped when `latest` holds exactly that state. The two newest are kept.
"""

import dataclasses
import json
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from nanoalign.config import Config

KEEP = 2


def frozen_names(policy) -> set[str]:
    """Frozen weights (a LoRA run's whole base, a --freeze-vision tower) are the model checkpoint's own and
    never change: a resume loads them from there, so checkpoints hold only what trains (LoRA: megabytes)."""
    return {name for name, p in policy.named_parameters(remove_duplicate=False) if not p.requires_grad}


def tied_aliases(policy) -> set[str]:
    """The second names of tied weights (lm_head.weight when it is the embedding): get_state_dict lists
    a tied tensor under each name and DCP would write it twice (+1.2 GiB for Qwen2.5-VL-3B's embedding)."""
    return {name for name, _ in policy.named_parameters(remove_duplicate=False)} - {name for name, _ in policy.named_parameters()}


def trained_state(policy, optimizer) -> tuple[dict, dict]:
    """get_state_dict without the frozen weights, under any of their names (its ignore_frozen_params
    keeps a tied lm_head.weight, the whole embedding, when embed_tokens is frozen), and each tied weight once."""
    model_state, optim_state = get_state_dict(policy, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    left_out = frozen_names(policy) | tied_aliases(policy)
    return {k: v for k, v in model_state.items() if k not in left_out}, optim_state


def save_checkpoint(out_dir, step: int, policy, optimizer, scheduler, counters: dict, rank: int) -> Path:
    """Save everything needed to resume after `step` optimizer steps; every rank calls it. counters: the loop's
    state (at least "step" and "num_drawn"), returned by load_checkpoint."""
    root = Path(out_dir) / "checkpoints"
    name = f"step_{step:06d}"
    latest = latest_checkpoint(out_dir)
    if latest is not None and latest.name.split(".")[0] == name:
        saved = torch.load(latest / f"rank{rank}.pt", weights_only=False)["counters"]
        if (saved["step"], saved["num_drawn"]) == (counters["step"], counters["num_drawn"]):
            return latest  # it holds this very state already
    path, revision = root / name, 0
    while path.exists():  # never write into an existing checkpoint: a kill mid-write would ruin it
        revision += 1
        path = root / f"{name}.{revision}"
    dist.barrier()  # every rank has picked the same new name before any rank creates it
    model_state, optim_state = trained_state(policy, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save({"scheduler": scheduler.state_dict(), "counters": counters, "rng": rng}, path / f"rank{rank}.pt")
    dist.barrier()  # every rank's files are complete before `latest` points at them
    if rank == 0:
        tmp = root / "latest.tmp"
        tmp.write_text(path.name)
        tmp.replace(root / "latest")
        # Only checkpoints up to this one: a --no-resume rerun in the same out_dir may find later
        # steps of the abandoned run, and sorting them in would delete the checkpoint just written.
        for old in sorted(p for p in root.glob("step_*") if p.name <= path.name)[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path


def latest_checkpoint(out_dir) -> Path | None:
    pointer = Path(out_dir) / "checkpoints" / "latest"
    return pointer.parent / pointer.read_text().strip() if pointer.exists() else None


def load_checkpoint(path: Path, policy, optimizer, scheduler, rank: int) -> dict:
    """Restore model, optimizer, scheduler and RNG states in place; returns the saved counters. Only with the world
    size that saved it, checked on every rank before any collective, so all of them stop together."""
    saved_ranks, world_size = len(list(path.glob("rank*.pt"))), dist.get_world_size()
    if saved_ranks != world_size:
        raise ValueError(f"{path} was saved by {saved_ranks} rank(s) and this run has {world_size}: resuming would change the "
                         f"global batch (--batch-size x --grad-accum-steps x ranks: x {saved_ranks} -> x {world_size}) and the "
                         f"ranks' sampling RNG states would not be the saved ones, so it would not continue that run. Resume "
                         f"with --nproc_per_node {saved_ranks}, or start over with --no-resume or another --out-dir.")  # fmt: skip
    model_state, optim_state = trained_state(policy, optimizer)
    # get_state_dict gives a fresh optimizer state for every parameter, but AdamW keeps none for a
    # parameter that never had a gradient (e.g. LLaVA's vision post_layernorm, unused when features
    # come from hidden_states), so the checkpoint has none either: ask only for what was saved.
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata  # flattened "optim.state.<fqn>.<key>"
    optim_state["state"] = {
        fqn: s for fqn, s in optim_state["state"].items() if all(f"optim.state.{fqn}.{k}" in saved for k in s)
    }
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=path)
    # strict for what trains: every trained weight must be in the checkpoint (the frozen ones are the model's)
    missing = set(set_model_state_dict(policy, state["model"], options=StateDictOptions(strict=False)).missing_keys)
    missing -= frozen_names(policy) | tied_aliases(policy)  # the model's own, and loaded under the first name
    if missing:
        raise ValueError(f"{path} lacks trained weights of this model (e.g. {sorted(missing)[:3]}): "
                         "it was saved by another model or --lora-* setting; use another --out-dir or --no-resume")  # fmt: skip
    # strict=False only lets those stateless parameters stay without state, as in the run that saved it.
    set_optimizer_state_dict(policy, optimizer, state["optim"], options=StateDictOptions(strict=False))
    extra = torch.load(path / f"rank{rank}.pt", weights_only=False)
    scheduler.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["rng"]["torch"])
    random.setstate(extra["rng"]["python"])
    if "cuda" in extra["rng"]:
        torch.cuda.set_rng_state(extra["rng"]["cuda"])
    return extra["counters"]


# Fields a resumed run may change: its length, what it logs, evaluates, saves and exports, --skip-bad-samples (the
# fix a bad-sample stop suggests) and where rollouts come from (a dead vLLM server: go on in-process). Any other
# change would continue a run under settings it was not trained with.
RESUMABLE_CHANGES = {"max_steps", "log_every", "eval_every", "num_eval_samples", "eval_split", "save_every", "resume",
                     "export", "out_dir", "skip_bad_samples", "vllm_mode", "vllm_url", "vllm_timeout", "vllm_sync_every",
                     "sampler", "vllm_tensor_parallel_size", "vllm_gpu_memory_utilization", "vllm_max_model_len",
                     "vllm_enforce_eager", "vllm_model_impl", "vllm_max_images", "report_to", "tracker_project",
                     "run_name", "lora_export"}  # fmt: skip


def check_resumable(saved: dict | None, cfg: Config, ckpt: Path) -> None:
    """Refuse to resume a checkpoint trained under other settings, naming the fields that differ."""
    if saved is None:  # a checkpoint from before configs were stored with it
        return
    saved, now = (json.loads(json.dumps(c)) for c in (saved, dataclasses.asdict(cfg)))  # tuples -> lists, both
    changed = [f"--{k.replace('_', '-')}: {saved[k]!r} -> {now[k]!r}" for k in now
               if k not in RESUMABLE_CHANGES and k in saved and saved[k] != now[k]]  # fmt: skip
    if changed:
        raise ValueError(f"{ckpt} was trained with other settings ({'; '.join(changed)}). Resuming would continue that run "
                         f"as if it had been this one: use another --out-dir, or pass --no-resume to start over in {cfg.out_dir}.")  # fmt: skip


def resume_state(step: int, num_drawn: int, cfg: Config) -> dict:
    """What a checkpoint stores beside the weights: the loop's counters and the config it trained with."""
    return {"step": step, "num_drawn": num_drawn, "config": dataclasses.asdict(cfg)}


def save_before_stopping(error: Exception, out_dir: Path, state: dict, policy, optimizer, scheduler, rank: int) -> None:
    """On an error every rank raised together, at a round boundary, checkpoint the last completed step: rerunning
    the same command resumes there, so fixing a bad sample loses no training (a one-rank error cannot save)."""
    if not getattr(error, "raised_on_every_rank", False) or state["step"] == 0:
        return
    path = save_checkpoint(out_dir, state["step"], policy, optimizer, scheduler, state, rank)
    if rank == 0:
        print(f"stopping before step {state['step'] + 1}: {path} holds it; fix the cause and rerun the same command "
              "to resume", flush=True)  # fmt: skip


def truncate_metrics(path: Path, step: int) -> None:
    """Drop what a killed run logged after its last checkpoint (and a half-written line): no duplicates on resume."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break  # the line the kill cut short
        if record["step"] <= step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))
