"""The GPU path's device-independent pieces, checked on the CPU: process-group setup, the lm_head
gradient GEMM, the log-prob chunk size, the attention implementation, the reference model's dtype,
the dtype and bytes of a weight sync, and the group Python objects travel on.

What only a GPU can show (NCCL, cuBLAS numerics, speed) is bench/gpu_check.sh's job.
"""

import sys
import types

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from nanoalign import runtime
from nanoalign.config import Config, check_config
from nanoalign.loading import empty_hf_model
from nanoalign.model import add_weight_grad_, build_policy, logps_chunk_size
from nanoalign.runtime import COLLECTIVE_TIMEOUT, device_mesh


def test_init_distributed_picks_the_device_before_the_group_and_hands_it_over(monkeypatch):
    # A GPU machine as torchrun leaves it: LOCAL_RANK set, no group yet.
    calls = []
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(("init", backend, kw)))
    monkeypatch.setattr(dist, "get_rank", lambda: 3)
    monkeypatch.setattr(dist, "get_world_size", lambda: 8)
    rank, world_size, device = runtime.init_distributed()
    assert (rank, world_size, device) == (3, 8, torch.device("cuda", 3))
    assert [c[0] for c in calls] == ["set_device", "init"]  # the device first (torchtitan's order)
    assert calls[0][1] == torch.device("cuda", 3)
    _, backend, kwargs = calls[1]
    assert backend == "nccl" and kwargs["device_id"] == torch.device("cuda", 3)
    # Longer than NCCL's 10-minute default, which a 7B download on rank 0 outlasts.
    assert kwargs["timeout"] == COLLECTIVE_TIMEOUT and COLLECTIVE_TIMEOUT.total_seconds() >= 3600


def test_lm_head_weight_gradient_keeps_the_fp32_gemm_on_cpu():
    torch.manual_seed(0)
    grad_weight, dlogits, hidden = torch.randn(50, 8), torch.randn(6, 50), torch.randn(6, 8).bfloat16()
    expected = grad_weight + dlogits.T @ hidden.float()
    add_weight_grad_(grad_weight, dlogits, hidden)
    torch.testing.assert_close(grad_weight, expected, rtol=0, atol=1e-5)


def test_lm_head_weight_gradient_on_an_accelerator_is_a_bf16_gemm_into_the_fp32_gradient():
    # The meta device stands in for CUDA: not a CPU, and it has addmm's out_dtype kernel. What is
    # checked is the call: bf16 operands, fp32 result written in place into the gradient.
    grad_weight = torch.zeros(50, 8, device="meta")
    seen = {}
    real_addmm = torch.addmm

    def spy(input, mat1, mat2, **kwargs):
        seen.update(mat1=mat1.dtype, mat2=mat2.dtype, **kwargs)
        return real_addmm(input, mat1, mat2, **kwargs)

    torch.addmm = spy
    try:
        add_weight_grad_(grad_weight, torch.zeros(6, 50, device="meta"), torch.zeros(6, 8, dtype=torch.bfloat16, device="meta"))
    finally:
        torch.addmm = real_addmm
    assert seen["mat1"] == seen["mat2"] == torch.bfloat16
    assert seen["out_dtype"] == torch.float32 and seen["out"] is grad_weight


def test_logps_chunk_size_by_device():
    assert logps_chunk_size(0, "cpu") == 128
    assert logps_chunk_size(0, "cuda") == 1024
    assert logps_chunk_size(48, "cuda") == 48  # asked for: kept
    with pytest.raises(ValueError, match="--logps-chunk-size"):
        check_config(Config(logps_chunk_size=-1))


def test_attn_implementation_is_checked_and_reaches_both_towers(tiny_dirs, monkeypatch):
    with pytest.raises(ValueError, match="--attn-implementation 'flash'"):
        check_config(Config(attn_implementation="flash"))
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name in ("flash_attn", "kernels") else real_find_spec(name))
    with pytest.raises(ValueError, match="needs the flash_attn package.*pip install flash-attn"):
        check_config(Config(attn_implementation="flash_attention_2"))
    with pytest.raises(ValueError, match="needs the kernels package"):
        check_config(Config(attn_implementation="kernels-community/flash-attn"))
    check_config(Config(attn_implementation="eager"))
    model = empty_hf_model(str(tiny_dirs["tiny"]), "eager")
    assert model.config.text_config._attn_implementation == "eager"
    assert model.config.vision_config._attn_implementation == "eager"


def test_reference_model_is_kept_in_the_compute_dtype(tiny_dirs, dist_world):
    model_dir = str(tiny_dirs["tiny"])
    cfg = Config()
    mesh = device_mesh(1, torch.device("cpu"))
    policy = build_policy(model_dir, cfg, mesh, bf16=True, trainable=True)
    reference = build_policy(model_dir, cfg, mesh, bf16=True, trainable=False)
    assert all(p.dtype == torch.float32 for p in policy.parameters())  # fp32 master weights
    assert all(p.dtype == torch.bfloat16 for p in reference.parameters())  # the reference only computes
    assert all(b.dtype == torch.float32 for name, b in reference.hf.named_buffers() if "inv_freq" in name)
    # Both compute with the checkpoint's weights rounded to bf16: the same log-probs.
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        expected, _ = policy(ids, torch.ones_like(ids))
        got, _ = reference(ids, torch.ones_like(ids))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


class FakeClient:
    """The vLLM server's HTTP side, recording what it is told."""

    url = "http://fake"

    def __init__(self):
        self.update_info = None

    def update_weights(self, info):
        self.update_info = info

    def __getattr__(self, name):  # pause, start/finish_weight_update, reset_caches, resume
        return lambda *args, **kwargs: None


class FakeGroup:
    """The private gloo group to the server, recording every broadcast buffer."""

    def __init__(self):
        self.sent = []

    def broadcast(self, flat, src):
        self.sent.append(flat.clone())
        return types.SimpleNamespace(wait=lambda: None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, None])
def test_server_sync_sends_the_engine_dtype(tiny_dirs, dist_world, monkeypatch, dtype):
    from nanoalign.vllm_server import WeightSync

    policy = build_policy(str(tiny_dirs["tiny"]), Config(), device_mesh(1, torch.device("cpu")), bf16=False, trainable=True)
    group = FakeGroup()
    monkeypatch.setattr(WeightSync, "_init_gloo", lambda self: setattr(self, "group", group))
    client = FakeClient()
    sync = WeightSync(policy, client, rank=0, backend="gloo", bucket_mb=1, dtype=dtype)
    metrics = sync.sync()
    params = list(policy.hf.named_parameters())
    expected_dtype = dtype or torch.float32  # None: the parameters' own (fp32 master weights)
    assert set(client.update_info["dtype_names"]) == {str(expected_dtype).removeprefix("torch.")}
    assert {t.dtype for t in group.sent} == {expected_dtype}
    num_bytes = sum(p.numel() for _, p in params) * expected_dtype.itemsize
    assert sum(t.numel() * t.element_size() for t in group.sent) == num_bytes  # bf16: half of fp32's
    assert metrics["vllm/sync_mb"] == num_bytes / 1e6
    sent = torch.cat(group.sent)
    full = torch.cat([(p.full_tensor() if isinstance(p, DTensor) else p).detach().reshape(-1) for _, p in params])
    assert torch.equal(sent, full.to(expected_dtype))


def test_colocated_sync_loads_the_engine_dtype(tiny_dirs, dist_world, monkeypatch):
    # The vLLM pieces _load_weights calls, faked: what matters is what reaches load_weights.
    from nanoalign.vllm_colocate import VLLMColocate

    monkeypatch.setitem(sys.modules, "vllm.model_executor.model_loader.reload",
                        types.SimpleNamespace(initialize_layerwise_reload=lambda model: None))  # fmt: skip
    monkeypatch.setitem(sys.modules, "nanoalign.vllm_engine", types.SimpleNamespace(finish_reload=lambda *args: None))
    policy = build_policy(str(tiny_dirs["tiny"]), Config(), device_mesh(1, torch.device("cpu")), bf16=False, trainable=True)
    backend = object.__new__(VLLMColocate)
    backend.hf_model, backend.dtype, backend.model_dir, backend.device = policy.hf, torch.bfloat16, "tiny", "cpu"
    backend.llm = types.SimpleNamespace(llm_engine=types.SimpleNamespace(model_config=None))
    loaded = []
    engine_model = types.SimpleNamespace(load_weights=lambda weights: loaded.extend(weights))
    num_bytes, error = backend._load_weights(engine_model)
    assert error is None
    assert {t.dtype for _, t in loaded} == {torch.bfloat16}
    assert num_bytes == sum(p.numel() for p in policy.hf.parameters()) * 2


def test_tensor_parallel_groups_carry_objects_on_gloo(monkeypatch):
    from nanoalign.vllm_colocate import tensor_parallel_group

    made = []
    monkeypatch.setattr(dist, "new_group", lambda ranks, **kwargs: made.append((ranks, kwargs)) or len(made))
    assert tensor_parallel_group(rank=2, world_size=4, size=2) == 2  # ranks 2, 3: the second group
    assert made == [([0, 1], {"backend": "gloo"}), ([2, 3], {"backend": "gloo"})]
