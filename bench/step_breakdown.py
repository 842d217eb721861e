"""Where one training step's time and memory go, phase by phase, in one process (CPU: fp32, peak RSS).

    python bench/real_shapes.py breakdown --shape 3b                  # the realistic-shape model (bench/real_shapes.py)
    python bench/step_breakdown.py --model DIR --variants shared whole whole+ckpt

One RL round and training step of `--prompts` prompts x G completions (GRPO's shapes: rows are
prompt + completion, the loss reads the completion tokens), each variant in a fresh process:

    RL      prefill       the P distinct prompts through the model once (nanoalign's sampler)
            decode        --decode-tokens tokens for the P*G rows, one forward per token
            scoring       the rows' log-probs without gradient (what old / reference log-probs cost)
    step    vision        the vision tower's forward (patches -> merged image features)
            text          the decoder's forward (every call: the prompts, then the completions)
            lm_head+logps the rest of the forward: lm_head and log-softmax over the vocabulary,
                          in chunks of --logps-chunk-size positions (nanoalign.model.chunked_logps)
            backward      split into lm_head+logps (its own backward, timed inside), text (until
                          the image features' gradient is ready) and vision (the rest)
            optimizer     fused AdamW; its first step allocates the two fp32 moments

The training rows are the sampled prompts with random completions of exactly --completion-tokens
ids (a random-init model never stops by itself). Variants: "shared" = the shared-prompt forward
(each prompt read once, the default for RL rows), "whole" = every row forwarded whole (what TRL
does), "+ckpt" = --activation-checkpointing (HF's per-layer checkpointing), "+fsdp" = FSDP2 over a
world of one process, as `python train.py` runs. Each phase reports wall and CPU seconds and
memory: the RSS when it ends and its peak RSS above the RSS it started at (a thread samples RSS
every 2 ms; glibc is told to serve blocks over 1 MiB from mmap, so freed tensors leave the RSS).
The sub-phases (vision, text, lm_head+logps and the backward's parts) are timed by hooks, in wall
and CPU seconds; on a CPU shared with other jobs the CPU seconds are the figures to read.
--steps steps run and the last one's times are reported: with --steps 1 (the default, to keep a
CPU run short) the optimizer time includes allocating its two moments.
"""

import argparse
import json
import resource
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (
    child_spec,
    current_rss_bytes,
    emit,
    machine_info,
    print_table,
    run_child,
    write_json,
)

PHASES = ("load", "prefill", "decode", "scoring", "forward", "vision", "text", "lm_head+logps", "backward",
          "backward/lm_head+logps", "backward/text", "backward/vision", "optimizer")  # fmt: skip


class RssPeak:
    """Samples this process's RSS every 2 ms in a thread; `peak()` is the highest since `reset()`."""

    def __init__(self):
        self.high, self.stop = current_rss_bytes(), False
        threading.Thread(target=self.run, daemon=True).start()

    def run(self):
        while not self.stop:
            self.high = max(self.high, current_rss_bytes())
            time.sleep(0.002)

    def reset(self) -> int:
        self.high = current_rss_bytes()
        return self.high

    def peak(self) -> int:
        return max(self.high, current_rss_bytes())


class Phases:
    """Wall / CPU seconds and memory of named phases; nested hooks add to the running totals."""

    def __init__(self, rss: RssPeak):
        self.rss, self.out = rss, {}

    def measure(self, name: str):
        phases = self

        class Span:
            def __enter__(self):
                self.start, self.cpu, self.rss0 = time.perf_counter(), time.process_time(), phases.rss.reset()

            def __exit__(self, *exc):
                phases.out[name] = {"s": time.perf_counter() - self.start, "cpu_s": time.process_time() - self.cpu,
                                    "rss_end_gib": current_rss_bytes() / 2**30,
                                    "peak_above_start_gib": (phases.rss.peak() - self.rss0) / 2**30}  # fmt: skip

        return Span()


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def add_since(totals: dict, name: str, start: tuple[float, float]) -> None:
    """totals[name] += (wall, CPU) seconds since `start` (a clocks() reading)."""
    now, before = clocks(), totals.get(name, (0.0, 0.0))
    totals[name] = (before[0] + now[0] - start[0], before[1] + now[1] - start[1])


def timed_module(module, totals: dict, name: str) -> None:
    """Add the wall and CPU time of every forward call of `module` to totals[name]."""
    starts = []
    module.register_forward_pre_hook(lambda m, args: starts.append(clocks()))
    module.register_forward_hook(lambda m, args, out: add_since(totals, name, starts.pop()))


def child(spec: dict) -> None:
    import torch

    import nanoalign.model as model_module
    from bench.common import load_hf_model
    from bench.real_shapes import Task, real_rl_samples
    from nanoalign.batch import image_token_ids, pack_rows
    from nanoalign.model import Policy, stop_and_pad_ids, vision_module
    from nanoalign.rollout import distinct_prompts, encode_rows
    from nanoalign.sampler import sample

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    rss = RssPeak()
    phases = Phases(rss)
    variant = spec["variant"]
    with phases.measure("load"):
        from nanoalign.model import load_processor

        processor = load_processor(spec["model"])
        hf = load_hf_model(spec["model"])
        with torch.no_grad():  # into anonymous memory, as a training process holds them (not pages of the mmapped file)
            for p in hf.parameters():
                p.data = p.data.clone()
        hf.train()
        policy = Policy(hf, spec["logps_chunk_size"])
        if "+fsdp" in variant:
            from nanoalign.model import shard_policy
            from nanoalign.runtime import device_mesh, init_distributed

            _, world, device = init_distributed()
            policy = shard_policy(policy, device_mesh(world, device), bf16=False, activation_checkpointing="+ckpt" in variant)
        elif "+ckpt" in variant:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    stop_ids, pad_id = stop_and_pad_ids(processor, hf)
    G, P = spec["num_generations"], spec["prompts"]
    samples = real_rl_samples(P, Task(spec["image_size"], spec["completion_tokens"]))
    texts, rows_enc = encode_rows(processor, [s["prompt"] for s in samples], [s["images"] for s in samples], G)
    distinct = distinct_prompts(processor, texts, [s["images"] for s in samples], rows_enc, G)
    prompt_tokens = int(distinct["attention_mask"].sum(1).float().mean())

    # RL: prefill + decode (timed apart by a hook on the first forward), on the plain model.
    decoder = hf.model.language_model
    calls = []
    first_hook = decoder.register_forward_hook(lambda m, a, o: calls.append(clocks()))
    from nanoalign.model import gathered_for_generation

    generating = gathered_for_generation(policy) if "+fsdp" in variant else __import__("contextlib").nullcontext()
    with phases.measure("decode"), generating:
        start = clocks()
        sampler = policy.sample if "+fsdp" in variant else lambda enc, **kw: sample(hf, enc, **kw)
        out = sampler(dict(distinct), num_samples=G, max_new_tokens=spec["decode_tokens"], stop_ids=set(), pad_id=pad_id,
                      end_ids=(), temperature=1.0)  # fmt: skip
    first_hook.remove()
    prefill = (calls[0][0] - start[0], calls[0][1] - start[1])
    phases.out["prefill"] = {"s": prefill[0], "cpu_s": prefill[1]}
    phases.out["decode"]["s"] -= prefill[0]
    phases.out["decode"]["cpu_s"] -= prefill[1]
    decoded_tokens = sum(len(ids) for ids in out.ids)

    # Training rows: the prompts + random completions of completion_tokens ids from the tokenizer's own range.
    special = set(processor.tokenizer.all_special_ids) | image_token_ids(processor) | stop_ids
    allowed = torch.tensor([i for i in range(len(processor.tokenizer)) if i not in special])
    completions = [allowed[torch.randint(len(allowed), (spec["completion_tokens"],))].tolist() for _ in range(P * G)]
    batch = pack_rows(processor, rows_enc, completions, [[1] * len(c) for c in completions], [f"r{i}" for i in range(P * G)], 100000, pad_id)
    if variant.startswith("shared"):
        batch.shared_prompts = distinct
    inputs = batch.model_inputs()

    with phases.measure("scoring"), torch.no_grad():
        policy(**inputs, logps_mask=batch.mask)

    # The step, with timers inside: module hooks on the vision tower and the decoder, lm_head+logps's
    # backward timed in the autograd function, the image features' gradient marking vision's backward.
    totals = {}
    timed_module(vision_module(hf), totals, "vision")
    timed_module(decoder, totals, "text")
    backward = model_module._ChunkedLogps.backward

    def timed_backward(ctx, *grads):
        start = clocks()
        result = backward(ctx, *grads)
        add_since(totals, "backward/lm_head+logps", start)
        totals["lm_head_backward_end"] = clocks()
        return result

    model_module._ChunkedLogps.backward = staticmethod(timed_backward)
    def mark_vision_backward(module, args, out) -> None:  # returns None: the output is left as it is
        features = out.pooler_output if hasattr(out, "pooler_output") else out
        if features.requires_grad:
            features.register_hook(lambda grad: totals.__setitem__("vision_grad_ready", clocks()))

    vision_module(hf).register_forward_hook(mark_vision_backward)
    params = [p for p in policy.parameters() if p.requires_grad]
    # --no-optimizer: forward and backward only, for a model whose two AdamW moments do not fit here
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), fused=True) if spec.get("optimizer", True) else None
    num_tokens = float(batch.mask.sum())
    for step in range(spec["steps"]):
        totals.clear()
        with phases.measure("forward"):
            logps, _ = policy(**inputs, logps_mask=batch.mask)
            loss = -(logps * batch.mask).sum() / num_tokens
        with phases.measure("backward"):
            loss.backward()
            end = clocks()
        if optimizer is not None:
            with phases.measure("optimizer"):
                optimizer.step()
        policy.zero_grad(set_to_none=True)
        del logps, loss
    def span(wall_cpu):
        return {"s": wall_cpu[0], "cpu_s": wall_cpu[1]}

    zero = (0.0, 0.0)
    vision, text = totals.get("vision", zero), totals.get("text", zero)
    for name, value in (("vision", vision), ("text", text), ("backward/lm_head+logps", totals.get("backward/lm_head+logps", zero))):
        phases.out[name] = span(value)
    forward = phases.out["forward"]
    phases.out["lm_head+logps"] = span((forward["s"] - vision[0] - text[0], forward["cpu_s"] - vision[1] - text[1]))
    if "vision_grad_ready" in totals:
        ready, lm_end = totals["vision_grad_ready"], totals["lm_head_backward_end"]
        phases.out["backward/text"] = span((ready[0] - lm_end[0], ready[1] - lm_end[1]))
        phases.out["backward/vision"] = span((end[0] - ready[0], end[1] - ready[1]))
    num_params = sum(p.numel() for p in policy.parameters())
    emit({
        "phases": phases.out, "rows": P * G, "prompt_tokens": prompt_tokens, "completion_tokens": spec["completion_tokens"],
        "row_tokens": int(batch.attention_mask.sum(1).float().mean()), "decoded_tokens": decoded_tokens,
        "num_params": num_params, "params_gib": num_params * 4 / 2**30, "threads": torch.get_num_threads(),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    })  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model directory (bench/real_shapes.py build prints one)")
    parser.add_argument("--variants", nargs="+", default=["shared", "whole"],
                        help="shared | whole, each optionally +ckpt (activation checkpointing) and/or +fsdp (FSDP2, one process)")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--completion-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=16, help="tokens decoded in the RL phase (per-token time is reported)")
    parser.add_argument("--logps-chunk-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=1, help="training steps; the last is reported")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-optimizer", dest="optimizer", action="store_false", help="forward and backward only (7B widths: AdamW's moments do not fit 24 GiB)")
    parser.add_argument("--out", default=None, help="results JSON (default bench/results/step_breakdown-<model dir name>.json)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    out = args.out or Path(__file__).parent / "results" / f"step_breakdown-{Path(args.model).name}.json"
    results = {}
    for variant in args.variants:
        spec = {k: getattr(args, k) for k in ("model", "prompts", "num_generations", "image_size", "completion_tokens",
                                              "decode_tokens", "logps_chunk_size", "steps", "threads", "optimizer")}  # fmt: skip
        spec["variant"] = variant
        spec["mmap_threshold"] = 2**20
        start = time.perf_counter()
        results[variant] = run_child(__file__, spec, verbose=args.verbose, timeout=3600)
        results[variant]["wall_s"] = time.perf_counter() - start
        print(variant, json.dumps(results[variant])[:2000], flush=True)
        write_json(out, {"machine": machine_info(), "args": vars(args), "results": results})  # so far
    table = []
    for phase in PHASES:
        row = {"phase": phase}
        for variant, result in results.items():
            p = result.get("phases", {}).get(phase, {})
            if phase == "decode" and p:
                p = {**p, "per_token_s": p["s"] / args.decode_tokens}
            row[f"{variant} s"] = p.get("per_token_s", p.get("s"))
            row[f"{variant} CPU s"] = p.get("cpu_s") / (args.decode_tokens if phase == "decode" else 1) if p.get("cpu_s") is not None else None
            row[f"{variant} peak+ GiB"] = p.get("peak_above_start_gib")
            row[f"{variant} RSS GiB"] = p.get("rss_end_gib")
        table.append(row)
    table.append({"phase": "peak RSS", **{f"{v} RSS GiB": r.get("peak_rss_gib") for v, r in results.items()}})
    columns = [("phase", "phase", "s")]
    for variant in results:
        columns += [(f"{variant} s", f"{variant} s", ".2f"), (f"{variant} CPU s", f"{variant} CPU s", ".2f"),
                    (f"{variant} peak+ GiB", f"{variant} peak+ GiB", ".2f"),
                    (f"{variant} RSS GiB", f"{variant} RSS GiB", ".2f")]  # fmt: skip
    print_table(table, columns, title=f"{Path(args.model).name}: {args.prompts} prompts x G={args.num_generations}, "
                f"{args.image_size}-px images, {args.completion_tokens} completion tokens, {args.threads} thread(s); "
                "decode: seconds per token")  # fmt: skip
    write_json(out, {"machine": machine_info(), "args": vars(args), "results": results, "table": table})


if __name__ == "__main__":
    spec = child_spec(sys.argv)
    child(spec) if spec else main()
