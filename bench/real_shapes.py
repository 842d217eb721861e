"""Realistic shapes: Qwen2.5-VL-3B / 7B's widths and vocabulary at reduced depth, random weights, built here.

    python bench/real_shapes.py build --shape 3b                       # 2 text + 2 vision layers (543M params)
    python bench/real_shapes.py build --shape 7b --text-layers 1
    python bench/real_shapes.py breakdown --shape 3b                   # where a step's time and memory go

    from bench.real_shapes import build_real_model, real_rl_samples
    model_dir = build_real_model("3b")                                   # a directory train.py --model reads

Everything of the real checkpoint's config.json is kept (hidden and MLP widths, heads and KV heads,
the 151,936-row vocabulary with tied embeddings for 3B, 152,064 untied for 7B, M-RoPE, the vision
tower's 1280 width, 14-px patches, 2x2 merge, 112-px windows) except the depth, which is cut to what
two CPU cores step in tens of seconds: --text-layers and --vision-layers (default 2 and 2). The
vision tower keeps its attention pattern: in the real 32 blocks every 8th is full attention and
the others windowed; a cut tower keeps block 8k+7 full, and at least its last block. What scales
with depth (the per-layer time and activations) is measured per layer; what does not (embedding,
lm_head and log-softmax over the vocabulary, the patch embedding and merger) is measured whole.

The tokenizer and chat template are nanoalign's tiny ones (a 1,024-token BPE, trained here): the
model's vocabulary is the real 151,936 rows, of which the tokenizer uses the first ~1,000, so the
embedding, lm_head and log-softmax cost what they cost in the real model; a sampled id beyond the
tokenizer's decodes to nothing. The image processor is Qwen2.5-VL's with its real pixel limits
(3,136 to 12,845,056 pixels): a 448-px image is 32 x 32 patches = 256 image tokens after the merge.

The task: the built-in shapes prompts with one `--image-size` px image each (~290 prompt tokens at
448 px), completions of `--completion-tokens` tokens (random weights never stop on their own).
"""

import argparse
import dataclasses
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The text and vision configs of Qwen/Qwen2.5-VL-3B-Instruct and -7B-Instruct (config.json), depth aside.
VISION = {"hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "patch_size": 14, "spatial_merge_size": 2,
          "temporal_patch_size": 2, "window_size": 112, "hidden_act": "silu", "tokens_per_second": 2}  # fmt: skip
REAL_DEPTH = {"text": {"3b": 36, "7b": 28}, "vision": 32}
SHAPES = {
    "3b": {"hidden_size": 2048, "intermediate_size": 11008, "num_attention_heads": 16, "num_key_value_heads": 2,
           "vocab_size": 151936, "tie_word_embeddings": True},
    "7b": {"hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28, "num_key_value_heads": 4,
           "vocab_size": 152064, "tie_word_embeddings": False},
}  # fmt: skip
TEXT = {"rope_theta": 1000000.0, "mrope_section": [16, 24, 24], "rms_norm_eps": 1e-6, "max_position_embeddings": 128000}
PIXELS = {"shortest_edge": 3136, "longest_edge": 12845056}  # Qwen2.5-VL's min_pixels / max_pixels


def full_attention_blocks(depth: int) -> list[int]:
    """The full-attention vision blocks of a tower cut to `depth`: 7, 15, 23, 31 as in the real one,
    and at least the last block (the merger reads full-attention features in every real model)."""
    return [i for i in range(depth) if i % 8 == 7] or [depth - 1]


def real_config(shape: str, text_layers: int, vision_layers: int):
    """The Qwen2_5_VLConfig of `shape` ("3b" or "7b") at the given depths, with the tiny tokenizer's special ids."""
    from transformers import Qwen2_5_VLConfig

    from nanoalign.tiny import ensure_tiny

    tiny = Qwen2_5_VLConfig.from_pretrained(ensure_tiny("tiny"))
    widths = SHAPES[shape]
    text = tiny.text_config.to_dict()
    text.update(
        hidden_size=widths["hidden_size"], intermediate_size=widths["intermediate_size"], num_hidden_layers=text_layers,
        num_attention_heads=widths["num_attention_heads"], num_key_value_heads=widths["num_key_value_heads"],
        vocab_size=widths["vocab_size"], rms_norm_eps=TEXT["rms_norm_eps"], max_position_embeddings=TEXT["max_position_embeddings"],
        layer_types=["full_attention"] * text_layers, tie_word_embeddings=widths["tie_word_embeddings"],
        rope_parameters={"rope_type": "default", "rope_theta": TEXT["rope_theta"], "mrope_section": TEXT["mrope_section"]},
    )  # fmt: skip
    vision = tiny.vision_config.to_dict()
    vision.update(VISION, depth=vision_layers, out_hidden_size=widths["hidden_size"], fullatt_block_indexes=full_attention_blocks(vision_layers))
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=tiny.image_token_id, video_token_id=tiny.video_token_id,
        vision_start_token_id=tiny.vision_start_token_id, vision_end_token_id=tiny.vision_end_token_id,
        tie_word_embeddings=widths["tie_word_embeddings"],
    )  # fmt: skip


def real_processor():
    """The tiny model's processor (tokenizer, chat template) with Qwen2.5-VL's real pixel limits."""
    from transformers import AutoProcessor

    from nanoalign.tiny import ensure_tiny

    processor = AutoProcessor.from_pretrained(ensure_tiny("tiny"))
    processor.image_processor.size = dict(PIXELS)
    return processor


def build_real_model(shape: str = "3b", text_layers: int = 2, vision_layers: int = 2, out: str | Path | None = None) -> Path:
    """The directory of a random-init Qwen2.5-VL with `shape`'s widths at the given depths (built on
    first use, fp32 safetensors; cached next to the built-in models unless `out` is given)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from nanoalign.tiny import cache_dir, ensure_tiny

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)}")
    if text_layers < 1 or vision_layers < 1:
        raise ValueError(f"--text-layers and --vision-layers must be >= 1 (got {text_layers}, {vision_layers})")
    out = Path(out) if out else cache_dir() / f"real-qwen25vl-{shape}-t{text_layers}v{vision_layers}"
    if (out / "config.json").exists():
        return out
    tiny = ensure_tiny("tiny")
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(real_config(shape, text_layers, vision_layers))
    tiny_generation = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny).generation_config
    model.generation_config.eos_token_id = tiny_generation.eos_token_id
    model.generation_config.pad_token_id = tiny_generation.pad_token_id
    processor = real_processor()
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


@dataclasses.dataclass(frozen=True)
class Task:
    """The realistic task's sizes."""

    image_size: int = 448  # px a side: 256 image tokens
    completion_tokens: int = 128


def real_rl_samples(num_prompts: int, task: Task = Task()) -> list[dict]:
    """`num_prompts` RL samples of the shapes task (prompt + one image of task.image_size px)."""
    from nanoalign.shapes import shapes_sample

    return [{**shapes_sample("train", i, "rl", image_size=task.image_size), "sample_id": f"train/{i}"} for i in range(num_prompts)]


def describe(model_dir: Path) -> dict:
    """Parameter counts (total, embedding + lm_head, vision tower, text_layers = the decoder's other
    parameters) and the config's widths and depths."""
    import json

    from bench.common import num_params

    config = json.loads((Path(model_dir) / "config.json").read_text())
    text, vision = config.get("text_config", config), config["vision_config"]
    return {
        **num_params(str(model_dir)),
        "hidden": text["hidden_size"], "vocab": text["vocab_size"], "num_text_layers": text["num_hidden_layers"],
        "vision_hidden": vision["hidden_size"], "num_vision_layers": vision["depth"],
        "full_attention_blocks": vision["fullatt_block_indexes"], "tied": config.get("tie_word_embeddings"),
    }  # fmt: skip


def add_shape_flags(parser) -> None:
    parser.add_argument("--shape", choices=sorted(SHAPES), default="3b", help="whose widths: Qwen2.5-VL-3B or -7B")
    parser.add_argument("--text-layers", type=int, default=2, help=f"decoder layers (real: {REAL_DEPTH['text']})")
    parser.add_argument("--vision-layers", type=int, default=2, help=f"vision blocks (real: {REAL_DEPTH['vision']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build (or find) the model and print its directory and sizes")
    add_shape_flags(build)
    build.add_argument("--out", default=None, help="directory to write (default: next to the built-in models)")
    breakdown = sub.add_parser("breakdown", help="where one step's time and memory go (bench/step_breakdown.py)")
    add_shape_flags(breakdown)
    args, rest = parser.parse_known_args()
    if args.command == "build":
        import json

        path = build_real_model(args.shape, args.text_layers, args.vision_layers, args.out)
        print(path)
        print(json.dumps(describe(path), indent=2))
    else:
        from bench import step_breakdown

        step_breakdown.main([*rest, "--model", str(build_real_model(args.shape, args.text_layers, args.vision_layers))])


if __name__ == "__main__":
    main()
