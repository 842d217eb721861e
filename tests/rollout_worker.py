"""Helper for tests/test_algorithms.py: short FSDP runs of the online algorithms on 2 processes.

    torchrun --standalone --nproc_per_node 2 tests/rollout_worker.py MODEL_DIR OUT_ROOT

For each algorithm (grpo with a KL term, gspo, rloo, online_dpo) it calls train.train() once, in
OUT_ROOT/<algo>, in the same process group (train() reuses it). Before the GRPO run's first rollout,
both ranks also sample 4 completions for the SAME prompt (`probe`), right after train() seeded each
rank with seed + rank; rank 0 writes every rank's texts to OUT_ROOT/probe.json. The test reads that
file and each run's metrics.jsonl.
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS.parent))  # train.py
sys.path.insert(0, str(TESTS))  # toy_rewards
import train as train_module  # noqa: E402
from nanoalign.data import prepare_sample  # noqa: E402
from nanoalign.rollout import InProcess  # noqa: E402
from nanoalign.runtime import end_distributed  # noqa: E402
from nanoalign.shapes import shapes_sample  # noqa: E402

PROBE_GENERATIONS = 4

# (algo, flags on top of the common ones): a few steps each, small batches, short completions.
RUNS = [
    ("grpo", ["--num-generations", "4", "--beta", "0.01"]),  # beta > 0: reference model + kl
    ("gspo", ["--num-generations", "4", "--steps-per-generation", "2"]),
    ("rloo", ["--num-generations", "2"]),  # preset beta 0.05: KL in the reward
    ("online_dpo", ["--num-generations", "2"]),
]


class ProbeThenSample(InProcess):
    """The in-process backend, whose first call first samples the same prompt on every rank."""

    out_root: Path
    probed = False

    def sample(self, chunks, n, **sampling):
        if not ProbeThenSample.probed:
            ProbeThenSample.probed = True
            same = [prepare_sample(shapes_sample("train", 0, "rl"), "rl", "probe sample")]
            (rollout,) = super().sample([same], PROBE_GENERATIONS, **sampling)
            texts = [None] * dist.get_world_size()
            dist.all_gather_object(texts, rollout.texts)
            if dist.get_rank() == 0:
                (self.out_root / "probe.json").write_text(json.dumps({"texts": texts}))
        return super().sample(chunks, n, **sampling)


def main(model_dir: str, out_root: str) -> None:
    out_root = Path(out_root)
    ProbeThenSample.out_root = out_root
    train_module.InProcess = ProbeThenSample  # the backend train() builds
    for algo, flags in RUNS:
        argv = ["--algo", algo, "--model", model_dir, "--out-dir", str(out_root / algo), "--max-steps", "2",
                "--batch-size", "8", "--max-completion-length", "16", "--warmup-steps", "1", "--eval-split", "",
                "--save-every", "0", "--no-export", "--reward-funcs", "toy_rewards:shorter", "--reward-weights", "1.0",
                *flags]  # fmt: skip
        train_module.train(train_module.parse_config(argv))
    end_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
