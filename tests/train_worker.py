"""Helper for tests/test_families.py: short train.train() runs on 2 processes, all in one launch, so
the process start and the gloo rendezvous are paid once.

    torchrun --standalone --nproc_per_node 2 tests/train_worker.py RUNS.json

RUNS.json holds a list of argv lists, run in turn in one process group (train() reuses it). The
curves plot and the final checkpoint are left out, as in test_families' in-process runs.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # train.py
import train as train_module  # noqa: E402
from nanoalign.runtime import end_distributed  # noqa: E402

if __name__ == "__main__":
    train_module.plot_metrics = lambda *args: []
    train_module.save_checkpoint = lambda *args, **kwargs: None
    for argv in json.loads(Path(sys.argv[1]).read_text()):
        train_module.train(train_module.parse_config(argv))
    end_distributed()
