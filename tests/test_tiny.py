"""Tests for nanoalign/tiny.py: deterministic builds that load like real checkpoints."""

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from nanoalign.tiny import TINY_VERSION, build_tiny, cache_dir, ensure_tiny
from train import parse_config

from conftest import CORE_FAMILIES  # noqa: E402


def test_cache_dir_follows_env(tiny_dirs, nanoalign_cache):
    # conftest points NANOALIGN_CACHE at a temporary directory; the built-ins must land there.
    assert cache_dir() == nanoalign_cache
    for name, path in tiny_dirs.items():
        assert path == nanoalign_cache / f"{name}-{TINY_VERSION}"
        assert ensure_tiny(name) == path  # second call: cached, same directory


@pytest.mark.parametrize("name", CORE_FAMILIES)
def test_build_is_byte_identical(name, tiny_dirs, tmp_path):
    # Building again elsewhere must give the very same files, byte for byte (weights, tokenizer,
    # processor and templates), so a cache built on one machine equals one built on another.
    again = build_tiny(name, tmp_path / name)
    first = {p.relative_to(tiny_dirs[name]): p.read_bytes() for p in tiny_dirs[name].rglob("*") if p.is_file()}
    second = {p.relative_to(again): p.read_bytes() for p in again.rglob("*") if p.is_file()}
    assert "model.safetensors" in {str(p) for p in first}
    assert first.keys() == second.keys()
    for rel in first:
        assert first[rel] == second[rel], f"{name}: {rel} differs between two builds"
    # Atomic build: no temporary directory is left next to the output.
    assert [p.name for p in tmp_path.iterdir()] == [name]


@pytest.mark.parametrize("name", CORE_FAMILIES)
def test_loads_through_auto_classes(name, tiny_dirs):
    model = AutoModelForImageTextToText.from_pretrained(tiny_dirs[name], dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(tiny_dirs[name])
    expected = {"tiny": "Qwen2_5_VLForConditionalGeneration", "tiny-llava": "LlavaForConditionalGeneration"}[name]
    assert type(model).__name__ == expected
    text = model.config.text_config
    # vLLM's CPU attention needs head_dim 64: hidden 128 / 2 heads = 64.
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    assert head_dim == 64
    assert text.hidden_size // text.num_attention_heads == 64
    # The embedding table covers the whole tokenizer (special tokens included).
    assert model.get_input_embeddings().weight.shape[0] == len(processor.tokenizer)
    # Special tokens are single tokens (the chat template and the batch builder rely on it).
    image_token = processor.image_token
    assert len(processor.tokenizer(image_token, add_special_tokens=False)["input_ids"]) == 1


@pytest.mark.parametrize(
    "name, prefix, generation_prompt, end_of_turn",
    [
        # Qwen2.5-VL: a default system turn, <|vision_start|><|image_pad|><|vision_end|> per image,
        # and "<|im_start|>assistant\n" as the generation prompt.
        ("tiny", "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                 "<|vision_start|><|image_pad|><|vision_end|>How many?<|im_end|>\n", "<|im_start|>assistant\n", "<|im_end|>\n"),
        # LLaVA-1.5: "USER: <image>\nquestion ASSISTANT: answer</s>".
        ("tiny-llava", "USER: <image>\nHow many? ", "ASSISTANT: ", "</s>"),
    ],
)  # fmt: skip
def test_chat_template_renders_generation_prompt(name, prefix, generation_prompt, end_of_turn, tiny_dirs):
    processor = AutoProcessor.from_pretrained(tiny_dirs[name])
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}
    prompt = processor.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    assert prompt == prefix + generation_prompt
    without = processor.apply_chat_template([user], tokenize=False, add_generation_prompt=False)
    assert without == prefix
    answer = {"role": "assistant", "content": [{"type": "text", "text": "4"}]}
    full = processor.apply_chat_template([user, answer], tokenize=False)
    assert full == prefix + generation_prompt + "4" + end_of_turn
    # The tokenizer's EOS is the token that ends an assistant turn.
    assert end_of_turn.startswith(processor.tokenizer.eos_token)


def test_test_families_are_the_builtins():
    # tests/conftest.py FAMILIES is the tests' one list of families: every built-in, in BUILDERS' order.
    from conftest import FAMILIES
    from nanoalign.tiny import BUILDERS

    assert FAMILIES == tuple(BUILDERS)


def test_tiny_sft_stages_are_train_py_command_lines():
    # `python -m nanoalign.tiny build tiny-sft` runs each stage as `python train.py FLAGS`: the flags
    # must give back exactly the stage's config, or the CLI would build another model than train.py.
    from nanoalign.tiny import main, stage_flags, warm_start_configs

    stages = warm_start_configs()
    assert [parse_config(stage_flags(stage)) for stage in stages] == stages
    assert "--shapes-overcount" in stage_flags(stages[1])  # the biased teacher: a field that differs is said
    with pytest.raises(SystemExit, match="usage: python -m nanoalign.tiny build"):
        main(["build", "tiny-ssft"])


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_tiny_sft_stages_draw_16_samples_a_step_on_any_world_size(world_size, monkeypatch):
    # tiny-sft must be the same model whether a 1-process run, torchrun or `nanoalign.tiny build` builds it first
    from nanoalign.tiny import warm_start_configs

    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    for stage in warm_start_configs():
        assert stage.batch_size * stage.grad_accum_steps * world_size == 16
