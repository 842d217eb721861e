"""One flat configuration for every algorithm, and the presets `--algo` starts from.

Every field's docstring is its `--help` text (tyro reads them). train.py parses `--algo` first, then
every other flag overrides that preset. Nothing is resolved later: `--help` and config.json are what runs.
"""

import dataclasses
import importlib.util
from dataclasses import dataclass
from typing import Literal

Algo = Literal["sft", "dpo", "mpo", "grpo", "gspo", "rloo", "online_dpo"]


@dataclass
class Config:
    # --- what to train ---
    algo: Algo = "sft"
    """Training method: sft, dpo, mpo, grpo, gspo, rloo or online_dpo."""
    model: str = "tiny"
    """A local checkpoint directory, a hub id (org/name), or a built-in: "tiny" (random tiny Qwen2.5-VL),
    "tiny-llava", "tiny-qwen2-vl", "tiny-qwen3-vl", "tiny-qwen3.5", "tiny-gemma3", "tiny-gemma4", "tiny-smolvlm"
    (random tiny models of those families), or "tiny-sft" (tiny, SFT-warmed on shapes; built on first use)."""
    dataset: str = "shapes"
    """"shapes" (the built-in synthetic task), a hub id, or a local json/jsonl/parquet/csv file or directory."""
    train_split: str = "train"
    """Split used for training."""
    eval_split: str = "eval"
    """Split used for evaluation ("" to skip evaluation)."""
    columns: tuple[str, ...] = ()
    """Column renames to TRL's names, as ours=theirs, e.g. `--columns images=image messages=conversations`."""
    num_shapes_samples: int = 20000
    """Size of the built-in shapes train split (the eval split has num_eval_samples)."""
    shapes_overcount: float = 0.0
    """Fraction of shapes SFT "how many" answers one too many (a biased teacher: tiny-sft's 0.6 leaves RL a mistake to fix)."""
    out_dir: str = "runs/sft"
    """Where checkpoints, metrics.jsonl, plots and the exported model go."""
    seed: int = 0
    """Seed for the data order and sampling (rank r uses seed + r); built-in models have fixed weights."""

    # --- optimisation ---
    max_steps: int = 600
    """Number of optimizer steps."""
    batch_size: int = 8
    """Rows per micro-batch per rank (SFT: conversations; DPO: pairs; RL: completions)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step on each rank."""
    lr: float = 2e-3
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    warmup_steps: int = 20
    """Linear warm-up steps before the cosine decay."""
    min_lr_ratio: float = 0.1
    """Cosine decay floor, as a fraction of lr."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    max_length: int = 512
    """Longest row (prompt + completion, image tokens included). Text past it is cut and counted; cutting
    image tokens is an error unless --skip-bad-samples."""
    skip_bad_samples: bool = False
    """Skip (and count in the logs) samples that cannot be used (unreadable image, image tokens past
    max_length, malformed conversation) instead of stopping with an error."""

    # --- model and sharding ---
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Compute dtype: auto = bf16 compute with fp32 master weights and reduction on GPU, fp32 on CPU."""
    activation_checkpointing: bool = False
    """Recompute each layer's activations in backward to save memory: set it for 3B-class models and
    up (their activations outgrow the weights), leave it off for small ones (it costs ~30% of a step).
    RL rows still read each prompt once (nanoalign/prompt_cache.py)."""
    freeze_vision: bool = False
    """Keep the vision tower's weights fixed."""
    logps_chunk_size: int = 0
    """Token positions per log-prob chunk: the full (B, T, V) fp32 log-softmax is never materialised. 0: by
    device, 128 on CPUs and 1024 on GPUs."""
    attn_implementation: str = "sdpa"
    """Attention kernel of the text and vision towers: sdpa, eager, flash_attention_2 / flash_attention_3 (the
    flash-attn package), or a hub kernel such as kernels-community/flash-attn (the kernels package). Flash
    kernels need a GPU and bf16; they run Qwen2.5-VL's windowed vision attention in one call, where sdpa loops."""
    padding_free: bool = False
    """Forward each micro-batch's rows as one sequence without pad tokens, each row with its own positions
    (M-RoPE: the family's rope index, per row) attending only to itself (packing.py). Same numbers as padded;
    refused for models with linear-attention layers (Qwen3.5)."""
    max_tokens_per_micro_batch: int = 0
    """sft, dpo, mpo: fill each micro-batch with whole samples (pairs) up to this many computed tokens
    (--padding-free: real tokens; padded: rows x longest row), not --batch-size rows; a step still draws
    batch-size x grad-accum-steps samples per rank. 0: --batch-size rows."""
    lora_rank: int = 0
    """LoRA rank r (nanoalign/lora.py): train low-rank adapters on a frozen base; 0 = full fine-tuning.
    The reference model (DPO, MPO, KL terms) is then the policy with its adapters off: nothing extra loaded."""
    lora_alpha: float = 16.0
    """LoRA scale numerator: the adapters' output is multiplied by lora_alpha / lora_rank."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input during training (changes log-probs between forwards: RL ratios too)."""
    lora_target_modules: tuple[str, ...] = ()
    """Adapt only the linear layers whose name ends with one of these (e.g. q_proj v_proj); empty = every
    linear layer of the language model (found by the model's structure, any family)."""
    lora_vision: bool = False
    """Also adapt the vision tower's and the merger's/projector's linear layers."""
    lora_export: Literal["adapter", "merged", "both"] = "both"
    """With --lora-rank: what --export writes: the adapter in PEFT's format (out_dir/adapter, for
    peft.PeftModel.from_pretrained), the merged model (out_dir/final, a plain HF checkpoint), or both."""

    # --- logging, evaluation, checkpoints ---
    log_every: int = 1
    """Print a log line every this many steps (metrics.jsonl gets every step)."""
    eval_every: int = 100
    """Evaluate every this many steps (0: only at the start and the end)."""
    num_eval_samples: int = 128
    """Held-out samples per evaluation."""
    save_every: int = 100
    """Save a sharded checkpoint every this many steps (0: only at the end)."""
    resume: bool = True
    """Resume from the latest checkpoint in out_dir if there is one."""
    export: bool = True
    """At the end, write the model as Hugging Face safetensors to out_dir/final."""
    report_to: Literal["none", "trackio", "wandb"] = "none"
    """Also log to a tracker from rank 0: trackio (local, no account; `pip install -e '.[trackio]'`, then
    `trackio show`) or wandb (`pip install -e '.[wandb]'`): every metrics.jsonl record, and tables of held-out
    answers (RL: also training rollouts with their rewards)."""
    tracker_project: str = "nanoalign"
    """Tracker project the run is logged under (--report-to)."""
    run_name: str | None = None
    """Tracker run name (None: the tracker picks one). A resumed run continues its tracker run."""

    # --- preference optimisation (dpo, mpo, online_dpo) ---
    beta: float = 0.1
    """DPO temperature beta (also the KL coefficient of grpo/gspo/rloo, set by their presets)."""
    loss_types: tuple[Literal["sigmoid", "bco_pair", "sft", "ipo"], ...] = ("sigmoid",)
    """Preference loss terms mixed by mpo.py: sigmoid, bco_pair, sft, ipo."""
    loss_weights: tuple[float, ...] = (1.0,)
    """Weight of each entry of loss_types."""
    precompute_ref_logps: bool = False
    """Compute the reference log-probs of the whole train set once, instead of keeping a reference model."""

    # --- online RL (grpo, gspo, rloo, online_dpo) ---
    num_generations: int = 8
    """Completions sampled per prompt (G): at least 2, each is judged against the others (online DPO: exactly 2)."""
    max_completion_length: int = 32
    """Most tokens generated per completion."""
    temperature: float = 1.0
    """Sampling temperature (> 0; 0 would make a prompt's completions all alike); log-probs use it too."""
    top_p: float = 1.0
    """Nucleus sampling."""
    steps_per_generation: int = 1
    """Micro-batches per generation batch (at least --grad-accum-steps: a generation batch never ends inside a step)."""
    num_iterations: int = 1
    """Passes over each generation batch (>1 reuses it with kept old log-probs)."""
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    """Per-token loss aggregation (nanoalign/grpo.py): grpo = mean of each sequence's token mean; bnpo = token
    mean of the micro-batch; dr_grpo = token sum / (rows x max_completion_length); dapo = token sum / tokens of the step."""
    epsilon: float = 0.2
    """Lower clipping range: ratios below 1 - epsilon are clipped."""
    epsilon_high: float = 0.2
    """Upper clipping range: ratios above 1 + epsilon_high are clipped."""
    delta: float | None = None
    """Upper bound on the unclipped ratio (two-sided clipping); None disables it."""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """token = GRPO ratios, sequence = GSPO ratios."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide advantages by the group std, the batch std, or nothing."""
    mask_truncated_completions: bool = False
    """Completions that hit max_completion_length without EOS get no loss (their reward still counts)."""
    reward_funcs: tuple[str, ...] = ("accuracy", "format")
    """Reward functions: built-in names (accuracy, format, think_format) or module:function paths."""
    reward_weights: tuple[float, ...] = (1.0, 0.2)
    """Weight of each reward function."""
    normalize_advantages: bool = False
    """RLOO: normalise advantages over the batch."""
    missing_eos_penalty: float | None = None
    """Online DPO: subtract this from the score of a completion that does not end with EOS."""
    sampler: Literal["nanoalign", "hf"] = "nanoalign"
    """In-process sampler: nanoalign (each prompt once, its KV cache copied per sample) or hf (HF generate on every row)."""
    rollout_batch_size: int = 0
    """nanoalign's sampler: most rows decoded together per round (a multiple of --num-generations; 0 = all this
    rank's rows). Decoding reads every weight per step whatever the batch: larger is faster until the KV cache
    of these rows runs out of memory; --batch-size samples one micro-batch at a time."""

    # --- vLLM rollouts ---
    vllm_mode: Literal["none", "server", "colocate"] = "none"
    """none = the training model samples; server = a running vLLM server; colocate = a vLLM engine per rank (README)."""
    vllm_url: str = "http://127.0.0.1:8000"
    """Base URL of the vLLM server (vllm_mode server)."""
    vllm_sync_every: int = 1
    """Push weights to vLLM every this many optimizer steps."""
    vllm_tensor_parallel_size: int = 1
    """Colocate: consecutive ranks sharing one tensor-parallel engine (divides the ranks; 1 = an engine per rank)."""
    vllm_gpu_memory_utilization: float = 0.3
    """Colocate: device memory (host RAM on CPUs) vLLM keeps, also while training: lower it if training runs out."""
    vllm_max_model_len: int | None = None
    """Colocate: longest prompt + completion vLLM reserves KV cache for (None: the model's; --max-length saves memory)."""
    vllm_enforce_eager: bool = True
    """Colocate: no CUDA graphs or torch.compile (starts in seconds; --no-vllm-enforce-eager decodes faster on GPUs)."""
    vllm_model_impl: Literal["auto", "vllm", "transformers"] = "auto"
    """Colocate: vLLM's own implementation (vllm), its Transformers backend for architectures it lacks
    (transformers), or vLLM's choice (auto). A server takes `python -m nanoalign.serve --model-impl`."""
    vllm_max_images: int = 2
    """Colocate: most images in one prompt (vLLM reserves memory for that many)."""
    vllm_timeout: float = 120.0
    """Seconds to wait for one vLLM request before failing with an error."""
    vllm_is_correction: Literal["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = "sequence_mask"
    """Importance-sampling correction for the mismatch between vLLM's and the trainer's log-probs."""
    vllm_is_cap: float = 3.0
    """Cap C of the importance-sampling correction."""


RL_ALGOS = ("grpo", "gspo", "rloo", "online_dpo")
# Fields only some algorithms read: set elsewhere they would silently do nothing, so check_config refuses them.
APPLIES_TO = {
    "beta": ("dpo", "mpo", *RL_ALGOS),
    **dict.fromkeys(("loss_types", "loss_weights", "precompute_ref_logps"), ("dpo", "mpo")),
    "max_tokens_per_micro_batch": ("sft", "dpo", "mpo"),  # RL micro-batches hold whole groups of G completions
    **dict.fromkeys(("num_generations", "temperature", "top_p", "steps_per_generation", "reward_funcs", "reward_weights", "vllm_mode",
                     "rollout_batch_size", "vllm_tensor_parallel_size", "vllm_gpu_memory_utilization", "vllm_max_model_len",
                     "vllm_enforce_eager", "vllm_model_impl", "vllm_max_images", "vllm_url", "vllm_timeout", "vllm_sync_every"), RL_ALGOS),
    # online DPO trains on each pair once (as TRL's), and has --missing-eos-penalty instead of masking
    **dict.fromkeys(("epsilon", "epsilon_high", "num_iterations", "mask_truncated_completions"), ("grpo", "gspo", "rloo")),
    **dict.fromkeys(("loss_type", "importance_sampling_level", "delta", "scale_rewards", "vllm_is_correction", "vllm_is_cap"), ("grpo", "gspo")),
    "normalize_advantages": ("rloo",),
    "missing_eos_penalty": ("online_dpo",),
}  # fmt: skip


# The vLLM settings and the --vllm-mode values that read them: refused with any other mode.
VLLM_MODES = {
    "vllm_url": ("server",),
    "vllm_timeout": ("server",),
    "vllm_sync_every": ("server", "colocate"),
    "vllm_is_correction": ("server", "colocate"),  # in-process samples are the policy's own: nothing to correct
    "vllm_is_cap": ("server", "colocate"),
    "rollout_batch_size": ("none",),  # in-process sampling's own setting
    **dict.fromkeys(("vllm_tensor_parallel_size", "vllm_gpu_memory_utilization", "vllm_max_model_len",
                     "vllm_enforce_eager", "vllm_model_impl", "vllm_max_images"), ("colocate",)),
}  # fmt: skip


def check_config(cfg: Config) -> None:
    """Every rule that ties fields together, checked once before anything is loaded (ValueError)."""
    default = Config()
    for name, algos in APPLIES_TO.items():
        if cfg.algo not in algos and getattr(cfg, name) != getattr(default, name):
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} does nothing for --algo {cfg.algo} (only {', '.join(algos)} read it); drop it")
    if cfg.report_to == "none" and (cfg.tracker_project != default.tracker_project or cfg.run_name is not None):
        raise ValueError("--tracker-project and --run-name name a tracker run; they do nothing without --report-to trackio|wandb")
    if cfg.report_to != "none" and importlib.util.find_spec(cfg.report_to) is None:  # found, not imported
        raise ValueError(f"--report-to {cfg.report_to}: {cfg.report_to} is not installed; pip install -e '.[{cfg.report_to}]' "
                         f"(or pip install {cfg.report_to})")  # fmt: skip
    check_attn_implementation(cfg.attn_implementation)
    if cfg.logps_chunk_size < 0:
        raise ValueError(f"--logps-chunk-size must be >= 0 (0: chosen by device), got {cfg.logps_chunk_size}")
    if cfg.max_steps < 0:  # 0 is allowed: load (resume), export and evaluate without training
        raise ValueError(f"--max-steps must be >= 0, got {cfg.max_steps}")
    for name in ("batch_size", "grad_accum_steps", "steps_per_generation", "num_iterations", "max_length", "max_completion_length"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.max_tokens_per_micro_batch < 0:
        raise ValueError(f"--max-tokens-per-micro-batch must be >= 0 (0: --batch-size rows per micro-batch), got {cfg.max_tokens_per_micro_batch}")
    if cfg.lora_rank < 0 or not 0 <= cfg.lora_dropout < 1:
        raise ValueError(f"--lora-rank must be >= 0 (got {cfg.lora_rank}), --lora-dropout in [0, 1) (got {cfg.lora_dropout})")
    lora_flags = ("lora_alpha", "lora_dropout", "lora_target_modules", "lora_vision", "lora_export")
    if cfg.lora_rank == 0 and (changed := [f for f in lora_flags if getattr(cfg, f) != getattr(default, f)]):
        raise ValueError(f"--{changed[0].replace('_', '-')} does nothing without --lora-rank (> 0); set a rank or drop it")
    if cfg.lora_rank and cfg.freeze_vision:
        raise ValueError("--freeze-vision does nothing with --lora-rank: the whole base is frozen (--lora-vision adapts the vision tower)")
    if len(cfg.loss_weights) != len(cfg.loss_types):
        raise ValueError(f"--loss-weights has {len(cfg.loss_weights)} values for {len(cfg.loss_types)} --loss-types; give one each")
    if not cfg.loss_types or len(set(cfg.loss_types)) != len(cfg.loss_types):
        raise ValueError(f"--loss-types {' '.join(cfg.loss_types)!r} is empty or repeats a name; name each term once (add up "
                         "the weights of a repeat)")  # fmt: skip
    if cfg.algo not in RL_ALGOS:
        return
    if not cfg.reward_funcs:
        raise ValueError("--reward-funcs is empty: an RL run needs at least one reward function (e.g. accuracy format)")
    for name, modes in VLLM_MODES.items():
        if cfg.vllm_mode not in modes and getattr(cfg, name) != getattr(default, name):
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} does nothing with --vllm-mode {cfg.vllm_mode} (only {' and '.join(modes)} read it); drop it")
    # Each completion is judged against the others of its prompt (group mean, leave-one-out mean, the
    # pair): with G = 1 every advantage is 0 and nothing learns, silently (TRL refuses it too).
    if cfg.num_generations < 2:
        raise ValueError(f"--num-generations must be >= 2 for --algo {cfg.algo}: each completion is judged against the "
                         f"others of its prompt, so with {cfg.num_generations} there is nothing to learn from")
    if cfg.temperature <= 0:  # greedy: every completion of a prompt alike; and log-probs divide by it
        raise ValueError(f"--temperature must be > 0, got {cfg.temperature}: at 0 (greedy decoding) the --num-generations "
                         "completions of a prompt are all the same and nothing learns; use e.g. 0.7")
    if cfg.vllm_tensor_parallel_size < 1 or cfg.vllm_max_images < 0 or not 0 < cfg.vllm_gpu_memory_utilization <= 1:
        raise ValueError(
            f"--vllm-tensor-parallel-size must be >= 1 (got {cfg.vllm_tensor_parallel_size}), --vllm-max-images >= 0 "
            f"(got {cfg.vllm_max_images}), --vllm-gpu-memory-utilization in (0, 1] (got {cfg.vllm_gpu_memory_utilization})"
        )
    if cfg.vllm_is_cap <= 0:
        raise ValueError(f"--vllm-is-cap must be > 0, got {cfg.vllm_is_cap}: it caps the importance-sampling correction")
    if len(cfg.reward_weights) != len(cfg.reward_funcs):
        raise ValueError(f"--reward-weights has {len(cfg.reward_weights)} values for {len(cfg.reward_funcs)} --reward-funcs; give one each")
    if cfg.batch_size % cfg.num_generations:
        raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of --num-generations {cfg.num_generations}: "
                         "a micro-batch holds whole groups")  # fmt: skip
    if cfg.steps_per_generation % cfg.grad_accum_steps and cfg.grad_accum_steps % cfg.steps_per_generation:
        raise ValueError(f"--steps-per-generation {cfg.steps_per_generation} and --grad-accum-steps {cfg.grad_accum_steps} "
                         "must divide one another: a generation batch covers whole optimizer steps, or a step whole generation batches")  # fmt: skip
    if cfg.rollout_batch_size < 0 or cfg.rollout_batch_size % cfg.num_generations:
        raise ValueError(f"--rollout-batch-size {cfg.rollout_batch_size} must be 0 (all rows) or a positive multiple of "
                         f"--num-generations {cfg.num_generations}: a decode batch holds whole groups")  # fmt: skip
    if cfg.rollout_batch_size and cfg.sampler == "hf":
        raise ValueError("--rollout-batch-size sets nanoalign's sampler's decode batch; --sampler hf samples one micro-batch "
                         "at a time: drop one of them")  # fmt: skip
    if cfg.algo == "online_dpo" and cfg.num_generations != 2:
        raise ValueError(f"online DPO compares 2 completions per prompt; set --num-generations 2 (got {cfg.num_generations})")


# The package each --attn-implementation needs, and the pip command that installs it.
ATTN_PACKAGES = {
    "sdpa": None,
    "eager": None,
    "flash_attention_2": ("flash_attn", "pip install flash-attn --no-build-isolation"),
    "flash_attention_3": ("flash_attn_interface", "build flash-attention's hopper/ directory (FlashAttention 3)"),
}


def check_attn_implementation(name: str) -> None:
    """Refuse an attention implementation that does not exist or whose package is not installed."""
    if "/" in name:  # a kernel from the hub, loaded by the kernels package
        needs = ("kernels", "pip install kernels")
    elif name in ATTN_PACKAGES:
        needs = ATTN_PACKAGES[name]
    else:
        raise ValueError(f"--attn-implementation {name!r} is not one of {', '.join(ATTN_PACKAGES)} or a hub kernel (org/name, "
                         "e.g. kernels-community/flash-attn)")  # fmt: skip
    if needs is not None and importlib.util.find_spec(needs[0]) is None:
        raise ValueError(f"--attn-implementation {name} needs the {needs[0]} package, which is not installed: {needs[1]}, "
                         "or use --attn-implementation sdpa")  # fmt: skip


def sft_preset() -> Config:
    return Config(algo="sft", out_dir="runs/sft")


def dpo_preset() -> Config:
    return Config(algo="dpo", model="tiny-sft", out_dir="runs/dpo", lr=2e-4, warmup_steps=5, max_steps=100, loss_types=("sigmoid",),
                  loss_weights=(1.0,), eval_every=25, save_every=25, num_eval_samples=256)  # fmt: skip


def mpo_preset() -> Config:
    # MPO recipe (arXiv 2411.10442; TRL docs): 0.8 sigmoid + 0.2 bco_pair + 1.0 sft.
    return dataclasses.replace(dpo_preset(), algo="mpo", out_dir="runs/mpo", loss_types=("sigmoid", "bco_pair", "sft"),
                               loss_weights=(0.8, 0.2, 1.0))  # fmt: skip


def grpo_preset() -> Config:
    # Tuned for the built-in demo (tiny-sft on shapes, 2 CPU ranks): 4 prompts x 8 completions per micro-batch per rank.
    return Config(algo="grpo", model="tiny-sft", out_dir="runs/grpo", lr=3e-4, warmup_steps=5, max_steps=60, batch_size=32,
                  num_generations=8, beta=0.0, eval_every=20, save_every=20, num_eval_samples=256)  # fmt: skip


def gspo_preset() -> Config:
    # GSPO recipe (arXiv 2507.18071, and TRL's GSPO docs): sequence ratios, tiny clip range, grpo aggregation.
    return dataclasses.replace(grpo_preset(), algo="gspo", out_dir="runs/gspo", importance_sampling_level="sequence", epsilon=3e-4,
                               epsilon_high=4e-4, beta=0.0, loss_type="grpo", steps_per_generation=4, lr=2e-4, max_steps=120,
                               eval_every=40, save_every=40)  # fmt: skip


def rloo_preset() -> Config:
    return dataclasses.replace(grpo_preset(), algo="rloo", out_dir="runs/rloo", beta=0.05, num_generations=2)


def online_dpo_preset() -> Config:
    return dataclasses.replace(grpo_preset(), algo="online_dpo", out_dir="runs/online_dpo", num_generations=2, temperature=0.9, beta=0.1)


PRESETS = {"sft": sft_preset, "dpo": dpo_preset, "mpo": mpo_preset, "grpo": grpo_preset, "gspo": gspo_preset,
           "rloo": rloo_preset, "online_dpo": online_dpo_preset}  # fmt: skip
