"""Helper for tests/test_families.py: one SFT step's loss and full gradients on 2 ranks, for several models.

    torchrun --standalone --nproc_per_node 2 tests/families_worker.py OUT.pt [SPEC] MODEL_DIR [MODEL_DIR ...]

For each model directory, parity_worker.parity_step runs sft:2:1 (or SPEC, parity_worker's ALGO:BATCH:ACCUM[:pf]) (rank r takes parity samples
[2r, 2r+1], one micro-batch each) under FSDP2; rank 0 saves {model_dir: result}. One launch for
every family, so the process start and the gloo rendezvous are paid once.
"""

import sys

import torch
import torch.distributed as dist

from nanoalign.runtime import end_distributed
from parity_worker import parity_step, parse_spec  # tests/ is on PYTHONPATH (subprocess_env)

if __name__ == "__main__":
    out_path, *model_dirs = sys.argv[1:]
    spec = parse_spec(model_dirs.pop(0) if ":" in model_dirs[0] else "sft:2:1")
    results = {model_dir: parity_step(model_dir, *spec) for model_dir in model_dirs}
    if dist.get_rank() == 0:
        torch.save(results, out_path)
    end_distributed()
