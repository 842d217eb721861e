"""One family's tiny model in a colocated vLLM engine (one process): sampling with 1 and 2 images per
prompt, and the sampler's log-probs before and after an in-process weight sync from a perturbed
FSDP2 trainer. Run by tests/test_vllm_families.py in a fresh process per family (vLLM's engine
shutdown ends the process group, so engines do not share a process).

    python tests/colocate_families_worker.py MODEL_DIR OUT_JSON
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoalign.config import Config  # noqa: E402
from nanoalign.model import load_processor  # noqa: E402
from nanoalign.runtime import init_distributed  # noqa: E402
from nanoalign.vllm_colocate import VLLMColocate  # noqa: E402
from test_vllm import MAX_TOKENS, NUM_SAMPLES, SAMPLES, perturbed_policy, rollout_logp_gap  # noqa: E402


def main(model_dir: str, out_path: str) -> None:
    rank, world_size, device = init_distributed()
    processor = load_processor(model_dir)
    policy = perturbed_policy(model_dir, seed=1)  # not the weights the engine loads from disk
    stop_ids = {processor.tokenizer.eos_token_id, processor.tokenizer.pad_token_id} - {None}
    cfg = Config(seed=0, vllm_sync_every=1, vllm_gpu_memory_utilization=0.1, vllm_max_model_len=1024,
                 vllm_enforce_eager=True, vllm_max_images=2)  # fmt: skip
    engine = VLLMColocate(cfg, policy, processor, model_dir=model_dir, stop_ids=stop_ids, rank=rank, world_size=world_size,
                          device=device, dtype="float32")  # fmt: skip
    chunks = [[{**s, "sample_id": f"prompt {i}"}] for i, s in enumerate(SAMPLES)]  # 1 image, then 2 images

    def gap() -> float:
        rollouts = engine.sample(chunks, NUM_SAMPLES, max_tokens=MAX_TOKENS, temperature=1.0, top_p=1.0)
        with torch.no_grad():
            return max(rollout_logp_gap(policy, processor, r, r.sampler_logps, temperature=1.0) for r in rollouts)

    before = gap()
    sync_metrics = engine.sync(0)
    after = gap()
    Path(out_path).write_text(json.dumps({"before": before, "after": after, **sync_metrics}))
    engine.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
