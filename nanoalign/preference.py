"""Preference pairs before the loss: encoding, per-row log-prob sums, and the reference's sums.

A pair becomes two rows, prompt + chosen and prompt + rejected (`encode_pairs`); DPO/MPO and their
evaluation score rows by `completion_logps`. The frozen reference's sums come from a second model,
or (--precompute-ref-logps) from a table computed once before the first update and saved in out_dir
(`reference_table`, a stage of train.py's setup), so that no second model is kept in memory.
"""

from pathlib import Path

import torch
from tqdm import tqdm

from nanoalign.batch import Batch, encode_conversations
from nanoalign.data import fetch_samples
from nanoalign.runtime import all_gather_rows, on_every_rank


def encode_pairs(samples: list[dict], run) -> Batch:
    """2B rows: prompt + chosen answer for every sample, then prompt + rejected answer."""
    return encode_conversations(run.processor, [s["prompt"] + s[k] for k in ("chosen", "rejected") for s in samples],
                                [s["images"] for s in samples] * 2, [f"{s['sample_id']} ({k})" for k in ("chosen", "rejected") for s in samples],
                                max_length=run.cfg.max_length, stop_ids=run.stop_ids, last_turn_only=True)  # fmt: skip


def completion_logps(policy, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sums over completion tokens, SUM_t M l_t (B,), and the per-token logps (B, T)."""
    logps, _ = policy(**batch.model_inputs(), logps_mask=batch.mask)
    return (logps * batch.mask).sum(1), logps


@torch.no_grad()
def reference_logps(samples: list[dict], batch: Batch, run) -> torch.Tensor:
    """(2B,) reference sums: from the frozen reference model, or from the precomputed table."""
    if run.ref_policy is not None:
        return completion_logps(run.ref_policy, batch)[0]
    rows = torch.stack([run.ref_logps_table[s["split"]][s["index"]] for s in samples])  # (B, 2): chosen, rejected
    return torch.cat([rows[:, 0], rows[:, 1]]).to(run.device)


@torch.no_grad()
def reference_table(run, path: Path, resumed: bool) -> dict[str, torch.Tensor]:
    """{split: (N, 2) chosen/rejected reference sums}: before the first update the policy IS the reference, so every
    train and eval pair is scored with it (ranks split the work) and saved at `path` for a resumed run."""
    # Only a resumed run reads the file: at step 0 the policy is the reference, and a table left in
    # out_dir by an earlier run (another model or dataset, or --no-resume) would be stale.
    if resumed:
        if not path.exists():
            raise ValueError(f"{path} is missing, and after training started the reference can no longer be recomputed; "
                             "restart the run from scratch (or drop --precompute-ref-logps)")  # fmt: skip
        return torch.load(path)
    table = {}
    for split, dataset in ((run.cfg.train_split, run.train_data), (run.cfg.eval_split, run.eval_data)):
        if dataset is None:
            continue
        per_rank = -(-len(dataset) // run.world_size)  # ceil: the last rank pads with repeats
        mine = [min(i, len(dataset) - 1) for i in range(run.rank * per_rank, (run.rank + 1) * per_rank)]
        sums = []
        for start in tqdm(range(0, per_rank, run.cfg.batch_size), desc=f"reference log-probs ({split})", disable=run.rank != 0):
            # agreed before the forward (a collective): a bad sample stops every rank, naming it
            indices = mine[start : start + run.cfg.batch_size]
            samples, _ = on_every_rank(lambda: fetch_samples(dataset, indices, "preference", split, run.cfg.skip_bad_samples, run.check_sample), run.device)
            pair_sums = completion_logps(run.policy, encode_pairs(samples, run).to(run.device))[0]  # (2b,)
            sums.append(torch.stack(pair_sums.chunk(2), dim=1))  # (b, 2)
        table[split] = all_gather_rows(torch.cat(sums))[: len(dataset)].cpu()  # rank-major = index order
    if run.rank == 0:
        torch.save(table, path)
    return table
