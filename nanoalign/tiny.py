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

import os
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from nanoalign.shapes import corpus

# Bump when anything below changes, so stale caches are rebuilt instead of silently reused.
TINY_VERSION = "v2"  # v2: tiny-llava's template renders a system turn as "SYSTEM:", not "ASSISTANT:"

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


BUILDERS = {"tiny": _build_qwen25vl, "tiny-llava": _build_llava}


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
