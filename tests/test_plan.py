"""nanoalign.plan: the memory a run needs per GPU, from the model's config alone.

How close its figures come to measured peaks is a benchmark's question (bench/plan_check.py,
BENCHMARKS.md); these tests check what it reads, its arithmetic and its advice.
"""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from nanoalign.config import PRESETS
from nanoalign.plan import GIB, Shape, main, plan, read_shape

CONFIGS = Path(__file__).resolve().parents[1] / "bench" / "configs"


def test_read_shape_needs_only_the_config(tiny_dirs, tmp_path):
    from bench.common import load_hf_model
    from nanoalign.model import decoder_layers, vision_module

    shutil.copy(Path(tiny_dirs["tiny"]) / "config.json", tmp_path / "config.json")  # no weights, no tokenizer
    shape = read_shape(str(tmp_path))
    model = load_hf_model(str(tiny_dirs["tiny"]))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert shape.total == count(model)
    assert shape.vision == count(vision_module(model))
    assert shape.layer == count(decoder_layers(model)[0]) and shape.layers == len(decoder_layers(model))


@pytest.mark.parametrize("name, total", [("qwen2.5-vl-3b", 3.75e9), ("qwen2.5-vl-7b", 8.29e9)])
def test_the_public_qwen25_vl_sizes(name, total):
    # The model cards' parameter counts (3.75B, 8.29B); 7B's untied lm_head sits in the root unit.
    shape = read_shape(str(CONFIGS / name))
    assert shape.total == pytest.approx(total, rel=2e-3)
    assert shape.vision == pytest.approx(0.67e9, rel=0.02)
    assert shape.root > 2 * shape.vocab * shape.hidden if name.endswith("7b") else shape.root < 2 * shape.vocab * shape.hidden


SHAPE = Shape(total=1000, vision=100, root=200, layer=100, block=10, layers=8, hidden=4, intermediate=8, kv_width=2, vocab=10,
              blocks=4, vision_hidden=2, vision_intermediate=4, patch_pixels=4, merge=4)  # fmt: skip
KW = {"gpus": 2, "device": "cuda", "row_length": 10, "prompt_length": 6, "image_pixels": 16, "gpu_memory_gib": 1.0,
      "needs_reference": False}  # fmt: skip


def test_plan_counts_shards_and_the_reference_by_hand():
    cfg = dataclasses.replace(PRESETS["sft"](), batch_size=2)
    c = plan(SHAPE, cfg, **KW)
    assert c["parameters"] == 4 * 1000 / 2  # fp32 shards
    assert c["gradients"] == 4 * 1000 / 2 and c["optimizer"] == 8 * 1000 / 2
    assert c["gathered units"] == 2 * (200 + 2 * 100)  # the root and two layers, bf16 on a GPU
    with_ref = plan(SHAPE, cfg, **{**KW, "needs_reference": True})
    assert with_ref["parameters"] - c["parameters"] == 2 * 1000 / 2  # the reference in bf16 shards
    frozen = plan(SHAPE, dataclasses.replace(cfg, freeze_vision=True), **KW)
    assert frozen["optimizer"] == 8 * 900 / 2
    # The per-token layer formula at b = 2: (4 + 2) 2 H + 2 (3 H + 2 KV) + 4 * 2 I, KV = H for padded rows:
    # 6 * 2 * 4 + 2 * (12 + 8) + 8 * 8 = 48 + 40 + 64 = 152 bytes; 2 rows x 10 tokens x 8 layers.
    text = 152 * 20 * 8
    # vision, per patch: 6 * 2 * 2 + 2 * (6 + 4) + 8 * 4 = 24 + 20 + 32 = 76 bytes; 2 images x 4 patches x 4 blocks
    heads = 20 * 3 * 2 * 4
    assert c["activations"] == text + 76 * 8 * 4 + heads + 152 * 20  # + one layer's working set in backward
    ckpt = plan(SHAPE, dataclasses.replace(cfg, activation_checkpointing=True), **KW)
    assert ckpt["activations"] < c["activations"]
    assert c["CUDA context, NCCL (estimate)"] == 2 * GIB and c["total"] == c["peak"] + 2 * GIB
    assert "CUDA context, NCCL (estimate)" not in plan(SHAPE, cfg, **{**KW, "device": "cpu"})


def test_plan_counts_in_process_generation_and_vllm():
    cfg = dataclasses.replace(PRESETS["grpo"](), batch_size=4, num_generations=2, max_completion_length=4)
    c = plan(SHAPE, cfg, **KW)
    # Generation: the whole model gathered in bf16 and the KV cache of 4 rows x (6 + 4) tokens x 8 layers x 2 x 2 x 2 bytes.
    assert c["generation: gathered model"] == 2 * 1000
    assert c["generation: KV cache"] == 4 * 10 * 8 * 2 * 2 * 2
    assert c["peak"] == max(c["train_peak"], c["generation_peak"])
    colocated = plan(SHAPE, dataclasses.replace(cfg, vllm_mode="colocate", vllm_gpu_memory_utilization=0.5), **KW)
    assert "generation: KV cache" not in colocated  # vLLM samples, in its own reservation
    assert colocated["vLLM reservation"] == 0.5 * GIB
    assert colocated["total"] == colocated["peak"] + 0.5 * GIB + 2 * GIB


def test_cli_prints_components_and_flags_that_make_a_run_fit(capsys):
    model = str(CONFIGS / "qwen2.5-vl-7b")
    args = ["--model", model, "--algo", "grpo", "--gpus", "8", "--max-length", "4096", "--max-completion-length", "1024",
            "--batch-size", "16", "--num-generations", "8", "--json"]  # fmt: skip
    main(args)
    out = json.loads(capsys.readouterr().out)
    assert not out["fits"] and "--activation-checkpointing" in out["flags_to_fit"]
    # The advice, applied, fits.
    fixed = [*args[:-1]]
    for flag in out["flags_to_fit"]:
        name, *value = flag.split(" (")[0].split()
        fixed = [a for i, a in enumerate(fixed) if a != name and (i == 0 or fixed[i - 1] != name)] + [name, *value]
    main([*fixed, "--json"])
    assert json.loads(capsys.readouterr().out)["fits"]


def test_cli_refuses_what_train_py_refuses():
    with pytest.raises(ValueError, match="--batch-size 6 must be a multiple of --num-generations 8"):
        main(["--model", str(CONFIGS / "qwen2.5-vl-3b"), "--algo", "grpo", "--batch-size", "6", "--json"])
    with pytest.raises(SystemExit):
        main(["--model", str(CONFIGS / "qwen2.5-vl-3b"), "--algo", "ppo"])
