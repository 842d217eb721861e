"""Built-in tiny vision-language models, built locally so nothing has to be downloaded.

`--model tiny` resolves to a Qwen2.5-VL-architecture model with random weights, a byte-level BPE
tokenizer trained here with the `tokenizers` library (with Qwen's special tokens and chat template)
and a processor saved with save_pretrained. It is written to disk once and then loads through the
same AutoModel / AutoProcessor path as a real checkpoint, so the code a tiny run exercises is the
code a Qwen2.5-VL-3B run exercises.

Sizes are set by two constraints: vLLM's CPU attention needs head_dim 64 (so: hidden 128, 2
heads), and a training step must take well under a second on 2 CPU cores. `build_tiny_llava`
builds a second family (LLaVA: CLIP vision tower + Llama) for the tests that check the batch
builder is not Qwen-specific.

Everything is deterministic (fixed seeds, fixed corpus): building twice gives identical files.
"""

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from nanoalign.config import PRESETS, Config
from nanoalign.shapes import corpus

# Bump when anything below changes, so stale caches are rebuilt instead of silently reused.
TINY_VERSION = "v3"  # v2: tiny-llava's template renders a system turn as "SYSTEM:"; v3: the tokenizer knows the colour words

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip
LLAVA_SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<image>", "<pad>"]

# Qwen2.5-VL's chat template (as published with the checkpoints).
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# LLaVA-1.5-style template: "SYSTEM: text USER: <image>\nquestion ASSISTANT: answer</s>".
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}SYSTEM: "
    "{% elif message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}<image>\n"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}</s>{% else %} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT: {% endif %}"
)


def cache_dir() -> Path:
    """Where built-in models live: $NANOALIGN_CACHE, else ~/.cache/nanoalign."""
    return Path(os.environ.get("NANOALIGN_CACHE", Path.home() / ".cache" / "nanoalign"))


def train_tokenizer(special_tokens: list[str], vocab_size: int = 1024) -> Tokenizer:
    """A byte-level BPE tokenizer trained on the synthetic task's text.

    Byte-level means any string is encodable (no unknown token); the merges make the task's words
    single tokens so sequences stay short.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    extra = ["You are a helpful assistant.", "system", "user", "assistant", "USER:", "ASSISTANT:", "0123456789"]
    tok.train_from_iterator(corpus() + extra, trainer=trainer)
    return tok


def _build_qwen25vl(out: Path) -> None:
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(QWEN_SPECIAL_TOKENS),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=QWEN_SPECIAL_TOKENS[3:],
        chat_template=QWEN_CHAT_TEMPLATE,
        padding_side="right",
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    # Images of 56..224 px a side: 4..64 image tokens after the 2x2 merge.
    size = {"shortest_edge": 56 * 56, "longest_edge": 224 * 224}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size),
        video_processor=Qwen2VLVideoProcessor(size=size),
        tokenizer=tokenizer,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=2,  # head_dim 64: the smallest vLLM's CPU attention accepts
            num_key_value_heads=1,
            max_position_embeddings=1024,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=2,
            hidden_size=64,
            intermediate_size=256,
            num_heads=1,
            out_hidden_size=128,
            window_size=56,
            fullatt_block_indexes=[1],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out)
    processor.save_pretrained(out)


def _build_llava(out: Path) -> None:
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(LLAVA_SPECIAL_TOKENS),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<image>"],
        chat_template=LLAVA_CHAT_TEMPLATE,
        padding_side="right",
    )
    image_size, patch_size = 56, 14
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",  # drop CLS: (56/14)^2 = 16 tokens per image
        num_additional_image_tokens=1,  # the CLS position the vision tower adds (and "default" drops)
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
            image_size=image_size, patch_size=patch_size, projection_dim=64,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)


# -----------------------------------------------------------------------------
# The families people train today (tested end to end in tests/test_families.py). Each uses its
# family's real config, model and processor classes; the text stacks keep head_dim 64 (vLLM's CPU
# attention) and the vision towers are 2 blocks of width 64, so a step stays well under a second.

# Qwen3-VL / Qwen3.5 style: no default system turn (Qwen2-VL and Qwen2.5-VL add one).
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

GEMMA3_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
                         "<start_of_image>", "<end_of_image>", "<image_soft_token>"]  # fmt: skip
# Gemma 3: "user"/"model" turns, an image is "<start_of_image>" (the processor expands it).
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<start_of_image>{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

GEMMA4_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>", "<|image>", "<image|>",
                         "<|image|>", "<|audio>", "<audio|>", "<|audio|>", "<|video|>"]  # fmt: skip
# Gemma 4: "<|turn>role ... <turn|>" turns, an image is "<|image|>" (the processor expands it).
GEMMA4_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|image|>{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<turn|>\n{% endfor %}{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)

SMOLVLM_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>",
                          "<image>", "<global-img>", "<video>"]  # fmt: skip
SMOLVLM_TILE_TOKENS = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
# SmolVLM's published template: "<|im_start|>User:<image>question<end_of_utterance>\nAssistant: answer<end_of_utterance>\n".
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is not string and message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for line in message['content'] %}"
    "{% if line['type'] == 'text' %}{{ line['text'] }}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _fast_tokenizer(special_tokens: list[str], chat_template: str, **kwargs):
    """A locally trained tokenizer as a transformers tokenizer; kwargs name its special tokens."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(special_tokens), chat_template=chat_template, padding_side="right", **kwargs
    )


def _save(model, processor, out: Path, eos_ids: list[int], pad_id: int) -> None:
    model.generation_config.eos_token_id = eos_ids
    model.generation_config.pad_token_id = pad_id
    model.save_pretrained(out)
    processor.save_pretrained(out)


def _qwen_tokenizer(chat_template: str):
    return _fast_tokenizer(QWEN_SPECIAL_TOKENS, chat_template, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                           additional_special_tokens=QWEN_SPECIAL_TOKENS[3:])  # fmt: skip


def _qwen_text(tokenizer, ids: dict, **overrides) -> dict:
    """The text stack every tiny Qwen shares: 4 layers, hidden 128, 2 heads of 64, 1 KV head."""
    return dict(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, max_position_embeddings=1024, bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], **overrides,
    )  # fmt: skip


def _qwen_token_ids(tokenizer) -> dict:
    return {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}


def _qwen_vision_tokens(ids: dict) -> dict:
    return dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])  # fmt: skip


def _build_qwen2vl(out: Path) -> None:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tokenizer = _qwen_tokenizer(QWEN_CHAT_TEMPLATE)  # Qwen2-VL publishes Qwen2.5-VL's template
    ids = _qwen_token_ids(tokenizer)
    size = {"shortest_edge": 56 * 56, "longest_edge": 224 * 224}  # 14 px patches, 2x2 merge: 4..64 tokens
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(size=size), video_processor=Qwen2VLVideoProcessor(size=size),
                                 tokenizer=tokenizer, chat_template=QWEN_CHAT_TEMPLATE)  # fmt: skip
    config = Qwen2VLConfig(
        text_config=_qwen_text(tokenizer, ids, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]}),
        vision_config=dict(depth=2, embed_dim=64, hidden_size=128, mlp_ratio=4, num_heads=1),  # hidden_size: the merger's output
        tie_word_embeddings=True, **_qwen_vision_tokens(ids),
    )  # fmt: skip
    torch.manual_seed(0)
    _save(Qwen2VLForConditionalGeneration(config), processor, out, [ids["<|im_end|>"], ids["<|endoftext|>"]], ids["<|endoftext|>"])


def _qwen3_processor(tokenizer):
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    # 16 px patches merged 2x2 (32 px per image token): 4..64 image tokens.
    size = {"shortest_edge": 64 * 64, "longest_edge": 256 * 256}
    image_processor = Qwen2VLImageProcessor(size=size, patch_size=16, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    video_processor = Qwen3VLVideoProcessor(size=size, patch_size=16, merge_size=2)
    return Qwen3VLProcessor(image_processor=image_processor, video_processor=video_processor, tokenizer=tokenizer,
                            chat_template=QWEN3_CHAT_TEMPLATE)  # fmt: skip


QWEN3_VISION = dict(depth=2, hidden_size=64, intermediate_size=256, num_heads=1, out_hidden_size=128, patch_size=16,
                    num_position_embeddings=256)  # fmt: skip


def _build_qwen3vl(out: Path) -> None:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tokenizer = _qwen_tokenizer(QWEN3_CHAT_TEMPLATE)
    ids = _qwen_token_ids(tokenizer)
    config = Qwen3VLConfig(
        # Interleaved M-RoPE over (t, h, w) on the 32 rotary frequency pairs of head_dim 64 (the
        # checkpoints split their 64 pairs 24/20/20).
        text_config=_qwen_text(tokenizer, ids, rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                                                "mrope_section": [12, 10, 10], "mrope_interleaved": True}),
        # deepstack: block 0's features are also merged and added to the first decoder layer's input.
        vision_config=dict(**QWEN3_VISION, deepstack_visual_indexes=[0]),
        tie_word_embeddings=False, **_qwen_vision_tokens(ids),
    )  # fmt: skip
    torch.manual_seed(0)
    _save(Qwen3VLForConditionalGeneration(config), _qwen3_processor(tokenizer), out, [ids["<|im_end|>"], ids["<|endoftext|>"]], ids["<|endoftext|>"])


def _build_qwen35(out: Path) -> None:
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    tokenizer = _qwen_tokenizer(QWEN3_CHAT_TEMPLATE)
    ids = _qwen_token_ids(tokenizer)
    text = _qwen_text(
        tokenizer, ids,
        # Hybrid: 3 gated-delta-net (linear attention) layers, then 1 full-attention layer, as Qwen3.5's 3:1.
        layer_types=["linear_attention"] * 3 + ["full_attention"],
        linear_key_head_dim=64, linear_value_head_dim=64, linear_num_key_heads=1, linear_num_value_heads=2,
        # Rotary on a quarter of head_dim 64: 8 frequency pairs split over (t, h, w) (the checkpoints: 32 as 11/11/10).
        rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                         "mrope_section": [3, 3, 2], "mrope_interleaved": True},
    )  # fmt: skip
    config = Qwen3_5Config(text_config=text, vision_config=QWEN3_VISION, tie_word_embeddings=True, **_qwen_vision_tokens(ids))
    torch.manual_seed(0)
    _save(Qwen3_5ForConditionalGeneration(config), _qwen3_processor(tokenizer), out, [ids["<|im_end|>"], ids["<|endoftext|>"]], ids["<|endoftext|>"])


# The vision tower of the SigLIP-style families (Gemma 3, Gemma 4, SmolVLM): 2 layers, width 64, 1 head.
SMALL_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1)


def _gemma_text(tokenizer, eos_token: str, **overrides) -> dict:
    """Gemma 3 and 4's text stack: 4 layers (3 sliding-window, then 1 global), hidden 128, 2 heads of 64."""
    tid = tokenizer.convert_tokens_to_ids
    return dict(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, max_position_embeddings=1024, sliding_window=64,
        layer_types=["sliding_attention"] * 3 + ["full_attention"],
        bos_token_id=tid("<bos>"), eos_token_id=tid(eos_token), pad_token_id=tid("<pad>"), **overrides,
    )  # fmt: skip


def _build_gemma3(out: Path) -> None:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

    tokenizer = _fast_tokenizer(
        GEMMA3_SPECIAL_TOKENS, GEMMA3_CHAT_TEMPLATE, bos_token="<bos>", eos_token="<end_of_turn>", pad_token="<pad>",
        unk_token="<unk>", extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                                 "image_token": "<image_soft_token>"},
    )  # fmt: skip
    # Gemma's vocabulary has runs of 1-4 newlines as single tokens, and vLLM's Gemma 3 processor
    # relies on it (it merges the "\n\n" around each expanded image with its neighbours).
    tokenizer.add_tokens(["\n", "\n\n", "\n\n\n", "\n\n\n\n"])
    # Every image is resized to 64x64: 16 px patches, 4x4 = 16 soft tokens (a fixed count per image).
    image_size, patch_size, tokens_per_image = 64, 16, 16
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3),
        tokenizer=tokenizer, image_seq_length=tokens_per_image, chat_template=GEMMA3_CHAT_TEMPLATE,
    )  # fmt: skip
    tid = tokenizer.convert_tokens_to_ids
    config = Gemma3Config(
        text_config=_gemma_text(tokenizer, "<end_of_turn>", query_pre_attn_scalar=64),
        # SigLIP without its pooling head, as Gemma 3 ships it: the projector reads every patch.
        vision_config=dict(**SMALL_VISION, image_size=image_size, patch_size=patch_size, vision_use_head=False),
        mm_tokens_per_image=tokens_per_image, boi_token_index=tid("<start_of_image>"), eoi_token_index=tid("<end_of_image>"),
        image_token_index=tid("<image_soft_token>"),
    )  # fmt: skip
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config)
    # HF initialises the image projection to zeros (every image would embed to 0 and the pictures
    # could not matter until it has learned); random like every other weight here.
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.02)
    _save(model, processor, out, [tid("<end_of_turn>"), tid("<eos>")], tid("<pad>"))


def _build_gemma4(out: Path) -> None:
    from transformers import Gemma4AudioFeatureExtractor, Gemma4Config, Gemma4ForConditionalGeneration, Gemma4ImageProcessor, Gemma4Processor, Gemma4VideoProcessor

    tokenizer = _fast_tokenizer(
        GEMMA4_SPECIAL_TOKENS, GEMMA4_CHAT_TEMPLATE, bos_token="<bos>", eos_token="<turn|>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"boi_token": "<|image>", "eoi_token": "<image|>", "image_token": "<|image|>",
                              "boa_token": "<|audio>", "eoa_token": "<audio|>", "audio_token": "<|audio|>"},
    )  # fmt: skip
    # 16 px patches pooled 2x2; images are scaled (aspect kept) to at most 70 soft tokens, so the count depends on the size.
    vision = dict(patch_size=16, pooling_kernel_size=2, max_soft_tokens=70)
    processor = Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(), image_processor=Gemma4ImageProcessor(**vision),
        tokenizer=tokenizer, video_processor=Gemma4VideoProcessor(**vision), image_seq_length=70, chat_template=GEMMA4_CHAT_TEMPLATE,
    )  # fmt: skip
    tid = tokenizer.convert_tokens_to_ids
    config = Gemma4Config(
        text_config=_gemma_text(
            tokenizer, "<turn|>", global_head_dim=64,  # the global layers' head_dim (512 by default): 64 for vLLM too
            vocab_size_per_layer_input=len(tokenizer), hidden_size_per_layer_input=16,  # per-layer input embeddings
            final_logit_softcapping=30.0,  # capped logits (as Gemma 2 ships them): the trainer must cap them too
        ),
        # default_output_length: the most soft tokens per image, which Gemma 4 checkpoints declare and vLLM reads.
        vision_config=dict(**SMALL_VISION, num_key_value_heads=1, head_dim=64, patch_size=16, pooling_kernel_size=2,
                           position_embedding_size=1024, default_output_length=70),
        audio_config=None, boi_token_id=tid("<|image>"), eoi_token_id=tid("<image|>"), image_token_id=tid("<|image|>"),
        video_token_id=tid("<|video|>"), boa_token_id=tid("<|audio>"), eoa_token_index=tid("<audio|>"), audio_token_id=tid("<|audio|>"),
    )  # fmt: skip
    torch.manual_seed(0)
    _save(Gemma4ForConditionalGeneration(config), processor, out, [tid("<turn|>"), tid("<eos>")], tid("<pad>"))


def _build_smolvlm(out: Path) -> None:
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor

    tokenizer = _fast_tokenizer(
        SMOLVLM_SPECIAL_TOKENS + SMOLVLM_TILE_TOKENS, SMOLVLM_CHAT_TEMPLATE, bos_token="<|im_start|>", eos_token="<end_of_utterance>",
        pad_token="<|endoftext|>", additional_special_tokens=SMOLVLM_SPECIAL_TOKENS[2:] + SMOLVLM_TILE_TOKENS,
    )  # fmt: skip
    # Idefics3-style splitting: the image is resized to a longest edge of 128 px and cut into 64x64
    # tiles plus one 64x64 global view, each 16 px patches -> 4x4, pixel-shuffled 2x2 -> 4 tokens.
    # So a 112x112 image gives 2x2 tiles + global = 20 image tokens, a 168x84 one 2x1 + global = 12.
    tile, patch_size, scale_factor = 64, 16, 2
    image_seq_len = (tile // patch_size) ** 2 // scale_factor**2
    split = dict(size={"longest_edge": 2 * tile}, max_image_size={"longest_edge": tile})
    processor = SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(**split, image_mean=[0.5] * 3, image_std=[0.5] * 3),
        tokenizer=tokenizer, video_processor=SmolVLMVideoProcessor(**split), image_seq_len=image_seq_len,
        chat_template=SMOLVLM_CHAT_TEMPLATE,
    )  # fmt: skip
    tid = tokenizer.convert_tokens_to_ids
    config = SmolVLMConfig(
        text_config=dict(
            model_type="llama", vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
            num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=1024,
            bos_token_id=tid("<|im_start|>"), eos_token_id=tid("<end_of_utterance>"), pad_token_id=tid("<|endoftext|>"),
        ),
        vision_config=dict(**SMALL_VISION, image_size=tile, patch_size=patch_size),
        scale_factor=scale_factor, image_token_id=tid("<image>"), pad_token_id=tid("<|endoftext|>"), tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    _save(SmolVLMForConditionalGeneration(config), processor, out, [tid("<end_of_utterance>")], tid("<|endoftext|>"))


BUILDERS = {
    "tiny": _build_qwen25vl,
    "tiny-llava": _build_llava,
    "tiny-qwen2-vl": _build_qwen2vl,
    "tiny-qwen3-vl": _build_qwen3vl,
    "tiny-qwen3.5": _build_qwen35,
    "tiny-gemma3": _build_gemma3,
    "tiny-gemma4": _build_gemma4,
    "tiny-smolvlm": _build_smolvlm,
}


def build_tiny(name: str, out: Path) -> Path:
    """Build built-in model `name` into `out` (atomically: a half-written directory is never seen)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        BUILDERS[name](tmp)
        os.replace(tmp, out)  # atomic on one filesystem; loses the race harmlessly if out exists
    except OSError:
        if not (out / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure_tiny(name: str) -> Path:
    """The cached directory of built-in model `name`, built on first use."""
    out = cache_dir() / f"{name}-{TINY_VERSION}"
    if not (out / "config.json").exists():
        build_tiny(name, out)
    return out


# -----------------------------------------------------------------------------
# "tiny-sft": the warm start of the preference and RL demos, trained by train.py's own loop


def warm_start_configs() -> list[Config]:
    """The two SFT runs that build the built-in "tiny-sft" (cached like the other built-ins).

    First the default SFT run on clean data, in which the tiny model learns to see; then 100 steps on
    a teacher that over-counts (60% of its "how many" answers are one too many). The result reads the
    images well but has picked up the teacher's bias, a mistake imitation cannot see and a verifiable
    reward (RL) or correct/incorrect pairs (DPO, MPO) can fix: what the demos of those methods show.
    """
    root = cache_dir() / f"tiny-sft-{TINY_VERSION}"
    # 16 samples a step, as the README's 2-rank runs, whatever the world size: tiny-sft is then the same
    # model however it is first built (python, torchrun, python -m nanoalign.tiny build).
    per_rank = max(1, 16 // int(os.environ.get("WORLD_SIZE", "1")))
    quiet = dict(eval_every=0, save_every=0, seed=0, batch_size=min(8, per_rank), grad_accum_steps=max(1, per_rank // 8))
    clean = dataclasses.replace(PRESETS["sft"](), out_dir=str(root / "clean"), **quiet)
    biased = dataclasses.replace(
        PRESETS["sft"](), model=str(root / "clean" / "final"), out_dir=str(root / "biased"), max_steps=100, lr=5e-4,
        warmup_steps=5, shapes_overcount=0.6, **quiet,
    )  # fmt: skip
    return [clean, biased]


def tiny_sft_stages() -> list[Config]:
    """The runs of `warm_start_configs` not built yet (none once both are cached). train.py runs them,
    as a stage of its own, before a run whose --model is "tiny-sft"."""
    return [warm for warm in warm_start_configs() if not (Path(warm.out_dir) / "final" / "config.json").exists()]


def tiny_sft_dir() -> str:
    """Where the built-in "tiny-sft" lives once built: the export of the last warm-start run."""
    return str(Path(warm_start_configs()[-1].out_dir) / "final")


def stage_flags(stage: Config) -> list[str]:
    """A warm-start run as train.py's command line: its fields that differ from the SFT preset."""
    preset = PRESETS["sft"]()
    return [arg for f in dataclasses.fields(stage) if getattr(stage, f.name) != getattr(preset, f.name)
            for arg in (f"--{f.name.replace('_', '-')}", str(getattr(stage, f.name)))]  # fmt: skip


def main(argv: list[str]) -> None:
    """python -m nanoalign.tiny build NAME...: build built-in models now instead of on first use.

    tiny-sft's stages are SFT runs of train.py, one process each (train.py runs them itself, under
    torchrun too, when a run asks for --model tiny-sft)."""
    names = ["tiny-sft", *BUILDERS]
    if len(argv) < 2 or argv[0] != "build" or not set(argv[1:]) <= set(names):
        raise SystemExit(f"usage: python -m nanoalign.tiny build NAME... (NAME: {', '.join(names)})")
    for name in argv[1:]:
        if name != "tiny-sft":
            print(f"{name}: {ensure_tiny(name)}", flush=True)
            continue
        for stage in tiny_sft_stages():
            subprocess.run([sys.executable, str(Path(__file__).parents[1] / "train.py"), *stage_flags(stage)], check=True)
        print(f"tiny-sft: {tiny_sft_dir()}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
