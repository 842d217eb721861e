"""Tests for nanoalign/loading.py and multi-node runs: loading and exporting without a model copy per rank.

  * the meta-device loader gives exactly from_pretrained's tensors and buffers (tied weights still
    one tensor), from one file, from a sharded bf16 checkpoint with an index json, and through the
    from_pretrained fallback; --freeze-vision and training mode are kept;
  * on 2 ranks: the same shards, first-step loss and gradients as today's path (from_pretrained on
    every rank, then fully_shard), an export written by rank 0 alone that reloads with the same
    log-probs, and the other ranks' gathers leave them nothing;
  * two torchrun launchers (--nnodes 2, c10d rendezvous on 127.0.0.1) train with the same losses as
    one launcher with 2 processes;
  * the prepared GPU check (bench/gpu_check.sh) runs in its small CPU variant.
"""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from bench.common import hf_state_dict
from nanoalign.config import Config
from nanoalign.metrics import read_metrics
from nanoalign.model import build_policy, decoder_layers, vision_module
from nanoalign.runtime import device_mesh

REPO = Path(__file__).resolve().parents[1]
from conftest import subprocess_env  # noqa: E402

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


@pytest.fixture(scope="session")
def sharded_bf16_dir(tiny_dirs, tmp_path_factory):
    """The tiny model saved in bf16 and cut into many safetensors files with an index json."""
    from transformers import AutoModelForImageTextToText

    out = tmp_path_factory.mktemp("sharded-bf16")
    model = AutoModelForImageTextToText.from_pretrained(tiny_dirs["tiny"], dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size="300KB")
    assert (out / "model.safetensors.index.json").exists() and len(list(out.glob("*.safetensors"))) > 3
    return out


@pytest.mark.parametrize("case", ["tiny", "tiny-llava", "sharded-bf16", "fallback"])
def test_loaded_weights_equal_from_pretrained(case, tiny_dirs, sharded_bf16_dir, dist_world, monkeypatch):
    from transformers import AutoModelForImageTextToText

    import nanoalign.loading as loading

    model_dir = str(sharded_bf16_dir if case == "sharded-bf16" else tiny_dirs["tiny-llava" if case == "tiny-llava" else "tiny"])
    if case == "fallback":  # as for a checkpoint whose conversion is more than renaming: from_pretrained on rank 0
        monkeypatch.setattr(loading, "checkpoint_to_model_names", lambda *args: None)
    reference = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    _, world_size, device = dist_world
    policy = build_policy(model_dir, Config(), device_mesh(world_size, device), bf16=False, trainable=True)

    state, expected = hf_state_dict(policy), reference.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert state[name].dtype == torch.float32 and torch.equal(state[name], tensor), name
    buffers, expected_buffers = dict(policy.hf.named_buffers()), dict(reference.named_buffers())  # non-persistent too
    assert buffers.keys() == expected_buffers.keys() and buffers  # rotary inv_freq, ...
    for name, buffer in expected_buffers.items():
        assert torch.equal(buffers[name], buffer), name
    tied = reference.get_output_embeddings().weight is reference.get_input_embeddings().weight
    assert (policy.hf.get_output_embeddings().weight is policy.hf.get_input_embeddings().weight) == tied
    assert tied == (case != "tiny-llava")  # the tiny Qwen2.5-VL ties lm_head to the embeddings
    assert policy.hf.generation_config.eos_token_id == reference.generation_config.eos_token_id


def test_build_policy_keeps_freeze_vision_and_training_mode(tiny_dirs, dist_world):
    _, world_size, device = dist_world
    mesh = device_mesh(world_size, device)
    policy = build_policy(str(tiny_dirs["tiny"]), Config(freeze_vision=True), mesh, bf16=False, trainable=True)
    assert not any(p.requires_grad for p in vision_module(policy.hf).parameters())
    assert all(p.requires_grad for p in decoder_layers(policy.hf)[0].parameters())
    assert policy.hf.training and all(m.p == 0 for m in policy.hf.modules() if isinstance(m, torch.nn.Dropout))
    reference = build_policy(str(tiny_dirs["tiny"]), Config(), mesh, bf16=False, trainable=False)
    assert not reference.hf.training and not any(p.requires_grad for p in reference.parameters())


@pytest.mark.parametrize("case", ["streamed", "fallback"])
def test_export_writes_what_save_pretrained_writes(case, tiny_dirs, dist_world, tmp_path, monkeypatch):
    # Streamed (one tensor at a time, names mapped back as save_pretrained maps them) or, for a
    # conversion that is more than a renaming, save_pretrained from rank 0's gathered copy.
    from transformers import AutoModelForImageTextToText

    import nanoalign.loading as loading
    from nanoalign.model import load_processor

    if case == "fallback":
        monkeypatch.setattr(loading, "model_to_checkpoint_names", lambda *args: None)
    _, world_size, device = dist_world
    model_dir = str(tiny_dirs["tiny"])
    policy = build_policy(model_dir, Config(), device_mesh(world_size, device), bf16=False, trainable=True)
    loading.export_hf(policy, load_processor(model_dir), tmp_path / "out", rank=0)
    written, _ = loading.read_header(tmp_path / "out" / "model.safetensors")
    assert written.keys() == loading.read_header(tiny_dirs["tiny"] / "model.safetensors")[0].keys()  # the checkpoint's names
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "out", dtype=torch.float32).state_dict()
    expected = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    assert reloaded.keys() == expected.keys() and all(torch.equal(reloaded[k], expected[k]) for k in expected)


@pytest.fixture(scope="module")
def two_ranks(tiny_dirs, tmp_path_factory):
    """tests/scale_worker.py on 2 processes: what rank 0 measured, and where the export went."""
    out = tmp_path_factory.mktemp("scale2")
    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node", "2", str(REPO / "tests" / "scale_worker.py"), str(tiny_dirs["tiny"]), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out / "result.pt", weights_only=False), out / "export"


def test_two_ranks_same_shards_loss_and_gradients_as_todays_path(two_ranks):
    result, _ = two_ranks
    assert result["world_size"] == 2 and result["shards_equal"]
    for spec in ("sft", "mpo"):  # mpo: the frozen reference model is loaded the same way
        old, new = result[spec]["old"], result[spec]["new"]
        assert_close(new["loss"], old["loss"], atol=0, rtol=0)
        assert new["grads"].keys() == old["grads"].keys()
        for name, grad in old["grads"].items():
            assert_close(new["grads"][name], grad, atol=0, rtol=0, msg=name)


def test_export_from_rank_zero_alone_reloads_with_the_same_logps(two_ranks):
    from transformers import AutoModelForImageTextToText

    result, export = two_ranks
    assert result["others_received_nothing"] and result["others_state_dict_empty"]
    assert json.loads((export / "model.safetensors.index.json").read_text())["weight_map"]  # several files
    model = AutoModelForImageTextToText.from_pretrained(export, dtype=torch.float32).eval()
    inputs = result["model_inputs"]
    with torch.no_grad():
        logits = model(**inputs).logits[:, :-1].float()
    expected = torch.log_softmax(logits, -1).gather(-1, inputs["input_ids"][:, 1:, None]).squeeze(-1)
    assert_close(result["policy_logps"][:, 1:], expected, atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# two nodes on one machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sft_flags(out_dir: Path) -> list[str]:
    return ["--algo", "sft", "--model", "tiny", "--out-dir", str(out_dir), "--max-steps", "3", "--batch-size", "2",
            "--warmup-steps", "1", "--save-every", "0", "--num-shapes-samples", "64", "--eval-split", "",
            "--logps-chunk-size", "64"]  # fmt: skip


def run_launchers(launchers: list[list[str]], log_dir: Path, timeout: float = 300) -> None:
    """Start every torchrun launcher at once, wait for all; on a failure or timeout kill them all."""
    procs, logs = [], []
    try:
        for i, cmd in enumerate(launchers):
            logs.append(open(log_dir / f"launcher{i}.log", "w"))
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=logs[-1], stderr=subprocess.STDOUT,
                                          start_new_session=True))  # fmt: skip
        for proc in procs:
            proc.wait(timeout=timeout)
            if proc.returncode != 0:
                break
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the launcher's session: its workers too
                proc.wait()
        for log in logs:
            log.close()
    tails = "\n".join((log_dir / f"launcher{i}.log").read_text()[-2000:] for i in range(len(launchers)))
    assert all(p.returncode == 0 for p in procs), tails


def test_two_launchers_as_two_nodes_give_the_same_losses_as_one(tiny_dirs, tmp_path):
    # The README's multi-node command on one machine: torchrun on each "node" with --nnodes 2,
    # one process each, meeting at a c10d rendezvous; the same as one launcher with 2 processes.
    one, two = tmp_path / "one", tmp_path / "two"
    run_launchers([[*TORCHRUN, "--standalone", "--nproc_per_node", "2", str(REPO / "train.py"), *sft_flags(one)]], tmp_path)
    endpoint = f"127.0.0.1:{free_port()}"
    run_launchers([
        [*TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node), "--rdzv-backend", "c10d",
         "--rdzv-endpoint", endpoint, "--rdzv-id", "two-nodes", str(REPO / "train.py"), *sft_flags(two)]
        for node in (0, 1)
    ], tmp_path)  # fmt: skip
    losses = {name: [r["loss"] for r in read_metrics(out / "metrics.jsonl")] for name, out in (("one", one), ("two", two))}
    assert len(losses["one"]) == 3
    assert_close(losses["two"], losses["one"], atol=0, rtol=0)
    assert (two / "final" / "config.json").exists()  # exported by the one rank 0


# -----------------------------------------------------------------------------
# the prepared GPU check, small CPU variant


def test_gpu_check_cpu_variant_passes_every_stage(tiny_dirs, tmp_path):
    # bench/gpu_check.sh --cpu: every stage of the GPU check at tiny sizes, judged by its threshold,
    # so the script cannot rot between GPU loans.
    from bench.gpu_check import STAGES

    out = tmp_path / "gpu_check.json"
    env = {**subprocess_env(), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--cpu", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=400)  # fmt: skip
    results = json.loads(out.read_text())["results"]
    failed = {name: r["status"] for name, r in results.items() if r["pass"] is not True}
    assert proc.returncode == 0 and not failed, (failed, proc.stdout[-3000:], proc.stderr[-3000:])
    assert list(results) == STAGES  # every stage ran; the budget skipped none
    assert results["fsdp_vs_cpu"]["grad_max_diff_rel"] <= 1e-5 and results["bf16_vs_fp32"]["grad_cosine"] >= 0.99
    assert results["sampler_logps"]["max_abs_diff"] <= 1e-4 and results["export_reload"]["max_abs_logp_diff"] <= 1e-4
    assert all(results[name]["tokens_per_s"] > 0 and results[name]["backward_s"] > 0 for name in ("sft", "sft_ckpt", "grpo", "grpo_ckpt"))
