"""Sharded checkpoints with exact resume, written with torch.distributed.checkpoint (DCP).

A checkpoint is a directory out_dir/checkpoints/step_NNNNNN holding
  * the model and optimizer state, sharded: each rank writes its own shards (DCP), and a resume
    with the same world size reads them back without ever gathering the full model;
  * per rank: the LR scheduler, the loop's counters (step, samples drawn), and the RNG states (so a
    resume needs the world size that saved it).
The data order is a pure function of (seed, samples drawn) (data.stream_indices), so the counters and
RNG states are all a resumed run needs to continue exactly as an uninterrupted one would.

`latest` is written last, atomically, after every rank has finished writing: a run killed while
saving resumes from the previous complete checkpoint. Nothing is ever written into a directory that
exists already (the one `latest` names included): a second save of the same step (a stop right
after a periodic save, or a --no-resume rerun reaching a step an abandoned run saved) goes to
step_NNNNNN.1, .2, ..., or is skipped when `latest` already holds exactly that state. The two
newest checkpoints are kept.
"""

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

KEEP = 2


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(out_dir, step: int, policy, optimizer, scheduler, counters: dict, rank: int) -> Path:
    """Save everything needed to resume after `step` optimizer steps. Every rank must call it.

    counters: the loop's state (at least "step" and "num_drawn"), returned by load_checkpoint.
    """
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
    model_state, optim_state = get_state_dict(policy, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)
    torch.save({"scheduler": scheduler.state_dict(), "counters": counters, "rng": _rng_state()}, path / f"rank{rank}.pt")
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
    """Restore model, optimizer, scheduler and RNG states in place; returns the saved counters.

    Only with the world size that saved it (one rank{r}.pt per rank), checked on every rank alike
    before any collective, so all of them stop together with the same message.
    """
    saved_ranks, world_size = len(list(path.glob("rank*.pt"))), dist.get_world_size()
    if saved_ranks != world_size:
        raise ValueError(
            f"{path} was saved by {saved_ranks} rank(s) and this run has {world_size}: resuming would change the global "
            f"batch (--batch-size x --grad-accum-steps x ranks: x {saved_ranks} -> x {world_size}) and the ranks' sampling RNG "
            f"states would not be the saved ones, so it would not continue that run. Resume with "
            f"--nproc_per_node {saved_ranks}, or start over with --no-resume or another --out-dir."
        )
    model_state, optim_state = get_state_dict(policy, optimizer)
    # get_state_dict gives a fresh optimizer state for every parameter, but AdamW keeps none for a
    # parameter that never had a gradient (e.g. LLaVA's vision post_layernorm, unused when features
    # come from hidden_states), so the checkpoint has none either: ask only for what was saved.
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata  # flattened "optim.state.<fqn>.<key>"
    optim_state["state"] = {
        fqn: s for fqn, s in optim_state["state"].items() if all(f"optim.state.{fqn}.{k}" in saved for k in s)
    }
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(policy, state["model"])  # strict: every weight must be in the checkpoint
    # strict=False only lets those stateless parameters stay without state, as in the run that saved it.
    set_optimizer_state_dict(policy, optimizer, state["optim"], options=StateDictOptions(strict=False))
    extra = torch.load(path / f"rank{rank}.pt", weights_only=False)
    scheduler.load_state_dict(extra["scheduler"])
    _set_rng_state(extra["rng"])
    return extra["counters"]
