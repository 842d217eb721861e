"""Per-token log-probs: nanoalign's chunked path vs the naive full log-softmax (time, peak memory).

    python bench/logps.py                                  # V = 32k and 152k, T = 256 and 1024, H = 896
    python bench/logps.py --tokens 1024 4096 --vocab 151936 --chunks 1024 256 128

What is measured, for N = B x T token positions with hidden size H and vocabulary V (fp32, the CPU
training dtype), forward and backward of the log-probs of given targets (gradient 1 on each):

    naive        logits = h @ W^T (N, V); log_softmax; gather      (autograd keeps (N, V) tensors)
    chunked/C    nanoalign.model.chunked_logps(h, W, targets, chunk_size=C): lm_head + log-softmax
                 over C positions at a time, recomputed in backward (only (C, V) blocks exist)

Two modes: train (forward + backward, gradients for h and W: the policy's loss) and no_grad
(forward only: the reference model's and the old policy's log-probs).

Each (method, N, V) runs in two fresh processes. Time: median over --repeats forward+backward
passes after one warm-up, with the default allocator. Memory: one pass in a process started with
MALLOC_MMAP_THRESHOLD_=65536, so that glibc serves every block over 64 KiB with its own mmap and
gives it back on free: peak RSS then follows the bytes actually alive, instead of what the
allocator's heap happened to keep (with the default, freed (C, V) blocks stay in the heap and the
same run can read 300 or 700 MiB). Peak memory = peak RSS minus the RSS just before the call
(inputs h, W and targets already allocated): the memory the log-prob computation itself needs,
the (V, H) weight gradient included. Every method's log-probs and gradients are checked against
the naive ones.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (  # noqa: E402
    child_spec, current_rss_bytes, emit, machine_info, median, mib, peak_memory_bytes, print_table, run_child, write_json,
)  # fmt: skip


def naive_logps(hidden, weight, targets):
    logits = hidden @ weight.T  # (N, V)
    return torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None]).squeeze(1)


def run_method(method: str, hidden, weight, targets, chunk: int):
    from nanoalign.model import chunked_logps

    if method == "naive":
        return naive_logps(hidden, weight, targets)
    return chunked_logps(hidden[None], weight, targets[None], 1.0, chunk)[0][0]


def child(spec: dict) -> None:
    import nanoalign.model  # noqa: F401  (imported before the baseline RSS is taken)

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    n, v, h = spec["tokens"], spec["vocab"], spec["hidden"]
    train = spec["mode"] == "train"
    hidden = (torch.randn(n, h) / h**0.5).requires_grad_(train)
    weight = (torch.randn(v, h) * 0.02).requires_grad_(train)
    targets = torch.randint(0, v, (n,))
    before = current_rss_bytes()
    times = []
    for i in range(spec["repeats"] + 1):  # repeats = 0: one pass (the memory run)
        hidden.grad = weight.grad = None
        t0 = time.perf_counter()
        with torch.set_grad_enabled(train):
            logps = run_method(spec["method"], hidden, weight, targets, spec["chunk"])
        if train:
            logps.sum().backward()
        if i:
            times.append(time.perf_counter() - t0)
    result = {"times": times, "before_rss": before}
    if spec["check"] and train:  # agreement with the naive path (small extra memory: after the peak was taken)
        peak = peak_memory_bytes()
        got = (logps.detach(), hidden.grad.clone(), weight.grad.clone())
        hidden.grad = weight.grad = None
        ref = naive_logps(hidden, weight, targets)
        ref.sum().backward()
        result["max_abs_diff"] = max(float((a - b).abs().max()) for a, b in zip(got, (ref.detach(), hidden.grad, weight.grad)))
        result["peak_before_check"] = peak
    emit(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024], help="N = B x T positions")
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936])
    parser.add_argument("--hidden", type=int, default=896, help="H (Qwen2.5-0.5B: 896, 3B: 2048)")
    parser.add_argument("--chunks", type=int, nargs="+", default=[1024, 256, 128], help="chunk sizes (nanoalign default 1024)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["train", "no_grad"], choices=["train", "no_grad"],
                        help="train: forward + backward (the policy); no_grad: forward only (reference / old log-probs)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-check", dest="check", action="store_false", help="skip the agreement check")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "logps.json"))
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    methods = [("naive", 0)] + [("chunked", c) for c in args.chunks]
    rows = []
    for mode, v, n in [(m, v, n) for m in args.modes for v in args.vocab for n in args.tokens]:
            naive_mem = None
            for method, chunk in methods:
                spec = {"method": method, "chunk": chunk, "tokens": n, "vocab": v, "hidden": args.hidden, "mode": mode,
                        "repeats": args.repeats, "threads": args.threads, "check": args.check and method != "naive"}  # fmt: skip
                r = run_child(__file__, spec, verbose=args.verbose)
                name = method if method == "naive" else f"{method}/{chunk}"
                mem = run_child(__file__, {**spec, "repeats": 0, "check": False, "mmap_threshold": 65536}, verbose=args.verbose)
                if "error" in r or "error" in mem:
                    print(f"{name} N={n} V={v}: FAILED\n{r.get('error') or mem.get('error')}", flush=True)
                    continue
                peak = mem["peak_mem_bytes"] - mem["before_rss"]
                row = {"mode": mode, "method": name, "tokens": n, "vocab": v, "time_s": median(r["times"]),
                       "extra_peak_mib": mib(peak), "max_abs_diff": r.get("max_abs_diff"),
                       "logits_mib": n * v * 4 / 2**20}  # fmt: skip
                if method == "naive":
                    naive_mem = row["extra_peak_mib"]
                row["mem_vs_naive"] = row["extra_peak_mib"] / naive_mem if naive_mem else None
                rows.append(row)
                if mode == "train":  # what any implementation must hold: the (V, H) fp32 weight gradient
                    row["weight_grad_mib"] = v * args.hidden * 4 / 2**20
                print(f"{mode} {name} N={n} V={v}: {row['time_s']:.3f} s, +{row['extra_peak_mib']:.0f} MiB", flush=True)
    for row in rows:  # the same ratio without the weight gradient both paths must hold
        naive = next(r for r in rows if r["method"] == "naive" and (r["mode"], r["tokens"], r["vocab"]) == (row["mode"], row["tokens"], row["vocab"]))
        grad = row.get("weight_grad_mib", 0.0)
        row["mem_vs_naive_excl_grad"] = (row["extra_peak_mib"] - grad) / max(1e-9, naive["extra_peak_mib"] - grad)
    print_table(rows, [
        ("mode", "mode", "s"), ("method", "method", "s"), ("N tokens", "tokens", "d"), ("V", "vocab", "d"), ("fwd+bwd (s)", "time_s", ".3f"),
        ("extra peak (MiB)", "extra_peak_mib", ".0f"), ("vs naive", "mem_vs_naive", ".2f"),
        ("vs naive, without the (V, H) grad", "mem_vs_naive_excl_grad", ".2f"),
        ("one (N, V) fp32 (MiB)", "logits_mib", ".0f"), ("max |diff| vs naive", "max_abs_diff", ".1e"),
    ], title=f"log-probs: H={args.hidden}, fp32, {args.threads} threads")  # fmt: skip
    write_json(args.out, {"machine": machine_info(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    spec = child_spec(sys.argv)
    child(spec) if spec else main()
