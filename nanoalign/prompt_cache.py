"""The shared-prompt forward's KV cache under activation checkpointing.

`model.shared_prompt_hidden` runs the P distinct prompts once, repeats their KV cache G times and
runs the completions on top of it. A checkpointed layer runs its forward again in backward, and a
plain cache is written by every run: the recomputed prompt layer would append its keys a second
time, the recomputed completion layer would append the completion's keys to a cache that already
holds them, and each would then attend over the wrong keys. HF therefore drops the cache of a
checkpointed layer (GradientCheckpointingLayer), which would leave the completions without their
prompt. Here each layer's use of the cache is made a pure function of its inputs instead:

  * while the prompts run, a layer's update stores its keys and values in place of whatever a
    previous run stored (a recompute stores the same values again, harmlessly);
  * the completions run on a frozen copy, repeated G times: update returns prompt + new keys and
    values and stores nothing, so a recompute sees exactly what the first run saw.

The prompt's keys stay in the autograd graph, so the completions' gradient still reaches the prompt
and its images; what is saved for backward is the checkpoints' inputs and the prompt's keys and
values (KV heads only: 2 x 2 heads x 128 per token and layer for Qwen2.5-VL-3B).
Only decoders whose every layer is full attention (Qwen2/2.5/3-VL, LLaVA, SmolVLM) are served; a
sliding-window layer's cache keeps only its window, which this cache does not model.
"""

import contextlib

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class PromptKV(DynamicCache):
    """A DynamicCache whose updates a recomputed layer can repeat (see the module docstring)."""

    def __init__(self, frozen: bool = False):
        super().__init__()
        self.frozen = frozen

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(DynamicLayer())
        layer = self.layers[layer_idx]
        if self.frozen:  # the completions: attend over prompt + themselves, store nothing
            return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)
        layer.lazy_initialization(key_states, value_states)  # the prompts: replace a previous run's, if any
        return layer.update(key_states, value_states)

    def repeated(self, group: int) -> "PromptKV":
        """A frozen copy with every row repeated `group` times ([p0, p1] -> [p0, p0, ..., p1, p1, ...])."""
        copy = PromptKV(frozen=True)
        for layer in self.layers:
            new = DynamicLayer()
            new.lazy_initialization(layer.keys, layer.values)
            new.keys, new.values = layer.keys.repeat_interleave(group, dim=0), layer.values.repeat_interleave(group, dim=0)
            copy.layers.append(new)
        return copy


def serves(hf_model) -> bool:
    """Whether PromptKV serves this model's decoder: every layer full attention."""
    layer_types = getattr(hf_model.config.get_text_config(), "layer_types", None) or []
    return all(t == "full_attention" for t in layer_types)


@contextlib.contextmanager
def checkpointed_layers_keep_cache(layers):
    """Let HF's checkpointed layers pass a cache through (they drop it unless the layer says it may
    keep it; PromptKV makes that safe). Only while the forward runs: a recompute in backward reuses
    the arguments the forward was called with."""
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache  # back to the class's False
