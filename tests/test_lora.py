"""LoRA (nanoalign/lora.py) for every algorithm, on the tiny models (every built-in family where it says so):

  * which layers (every family): every linear layer of the language model by default, found by
    structure (PEFT's "all-linear" set with --lora-vision); --lora-target-modules narrows it; typos fail;
  * B = 0 at the start (every family): the adapted policy's log-probs ARE the base model's, bit for
    bit; with trained adapters the reference (the policy with its adapters off) still gives the base's;
  * 2 FSDP ranks = 1 process: loss and every adapter's gradient (vision tower included); no base
    weight gets a gradient, and only adapters are trainable (what train.py hands the optimizer);
  * every algorithm runs 2 steps with LoRA (finite losses), the KL/DPO reference and
    --precompute-ref-logps included; bf16 (a bf16 frozen base beside fp32 adapters) on 2 ranks;
  * export (every family): the adapter in PEFT's format loaded with peft.PeftModel.from_pretrained on
    the base, and the merged checkpoint, give the trainer's log-probs; a train.py run's merged export is the base
    plus (alpha / r) B A exactly where adapted and the base itself elsewhere (the base did not change);
  * a run stopped after a checkpoint (an exception, a SIGKILL) resumes exactly; the checkpoint holds
    only adapters;
  * vLLM (server and colocated): after a sync of the merged adapted layers, vLLM's log-probs equal the
    trainer's (1e-5, fp32), and only those layers' bytes are sent (with their fused siblings when
    --lora-target-modules picks some); server mode over NCCL is refused.
"""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import crash_after_checkpoint, family_params, kill_at_first_checkpoint, one_thread, torchrun
from lora_worker import RANK, lora_policy, lora_step, set_B
from parity_worker import parity_samples
from safetensors.torch import load_file
from torch.testing import assert_close

import train as train_module
from nanoalign import lora
from nanoalign.checkpoint import latest_checkpoint
from nanoalign.config import Config, check_config
from nanoalign.loading import export_hf
from nanoalign.metrics import read_metrics
from nanoalign.model import Policy, build_policy, load_processor, stop_and_pad_ids
from nanoalign.preference import encode_pairs
from nanoalign.runtime import Run, device_mesh

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


def pair_batch(model_dir: str):
    """The 4 parity preference pairs encoded as 8 rows (prompt + chosen / rejected), the loss mask = answers."""
    processor = load_processor(model_dir)
    run = Run(Config(max_length=512), processor, None, None, 0, 1, torch.device("cpu"), *stop_pad(processor, model_dir))
    return encode_pairs(parity_samples("preference"), run)


def stop_pad(processor, model_dir):
    from bench.common import load_hf_model

    return stop_and_pad_ids(processor, load_hf_model(model_dir))


@torch.no_grad()
def logps(policy, batch) -> torch.Tensor:
    return policy(**batch.model_inputs(), logps_mask=batch.mask)[0] * batch.mask  # (B, T), answers only


# -----------------------------------------------------------------------------
# which layers


@pytest.mark.parametrize("name", family_params())
def test_default_targets_are_the_language_models_linear_layers(name, load_family):
    from peft import LoraConfig, get_peft_model

    _, model, _ = load_family(name)
    decoder = model.get_decoder()
    default = lora.target_layers(model)
    assert default and all(isinstance(m, torch.nn.Linear) for m in default.values())
    assert set(default.values()) == {m for m in decoder.modules() if isinstance(m, torch.nn.Linear)}
    assert not any(m is model.get_output_embeddings() for m in default.values())  # lm_head is never adapted
    with_vision = lora.target_layers(model, vision=True)
    assert len(with_vision) > len(default)
    only_q = lora.target_layers(model, ("q_proj",))
    assert only_q and all(n.endswith(".q_proj") for n in only_q)
    with pytest.raises(ValueError, match="--lora-target-modules qproj: no linear layer"):
        lora.target_layers(model, ("qproj",))
    # --lora-vision is PEFT's "all-linear": every linear layer but the output layer (vision tower, projector)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))
    injected = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    assert injected == set(with_vision)


def test_sync_sends_the_adapted_layers_and_their_linear_siblings(load_family):
    # vLLM fuses q/k/v (and gate/up) into one weight: adapting q_proj alone must still send k_proj and v_proj
    _, model, _ = load_family("tiny")
    assert len(lora.sync_parameters(model)) == len(list(model.parameters()))  # full fine-tuning: everything
    lora.add_adapters(model, Config(lora_rank=2, lora_target_modules=("q_proj",)))
    sent = [name for name, _ in lora.sync_parameters(model)]
    attention = [f"{n}.weight" for n, m in model.get_decoder().named_modules()
                 if isinstance(m, torch.nn.Linear) and ".self_attn." in n and not lora.is_adapter(n + ".")]  # fmt: skip
    assert sent == [f"model.language_model.{n}" for n in attention]  # q, k, v, o of every layer; no MLP, no vision


def test_server_sync_over_nccl_is_refused_with_lora(load_family):
    # vLLM's NCCL transfer (server mode on GPUs) sends every parameter as it is: adapters unmerged
    from nanoalign.vllm_server import WeightSync

    _, model, _ = load_family("tiny")
    lora.add_adapters(model, Config(lora_rank=2))
    with pytest.raises(ValueError, match="--lora-rank with --vllm-mode server: vLLM's NCCL weight transfer"):
        WeightSync(model, None, rank=1, backend="nccl")


def test_lora_flags_are_checked():
    check_config(Config(lora_rank=8, lora_alpha=16.0, lora_vision=True))
    with pytest.raises(ValueError, match="--lora-alpha does nothing without --lora-rank"):
        check_config(Config(lora_alpha=32.0))
    with pytest.raises(ValueError, match="--lora-rank must be >= 0"):
        check_config(Config(lora_rank=-1))
    with pytest.raises(ValueError, match="--freeze-vision does nothing with --lora-rank"):
        check_config(Config(lora_rank=4, freeze_vision=True))


# -----------------------------------------------------------------------------
# exactness: B = 0 start, the reference, parity over ranks


@pytest.mark.parametrize("name", family_params())
def test_zero_B_start_and_the_reference_are_the_base_model_exactly(name, tiny_dirs, dist_world):
    from nanoalign.tiny import ensure_tiny

    model_dir = str(ensure_tiny(name))
    batch = pair_batch(model_dir)
    _, policy = lora_policy(model_dir, "dpo", 1, torch.device("cpu"))
    base = build_policy(model_dir, Config(logps_chunk_size=32), device_mesh(1, torch.device("cpu")), bf16=False, trainable=False)
    base_logps = logps(base, batch)
    assert torch.equal(logps(policy, batch), base_logps)  # B = 0: not close, equal
    set_B(policy, seed=3)  # trained adapters, in effect
    adapted = logps(policy, batch)
    assert (adapted - base_logps).abs().max() > 1e-2
    reference = lora.without_adapters(policy)
    assert torch.equal(logps(reference, batch), base_logps)  # the reference of DPO/MPO/KL: the base itself
    assert torch.equal(logps(policy, batch), adapted)  # and the adapters are back on afterwards


def test_bf16_keeps_the_frozen_base_in_bf16_with_the_same_numbers(tiny_dirs, dist_world):
    # --dtype bfloat16: FSDP2 computes in bf16 either way; a LoRA run also stores its frozen base in bf16
    # (half the memory) and, B = 0, gives the bf16 base model's log-probs exactly.
    model_dir = str(tiny_dirs["tiny"])
    batch = pair_batch(model_dir)
    mesh = device_mesh(1, torch.device("cpu"))
    cfg = Config(logps_chunk_size=32, lora_rank=RANK)
    policy = build_policy(model_dir, cfg, mesh, bf16=True, trainable=True)
    adapters = {p.dtype for n, p in policy.hf.named_parameters() if lora.is_adapter(n)}
    frozen = {p.dtype for n, p in policy.hf.named_parameters() if not lora.is_adapter(n)}
    assert adapters == {torch.float32} and frozen == {torch.bfloat16}
    base = build_policy(model_dir, Config(logps_chunk_size=32), mesh, bf16=True, trainable=False)  # fp32 shards, bf16 compute
    assert torch.equal(logps(policy, batch), logps(base, batch))


def test_two_ranks_match_one_process_and_only_adapters_train(tiny_dirs, dist_world, tmp_path):
    model_dir = str(tiny_dirs["tiny"])
    out = tmp_path / "two_ranks.pt"
    proc = torchrun(str(TESTS / "lora_worker.py"), model_dir, str(out), "sft", "dpo", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    two = torch.load(out)
    for algo in ("sft", "dpo"):
        one = lora_step(model_dir, algo)
        assert one["base_grads"] == [] and two[algo]["base_grads"] == [], "a frozen base weight got a gradient"
        assert_close(two[algo]["loss"], one["loss"], rtol=1e-6, atol=1e-6)
        assert one["grads"].keys() == two[algo]["grads"].keys()
        assert any(".visual." in name for name in one["grads"])  # --lora-vision: the tower's adapters too
        for name, grad in one["grads"].items():
            assert grad.abs().sum() > 0, f"{algo} {name}: no gradient reached it"
            assert_close(two[algo]["grads"][name], grad, msg=lambda m: f"{algo} {name}: {m}")  # noqa: B023


def test_only_adapters_are_trainable(tiny_dirs, dist_world):
    # train.py hands the optimizer (and the gradient clipping) the parameters that require a gradient
    _, policy = lora_policy(str(tiny_dirs["tiny"]), "sft", 1, torch.device("cpu"))
    trainable = [n for n, p in policy.hf.named_parameters() if p.requires_grad]
    assert trainable and all(lora.is_adapter(n) for n in trainable)
    assert len(trainable) == 2 * len(lora.adapted_layers(policy.hf))


# -----------------------------------------------------------------------------
# every algorithm, through train.py


def run_train(out_dir, algo: str, *flags: str) -> dict:
    argv = ["--algo", algo, "--model", "tiny", "--out-dir", str(out_dir), "--max-steps", "2", "--warmup-steps", "1",
            "--eval-split", "", "--save-every", "0", "--lora-rank", "8", "--lr", "1e-2", *flags]  # fmt: skip
    return train_module.train(train_module.parse_config(argv))


RL = ["--batch-size", "8", "--max-completion-length", "16", "--reward-funcs", "toy_rewards:shorter", "--reward-weights", "1.0"]
ALGO_FLAGS = {
    "sft": ["--batch-size", "4"],
    "dpo": ["--batch-size", "4"],
    "dpo-precomputed": ["--batch-size", "4", "--precompute-ref-logps", "--num-shapes-samples", "16"],  # the table, from the base
    "mpo": ["--batch-size", "4"],
    "grpo": [*RL, "--num-generations", "4", "--beta", "0.05"],  # beta > 0: a KL term against the base
    "gspo": [*RL, "--num-generations", "4"],
    "rloo": [*RL, "--num-generations", "2"],
    "online_dpo": [*RL, "--num-generations", "2"],
}


@pytest.mark.parametrize("name", list(ALGO_FLAGS))
def test_every_algorithm_trains_with_lora(name, tiny_dirs, tmp_path):
    run_train(tmp_path, name.split("-")[0], *ALGO_FLAGS[name], "--no-export")
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["step"] > 0]
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records), records
    assert records[-1]["grad_norm"] > 0  # the adapters learn something


def test_bf16_lora_trains_on_two_ranks(tiny_dirs, tmp_path):
    # FSDP2 groups then hold a bf16 frozen base beside fp32 adapters (it asks one dtype of trained weights only)
    proc = torchrun("train.py", "--algo", "dpo", "--model", "tiny", "--out-dir", str(tmp_path), "--max-steps", "2",
                    "--batch-size", "2", "--eval-split", "", "--save-every", "0", "--no-export", "--dtype", "bfloat16",
                    "--lora-rank", "8", "--lr", "1e-2", "--warmup-steps", "1", timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["step"] > 0]
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records), records
    assert records[-1]["grad_norm"] > 0


def test_resume_after_crash_continues_exactly_from_an_adapter_checkpoint(tiny_dirs, tmp_path, monkeypatch):
    def argv(out) -> list[str]:
        return ["--algo", "sft", "--model", "tiny", "--out-dir", str(out), "--max-steps", "4", "--warmup-steps", "1",
                "--eval-split", "", "--save-every", "2", "--lora-rank", "8", "--lr", "1e-2", "--batch-size", "2",
                "--num-shapes-samples", "64", "--no-export"]  # fmt: skip

    train_module.train(train_module.parse_config(argv(tmp_path / "full")))
    crash_after_checkpoint(monkeypatch, 2, argv(tmp_path / "cut"))
    ckpt = latest_checkpoint(tmp_path / "cut")
    saved = dcp.FileSystemReader(ckpt).read_metadata().state_dict_metadata
    model_keys = [k for k in saved if k.startswith("model.")]
    assert model_keys and all(lora.is_adapter(k) for k in model_keys), model_keys[:5]  # adapters only: megabytes
    train_module.train(train_module.parse_config(argv(tmp_path / "cut")))
    full, cut = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("full", "cut"))
    assert [r["step"] for r in cut] == [1, 2, 3, 4]
    for a, b in zip(full, cut):
        for key in ("loss", "grad_norm", "lr"):
            assert_close(b[key], a[key], rtol=1e-6, atol=1e-7, msg=f"step {a['step']} {key}")


@pytest.mark.filterwarnings("ignore:Detected an existing checkpoint")  # a half-written one may be rewritten
def test_resume_after_sigkill_continues_exactly(tiny_dirs, tmp_path):
    # as tests/test_sft_train.py's: `python train.py` SIGKILLed once a checkpoint exists, at a constant LR
    def argv(out, steps: int) -> list[str]:
        return ["--algo", "sft", "--model", "tiny", "--out-dir", str(out), "--max-steps", str(steps), "--warmup-steps", "0",
                "--min-lr-ratio", "1.0", "--eval-split", "", "--save-every", "2", "--lora-rank", "8", "--lr", "1e-2",
                "--batch-size", "2", "--num-shapes-samples", "64", "--no-export"]  # fmt: skip

    killed = tmp_path / "killed"
    kill_at_first_checkpoint(argv(killed, 10_000), killed, tmp_path / "killed.log", timeout=300)
    resumed_from = int(latest_checkpoint(killed).name.removeprefix("step_"))
    end = resumed_from + 2
    train_module.train(train_module.parse_config(argv(killed, end)))
    train_module.train(train_module.parse_config(argv(tmp_path / "reference", end)))
    reference = {r["step"]: r for r in read_metrics(tmp_path / "reference" / "metrics.jsonl")}
    resumed = read_metrics(killed / "metrics.jsonl")[-2:]
    assert [r["step"] for r in resumed] == [resumed_from + 1, end]
    for record in resumed:
        for key in ("loss", "grad_norm"):
            assert_close(record[key], reference[record["step"]][key], rtol=1e-6, atol=1e-7, msg=f"step {record['step']} {key}")


# -----------------------------------------------------------------------------
# export


@pytest.mark.parametrize("name", family_params())
def test_peft_adapter_and_merged_export_give_the_trainers_logps(name, tiny_dirs, dist_world, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from nanoalign.tiny import ensure_tiny

    model_dir = str(ensure_tiny(name))
    batch = pair_batch(model_dir)
    _, policy = lora_policy(model_dir, "sft", 1, torch.device("cpu"))
    set_B(policy, seed=5)
    trainer = logps(policy, batch)
    lora.save_adapter(policy.hf, tmp_path / "adapter", 0, model_dir)
    export_hf(policy, load_processor(model_dir), tmp_path / "merged", 0)
    base = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    base_logps = logps(Policy(base, 32).eval(), batch)
    assert (trainer - base_logps).abs().max() > 1e-2  # so a silently unloaded adapter would fail below
    # float rounding only: W x + s B (A x) vs (W + s B A) x (Gemma 4's log-probs, ~6 in size, differ by up to 2e-5)
    PeftModel.from_pretrained(base, str(tmp_path / "adapter"))  # injects the adapters into `base` in place
    assert_close(logps(Policy(base, 32).eval(), batch), trainer, rtol=1e-5, atol=1e-5)
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert_close(logps(Policy(merged, 32).eval(), batch), trainer, rtol=1e-5, atol=1e-5)


def test_train_exports_adapter_and_merged_and_leaves_the_base_unchanged(tiny_dirs, tmp_path):
    """A 2-step train.py run: its merged export is the base plus (alpha / r) B A on the adapted layers
    (B, A read from its PEFT adapter) and the base itself, bit for bit, everywhere else."""
    run_train(tmp_path, "sft", "--batch-size", "4", "--lora-alpha", "4")
    merged = load_file(tmp_path / "final" / "model.safetensors")
    base = load_file(Path(tiny_dirs["tiny"]) / "model.safetensors")
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 4 and config["peft_type"] == "LORA"
    assert merged.keys() == base.keys()
    from transformers import AutoConfig, AutoModelForImageTextToText

    from nanoalign.loading import checkpoint_to_model_names

    model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(tiny_dirs["tiny"]))
    to_checkpoint = checkpoint_to_model_names(model, base.keys())  # model name -> checkpoint name
    adapted = set()
    for layer in config["target_modules"]:
        A, B = adapter[f"base_model.model.{layer}.lora_A.weight"], adapter[f"base_model.model.{layer}.lora_B.weight"]
        key = to_checkpoint[f"{layer}.weight"]
        assert B.abs().max() > 0, f"{layer}: B never moved"
        assert_close(merged[key], base[key] + 0.5 * B @ A, rtol=0, atol=1e-6)  # alpha / r = 4 / 8
        adapted.add(key)
    for key in base.keys() - adapted:
        assert torch.equal(merged[key], base[key]), f"{key}: a frozen weight changed"


# -----------------------------------------------------------------------------
# vLLM: merged adapted layers synced, log-prob parity


def synced_mb(model_dir: str) -> float:
    """The bytes of the language model's linear weights (what a LoRA sync sends), in MB."""
    from bench.common import load_hf_model

    return sum(m.weight.numel() * 4 for m in lora.target_layers(load_hf_model(model_dir)).values()) / 1e6


def check_vllm_run(out_dir, model_dir: str) -> None:
    records = [r for r in read_metrics(Path(out_dir) / "metrics.jsonl") if r["step"] > 0]
    synced = [r["vllm/logp_abs_diff"] for r in records if r["step"] % 2 == 1]  # steps that began with a sync
    stale = [r["vllm/logp_abs_diff"] for r in records if r["step"] % 2 == 0]  # one update behind
    print(f"\nLoRA: logp gap after a sync {max(synced):.2g}, one update behind {min(stale):.2g}")
    assert max(synced) < 1e-5, synced
    assert min(stale) > 1e-5, stale  # the adapters moved: the sync is what makes them equal
    sizes = {round(r["vllm/sync_mb"], 6) for r in records if "vllm/sync_mb" in r}
    assert sizes == {round(synced_mb(model_dir), 6)}, sizes  # the adapted layers only, not the whole model


VLLM_RL = ["--algo", "grpo", "--max-steps", "4", "--vllm-sync-every", "2", "--batch-size", "8", "--num-generations", "4",
           "--max-completion-length", "16", "--reward-funcs", "toy_rewards:shorter", "--reward-weights", "1.0",
           "--lr", "2e-2", "--warmup-steps", "1", "--eval-split", "", "--save-every", "0", "--lora-rank", "8"]  # fmt: skip


@pytest.mark.vllm
def test_vllm_server_sync_of_merged_adapters(tmp_path):
    from test_vllm import run_train as run_script
    from test_vllm import serving

    from nanoalign.tiny import build_tiny

    model_dir = str(build_tiny("tiny", tmp_path / "tiny"))
    with serving(model_dir, tmp_path / "server.log", max_model_len=512) as (url, _):
        run_script([*VLLM_RL, "--model", model_dir, "--out-dir", str(tmp_path / "run"), "--vllm-mode", "server",
                    "--vllm-url", url, "--no-export"], nproc=2)  # fmt: skip
    check_vllm_run(tmp_path / "run", model_dir)


@pytest.mark.vllm
@pytest.mark.parametrize("targets", [[], ["--lora-target-modules", "q_proj", "down_proj"]], ids=["all-linear", "q-down"])
def test_vllm_colocated_sync_of_merged_adapters(targets, tiny_dirs, tmp_path):
    # q-down: their siblings (k, v, o; gate, up) are sent too, else vLLM's fused qkv/gate_up weights would
    # be part garbage (the first step's gradient was NaN); so the bytes are the same as all-linear's
    from test_vllm import run_train as run_script

    model_dir = str(tiny_dirs["tiny"])
    run_script([*VLLM_RL, *targets, "--model", model_dir, "--out-dir", str(tmp_path), "--vllm-mode", "colocate",
                "--vllm-max-model-len", "512", "--no-export"], nproc=2)  # fmt: skip
    check_vllm_run(tmp_path, model_dir)
