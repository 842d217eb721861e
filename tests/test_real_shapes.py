"""bench/real_shapes.py: the realistic-shape models have Qwen2.5-VL-3B / 7B's widths (at full depth,
their parameter counts), the vision tower's window / full-attention pattern, and 448-px images of
256 image tokens. Built on the meta device: no weights are allocated."""

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from bench.real_shapes import (
    Task,
    full_attention_blocks,
    real_config,
    real_processor,
    real_rl_samples,
)
from nanoalign.batch import image_token_ids, process_prompts, render


def num_params(shape: str, text_layers: int, vision_layers: int) -> int:
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(real_config(shape, text_layers, vision_layers))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("shape", "text_layers", "expected"), [("3b", 36, 3.75e9), ("7b", 28, 8.29e9)])
def test_full_depth_has_the_real_models_parameter_count(tiny_dirs, shape, text_layers, expected):
    # Qwen2.5-VL-3B-Instruct: 3.75B parameters, 7B-Instruct: 8.29B (their model cards)
    assert num_params(shape, text_layers, 32) == pytest.approx(expected, abs=5e6)


def test_reduced_depth_and_vision_pattern(tiny_dirs):
    assert num_params("3b", 2, 2) == pytest.approx(543e6, abs=1e6)  # the 543M the step figures are measured on
    assert full_attention_blocks(32) == [7, 15, 23, 31]  # the real tower's
    assert full_attention_blocks(2) == [1] and full_attention_blocks(9) == [7]
    config = real_config("7b", 1, 1)
    assert (config.text_config.vocab_size, config.tie_word_embeddings, config.vision_config.out_hidden_size) == (152064, False, 3584)


def test_448_px_image_is_256_image_tokens(tiny_dirs):
    processor = real_processor()
    sample = real_rl_samples(1, Task(image_size=448))[0]
    enc = process_prompts(processor, [render(processor, sample["prompt"], add_generation_prompt=True)], [sample["images"]], padding_side="left")
    assert int(torch.isin(enc["input_ids"], torch.tensor(sorted(image_token_ids(processor)))).sum()) == 256
