"""bench/gpu_check.sh --cpu: every stage of the prepared GPU check runs on the CPU and passes its threshold.

The GPU variant cannot run here; this keeps its code paths (the sharded loader, the bf16 step, the
sampler, the export, the timed training steps, nanoalign.plan's inputs) working between GPU loans.
"""

import json
import os
import subprocess
import sys

from conftest import REPO


def test_gpu_check_cpu_variant_passes_every_stage(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--cpu", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    results = json.loads(out.read_text())["results"]
    failed = {name: r["status"] for name, r in results.items() if r["pass"] is not True}
    assert proc.returncode == 0 and not failed, (failed, proc.stdout[-3000:], proc.stderr[-3000:])
    from bench.gpu_check import STAGES

    assert list(results) == STAGES  # every stage ran, none skipped by the budget
    assert results["fsdp_vs_cpu"]["grad_max_diff_rel"] <= 1e-5 and results["bf16_vs_fp32"]["grad_cosine"] >= 0.99
    assert all(results[name]["tokens_per_s"] > 0 for name in ("sft", "sft_ckpt", "grpo", "grpo_ckpt"))
