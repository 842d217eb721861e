"""Weight sync into a real vLLM server: seconds per sync, against a raw broadcast of the same bytes.

    python bench/weight_sync.py                       # built-in tiny model, starts its own server
    python bench/weight_sync.py --model small         # ~70M parameters (bench/common.py sizes)
    python bench/weight_sync.py --url http://127.0.0.1:8000 --model DIR   # a server already running

One sync = what train.py does per `--vllm-sync-every` steps (nanoalign.vllm_server.WeightSync.sync):
pause, start, gather every FSDP2 parameter, broadcast them in buckets while the server loads them,
finish (the server re-processes its layers), reset caches, resume. The baseline is the transport
alone: the same buckets (same sizes, same dtypes) broadcast over gloo from this process to a second
process that only receives, on the same machine, nothing else done. ratio = sync / raw; the target is
<= 1.5. Per-sync costs that do not grow with the model (7 HTTP round trips, the server's per-layer
bookkeeping) dominate for the tiny model; use --model small (or bigger) to see the asymptote.
Also reported: the server's start-up time and one generate call (2 prompts with images, n=4).
"""

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import add_model_flags, load_hf_model, machine_info, model_from_args, print_table, write_json  # noqa: E402


def raw_receiver(port: int, buckets: list[tuple[int, str]], rounds: int) -> None:
    """The baseline's other end: receive `rounds` x the buckets into fresh buffers, nothing else."""
    import torch

    from nanoalign.transfer import gloo_group

    group = gloo_group("127.0.0.1", port, 1, 2, 300)
    for _ in range(rounds):
        works = [group.broadcast(torch.empty(numel, dtype=getattr(torch, dtype)), 0) for numel, dtype in buckets]
        for work in works:
            work.wait()


def raw_broadcast_seconds(buckets: list[tuple[int, str]], rounds: int) -> list[float]:
    """Seconds per round of broadcasting the buffers (all posted at once, then waited for)."""
    import torch
    import torch.distributed as dist

    from nanoalign.transfer import gloo_group

    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, timeout=timedelta(seconds=300), wait_for_workers=False)
    receiver = torch.multiprocessing.get_context("spawn").Process(target=raw_receiver, args=(store.port, buckets, rounds + 1))
    receiver.start()
    group = gloo_group("127.0.0.1", store.port, 0, 2, 300, store=store)
    flats = [torch.randn(numel).to(getattr(torch, dtype)) for numel, dtype in buckets]
    seconds = []
    for r in range(rounds + 1):  # round 0 warms up the connections
        start = time.perf_counter()
        for work in [group.broadcast(flat, 0) for flat in flats]:
            work.wait()
        if r:
            seconds.append(time.perf_counter() - start)
    receiver.join()
    return seconds


def start_server(model: str, port: int, log_path: Path) -> tuple[subprocess.Popen, float]:
    from nanoalign.vllm_server import VLLMClient

    log = open(log_path, "w")
    cmd = [sys.executable, "-m", "nanoalign.serve", "--model", model, "--port", str(port), "--max-model-len", "512"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    start = time.monotonic()
    VLLMClient(f"http://127.0.0.1:{port}").wait_until_ready(timeout=900, process=proc)
    return proc, time.monotonic() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_flags(p)
    p.add_argument("--url", default=None, help="use this running server instead of starting one (it must serve --model)")
    p.add_argument("--steps", type=int, default=5, help="timed syncs (after one warm-up sync)")
    p.add_argument("--bucket-mb", type=float, default=16.0, help="WeightSync bucket size")
    p.add_argument("--out", default=None, help="JSON output (default bench/results/weight_sync-<model>.json)")
    args = p.parse_args()

    import torch

    from nanoalign.model import Policy, shard_policy
    from nanoalign.runtime import device_mesh, init_distributed
    from nanoalign.shapes import shapes_sample
    from nanoalign.transfer import plan_buckets
    from nanoalign.vllm_server import VLLMClient, WeightSync, free_port

    model = model_from_args(args)
    name = args.model if args.model in ("tiny", "small") else Path(model).name
    args.out = args.out or str(Path(__file__).parent / "results" / f"weight_sync-{name}.json")
    proc, startup_s = None, None
    url = args.url
    if url is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        log = Path(args.out).with_suffix(".server.log")
        print(f"starting vLLM for {model} (log: {log})", flush=True)
        proc, startup_s = start_server(model, port, log)
        print(f"server ready in {startup_s:.0f} s", flush=True)
    try:
        _, world_size, device = init_distributed()
        policy = shard_policy(Policy(load_hf_model(model)), device_mesh(world_size, device), bf16=False)
        client = VLLMClient(url)
        sync = WeightSync(policy, client, rank=0, bucket_mb=args.bucket_mb)

        samples = [shapes_sample("eval", 0, "rl"), shapes_sample("eval", 1, "rl", images_per_sample=2)]
        prompts, images = [s["prompt"] for s in samples], [s["images"] for s in samples]
        client.generate(prompts, images, n=4, max_tokens=16)  # warm-up
        start = time.perf_counter()
        client.generate(prompts, images, n=4, max_tokens=16)
        generate_s = time.perf_counter() - start

        sync_s = []
        for step in range(args.steps + 1):  # step 0 warms up
            with torch.no_grad():  # new values each time, as after an optimizer step
                for param in policy.parameters():
                    param.mul_(1.0 + 1e-3)
            seconds = sync.sync(version=str(step))["vllm/sync_s"]
            if step:
                sync_s.append(seconds)
            print(f"sync {step}: {seconds:.3f} s", flush=True)

        params = list(policy.hf.named_parameters())
        dtypes = [str(p.dtype).removeprefix("torch.") for _, p in params]
        shapes = [list(p.shape) for _, p in params]
        buckets = [(sum(torch.Size(shapes[i]).numel() for i in b), dtypes[b[0]]) for b in plan_buckets(dtypes, shapes, sync.bucket_bytes)]
        raw_s = raw_broadcast_seconds(buckets, args.steps)
        sync.close()
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=120)

    row = {
        "model": args.model, "params_m": sum(p.numel() for _, p in params) / 1e6, "mb": sync.num_bytes / 1e6,
        "tensors": len(params), "buckets": len(buckets), "sync_s": statistics.median(sync_s),
        "raw_s": statistics.median(raw_s), "startup_s": startup_s, "generate_s": generate_s,
    }  # fmt: skip
    row["ratio"] = row["sync_s"] / row["raw_s"]
    print_table(
        [row],
        [("model", "model", ""), ("params (M)", "params_m", ".1f"), ("MB sent", "mb", ".1f"), ("tensors", "tensors", ""),
         ("buckets", "buckets", ""), ("sync s/step", "sync_s", ".3f"), ("raw bcast s", "raw_s", ".3f"),
         ("sync / raw", "ratio", ".2f"), ("server start s", "startup_s", ".0f"), ("generate s", "generate_s", ".2f")],
        title=f"weight sync over gloo (bucket {args.bucket_mb:g} MB), median of {args.steps} steps",
    )  # fmt: skip
    write_json(args.out, {**row, "sync_s_per_step": sync_s, "raw_s_per_step": raw_s, "bucket_mb": args.bucket_mb,
                          "model_dir": model, "machine": machine_info()})  # fmt: skip


if __name__ == "__main__":
    main()
