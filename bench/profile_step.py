"""Where a training step's time goes, and what the proposed fixes buy (A/B in fresh processes).

    python bench/profile_step.py --model small --algo sft                 # torch.profiler table of one step
    python bench/profile_step.py --model small --algo sft --ab            # step time with each patch below
    python bench/profile_step.py --algo sft --ab --patches adamw_foreach no_reshard

Profile: train.py's loop runs `--steps` steps; one late step is recorded with torch.profiler and
its ops are printed by self time, with the loop's phases marked (## prepare: data + encoding, or
rollouts; ## loss: forward + loss; ## optimizer). Python-side time that no op accounts for shows
as the gap between "Self CPU time total" and the step time.

A/B: each patch is applied, in its own fresh process, as a monkeypatch of nanoalign/torch before
train() runs, so nanoalign's files are untouched; BENCHMARKS.md lists the same changes as diffs
against nanoalign. Step times are medians after --warmup steps, interleaved over --repeats rounds
(baseline, patch 1, patch 2, ..., baseline, ...) so that a burst of load from other jobs on the
machine hits all variants alike.

Patches (what each simulates):
    adamw_foreach   torch.optim.AdamW(..., foreach=True): one multi-tensor kernel per op instead of a
                    Python loop over parameters (torch only picks foreach by itself on CUDA)
    adamw_fused     torch.optim.AdamW(..., fused=True): one fused kernel (CPU and CUDA)
    no_reshard      fully_shard(..., reshard_after_forward=False) for every unit: the backward reuses
                    the forward's gathered weights instead of gathering them again
    no_fsdp         one fp32 process: do not wrap the model in FSDP2 at all, and generate from the
                    plain module (the proposed shard_policy / gathered_for_generation change)
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import add_model_flags, child_spec, emit, median, model_from_args, print_table, run_child, write_json  # noqa: E402

PATCHES = ("adamw_foreach", "adamw_fused", "no_reshard", "no_fsdp")
PROPOSED = ["adamw_fused", "no_fsdp"]  # the changes BENCHMARKS.md proposes for nanoalign (no_fsdp: one fp32 process)


def apply_patch(name: str, loop) -> None:
    """Monkeypatch one proposed change into this process (see the module docstring)."""
    import torch

    if name in ("adamw_foreach", "adamw_fused"):
        init = torch.optim.AdamW.__init__

        def patched_init(self, params, *args, **kwargs):
            kwargs.setdefault(name.split("_")[1], True)
            init(self, params, *args, **kwargs)

        torch.optim.AdamW.__init__ = patched_init
    elif name in ("no_reshard", "no_fsdp"):
        import nanoalign.model as model

        shard = model.shard_policy

        def patched_shard(policy, mesh, *, bf16, activation_checkpointing=False):
            if name == "no_fsdp":
                if activation_checkpointing:
                    policy.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                return policy
            original = model.fully_shard
            model.fully_shard = lambda module, **kw: original(module, reshard_after_forward=False, **kw)
            try:
                return shard(policy, mesh, bf16=bf16, activation_checkpointing=activation_checkpointing)
            finally:
                model.fully_shard = original

        model.shard_policy = patched_shard
        loop.shard_policy = patched_shard
        if name == "no_fsdp":
            import contextlib

            import nanoalign.rollout as rollout
            from torch.distributed.fsdp import FSDPModule

            gathered = model.gathered_for_generation

            def patched_gathered(policy):
                return gathered(policy) if isinstance(policy, FSDPModule) else contextlib.nullcontext(policy)

            model.gathered_for_generation = rollout.gathered_for_generation = patched_gathered
    elif name != "baseline":
        raise ValueError(f"unknown patch {name!r}; choose from {PATCHES}")


def child(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    import train as loop
    from bench.common import suppress_image_token_in_rollouts
    from bench.speed import bench_config

    suppress_image_token_in_rollouts(spec["model"])
    for name in spec["patches"]:
        apply_patch(name, loop)
    with tempfile.TemporaryDirectory() as out_dir:
        cfg = bench_config(spec["algo"], spec["model"], out_dir, spec["steps"], spec.get("overrides", {}))
        table = None
        if spec["profile"]:
            table = profiled_train(loop, cfg, spec["steps"] - 1)
        else:
            loop.train(cfg)
        lines = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    emit({"step_times": [m["step_time"] for m in lines], "table": table})


def profiled_train(loop, cfg, profiled_step: int) -> str:
    """train(cfg) with step `profiled_step` (1-based) recorded by torch.profiler; returns the op table."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    algo = loop.ALGOS[cfg.algo]
    prepare, loss, opt_step = algo.prepare, algo.loss, torch.optim.AdamW.step
    state = {"prof": None, "done": False}

    def start_if_due(run):
        if state["prof"] is None and not state["done"] and run.step == profiled_step - 1:
            state["prof"] = profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])])
            state["prof"].__enter__()

    def marked_prepare(samples, run):
        start_if_due(run)
        with record_function("## prepare"):
            return prepare(samples, run)

    def marked_loss(micro, run):
        start_if_due(run)
        with record_function("## loss (forward)"):
            return loss(micro, run)

    def marked_step(self, *args, **kwargs):
        with record_function("## optimizer"):
            out = opt_step(self, *args, **kwargs)
        if state["prof"] is not None and not state["done"]:
            state["prof"].__exit__(None, None, None)
            state["done"] = True
        return out

    algo.prepare, algo.loss, torch.optim.AdamW.step = marked_prepare, marked_loss, marked_step
    loop.train(cfg)
    return state["prof"].key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(parser)
    parser.add_argument("--algo", default="sft")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--ab", action="store_true", help="time each patch against the baseline instead of profiling")
    parser.add_argument("--patches", nargs="+", default=list(PATCHES), choices=PATCHES)
    parser.add_argument("--combine", action="store_true", help="also time the proposed set together: " + "+".join(PROPOSED))
    parser.add_argument("--repeats", type=int, default=2, help="A/B rounds (interleaved)")
    parser.add_argument("--trees", nargs="*", default=[], help="other checkouts to time as variants (their own train.py and nanoalign/)")
    parser.add_argument("--out", default=None, help="--ab: JSON output (default bench/results/profile_step-<model>-ab.json)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    model = model_from_args(args)
    spec = {"algo": args.algo, "model": model, "steps": args.warmup + args.steps, "threads": args.threads, "profile": False,
            "overrides": {"batch_size": args.batch_size} if args.batch_size else {}}  # fmt: skip
    if not args.ab:
        result = run_child(__file__, {**spec, "patches": [], "profile": True}, verbose=args.verbose)
        if "error" in result:
            raise SystemExit(result["error"])
        print(result["table"])
        print("step times:", [round(t, 4) for t in result["step_times"]])
        return
    variants = [("baseline", __file__, [])] + [(p, __file__, [p]) for p in args.patches]
    if args.combine:
        variants.append(("+".join(PROPOSED), __file__, PROPOSED))
    for tree in args.trees:  # another checkout (e.g. with the proposed diffs applied), unpatched at run time
        variants.append((f"tree {tree}", str(Path(tree) / "bench" / "profile_step.py"), []))
    times: dict[str, list[float]] = {}
    peaks: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for name, script, patches in variants:
            result = run_child(script, {**spec, "patches": patches}, verbose=args.verbose)
            if "error" in result:
                print(f"{name}: FAILED\n{result['error']}", flush=True)
                continue
            times.setdefault(name, []).extend(result["step_times"][args.warmup :])
            peaks.setdefault(name, []).append(result["peak_mem_bytes"] / 2**20)
            print(f"{name}: {median(result['step_times'][args.warmup:]):.4f} s", flush=True)
    base = median(times.get("baseline", []))
    rows = [{"variant": k, "step_s": median(v), "speedup": base / median(v), "n": len(v), "peak_mib": median(peaks[k])}
            for k, v in times.items()]  # fmt: skip
    name = args.model if args.model in ("tiny", "small") else Path(model).name
    print_table(rows, [("variant", "variant", "s"), ("step (s)", "step_s", ".4f"), ("speed-up vs baseline", "speedup", ".2f"),
                       ("peak mem (MiB)", "peak_mib", ".0f"), ("steps timed", "n", "d")], title=f"A/B: {args.algo} on {name}, {args.threads} threads")  # fmt: skip
    out = args.out or Path(__file__).parent / "results" / f"profile_step-{name}-ab.json"
    write_json(out, {"model": model, "args": vars(args), "rows": rows, "times": times, "peaks_mib": peaks})


if __name__ == "__main__":
    spec = child_spec(sys.argv)
    child(spec) if spec else main()
