"""DPO and MPO: preference losses on per-sequence log-prob sums.

With r_c = logp_pi(chosen) - logp_ref(chosen) and r_r likewise (sums over completion tokens):

    sigmoid  (DPO):  L = -log sigma(beta (r_c - r_r))
    bco_pair (BCO):  L = -log sigma(beta r_c) - log sigma(-beta r_r)
    sft:             L = token-mean NLL of the chosen completions
    ipo:             L = ((r_c / |c| - r_r / |r|) - 1 / (2 beta))^2
    MPO:             loss = SUM_k w_k mean_batch(L_k),  e.g. ["sigmoid", "bco_pair", "sft"] x [0.8, 0.2, 1.0]

Papers:
    DPO https://arxiv.org/abs/2305.18290 (eq. 7)
    MPO https://arxiv.org/abs/2411.10442 (InternVL MPO, section 3.2: preference + quality + generation losses)
    BCO https://arxiv.org/abs/2404.04656 (binary classifier optimisation; pair form as in TRL)
    IPO https://arxiv.org/abs/2310.12036 (eq. 17)
The numbers follow Hugging Face TRL's DPOTrainer v1.9-v1.16 (README.md, "Differences from TRL", lists
where they deliberately differ).

Simplified / decided here:
    - pure functions on sequence log-prob sums; the caller runs the policy and the frozen reference.
    - no label smoothing, no BCO running-mean reward shift (TRL dropped it in 0.29).
    - ipo divides each term by its own token count (TRL averages the log-probs of every term when
      "ipo" is requested); the reward metrics always use the sums.
    - the sft term is passed in (chosen_nll), because only the caller has the per-token logits.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from nanoalign.batch import Batch, encode_conversations
from nanoalign.data import BadSampleError, fetch_samples
from nanoalign.runtime import agree_on_failure, all_gather_rows, all_reduce_sum, mean_over_ranks, on_every_rank

LOSS_TYPES = ("sigmoid", "bco_pair", "sft", "ipo")


def sigmoid_loss(chosen_logratios, rejected_logratios, beta: float) -> torch.Tensor:
    """DPO: -log sigma(beta (r_c - r_r)), per pair (B,)."""
    return -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))  # DPO eq. 7


def bco_pair_loss(chosen_logratios, rejected_logratios, beta: float) -> torch.Tensor:
    """BCO pair: chosen classified as good, rejected as bad, each on its own reward (B,)."""
    # Unlike sigmoid, this pins the absolute reward scale: r_c pushed > 0 and r_r < 0 separately.
    return -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)


def ipo_loss(chosen_logratios, rejected_logratios, beta: float, chosen_lengths, rejected_lengths) -> torch.Tensor:
    """IPO: squared distance of the length-normalised margin to 1/(2 beta), per pair (B,)."""
    # clamp: an empty completion has r = 0 (a sum over nothing), so 0/1 keeps it at 0 instead of NaN.
    margin = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
    return (margin - 1 / (2 * beta)) ** 2  # IPO eq. 17


def sft_loss(chosen_nll) -> torch.Tensor:
    """SFT term of MPO: the caller's token-mean NLL of the chosen completions (a scalar)."""
    return chosen_nll


def mpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    chosen_nll,
    beta: float,
    loss_types,
    loss_weights,
    *,
    chosen_lengths=None,
    rejected_lengths=None,
):
    """Weighted mix of preference losses. Returns (loss, metrics).

    policy_* / ref_*: (B,) sums of completion-token log-probs (policy and frozen reference).
    chosen_nll: 0-dim token-mean NLL of the chosen completions; needed only when "sft" is used.
    loss_types / loss_weights: same length; DPO is ["sigmoid"], [1.0].
    chosen_lengths / rejected_lengths: (B,) counted tokens per completion, needed for "ipo".
    loss = SUM_k w_k mean_batch(L_k). Metrics (detached 0-dim): rewards/{chosen,rejected,accuracies,
    margins}, logps/{chosen,rejected}, and loss/<type> (unweighted batch mean of each term).
    """
    loss_types, loss_weights = list(loss_types), list(loss_weights)
    if not loss_types:
        raise ValueError(f"loss_types is empty; pick at least one of {LOSS_TYPES}")
    if len(loss_types) != len(loss_weights):
        raise ValueError(
            f"loss_types has {len(loss_types)} entries but loss_weights has {len(loss_weights)}; "
            "give one weight per loss type"
        )
    unknown = [t for t in loss_types if t not in LOSS_TYPES]
    if unknown:
        raise ValueError(f"unknown loss type(s) {unknown}; valid names are {LOSS_TYPES}")
    if len(set(loss_types)) != len(loss_types):
        raise ValueError(f"loss_types {loss_types} repeats a name; merge the repeats by adding their weights")
    sums = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if policy_chosen_logps.dim() != 1 or any(x.shape != policy_chosen_logps.shape for x in sums):
        raise ValueError(
            f"policy/ref chosen/rejected logps must all be (B,) sums, got shapes {[tuple(x.shape) for x in sums]}"
        )
    if "sft" in loss_types and (chosen_nll is None or chosen_nll.dim() != 0):
        raise ValueError("loss type 'sft' needs chosen_nll, a 0-dim tensor: the token-mean NLL of the chosen answers")
    if "ipo" in loss_types and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError("loss type 'ipo' needs chosen_lengths and rejected_lengths, (B,) counted tokens each")

    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,) r_c
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,) r_r
    per_type = {
        "sigmoid": lambda: sigmoid_loss(chosen_logratios, rejected_logratios, beta),
        "bco_pair": lambda: bco_pair_loss(chosen_logratios, rejected_logratios, beta),
        "sft": lambda: sft_loss(chosen_nll),
        "ipo": lambda: ipo_loss(chosen_logratios, rejected_logratios, beta, chosen_lengths, rejected_lengths),
    }

    metrics = {}
    loss = 0.0
    for loss_type, weight in zip(loss_types, loss_weights):
        term = per_type[loss_type]().mean()  # mean_batch(L_k); the sft scalar is its own mean
        loss = loss + weight * term  # loss = SUM_k w_k mean_batch(L_k)
        metrics[f"loss/{loss_type}"] = term.detach()

    chosen_rewards = (beta * chosen_logratios).detach()  # (B,) implicit reward beta r_c
    rejected_rewards = (beta * rejected_logratios).detach()  # (B,) beta r_r
    metrics["rewards/chosen"] = chosen_rewards.mean()
    metrics["rewards/rejected"] = rejected_rewards.mean()
    metrics["rewards/accuracies"] = (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean()
    metrics["rewards/margins"] = (chosen_rewards - rejected_rewards).mean()
    metrics["logps/chosen"] = policy_chosen_logps.detach().mean()
    metrics["logps/rejected"] = policy_rejected_logps.detach().mean()
    return loss, metrics


# -----------------------------------------------------------------------------
# The algorithm module train.py drives (--algo dpo / --algo mpo)
#
# A micro-batch holds B pairs as 2B rows, [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}]: one
# forward scores both answers of every prompt, each row with its own copy of the prompt's images.

DATA_FORMAT = "preference"


@dataclass
class MicroBatch:
    batch: Batch  # 2B rows: B chosen, then the B rejected answers of the same prompts
    ref_logps: torch.Tensor  # (2B,) frozen reference's completion log-prob sums, same row order
    num_step_pairs: float  # pairs in the whole optimizer step, all ranks
    num_step_chosen_tokens: float  # counted chosen tokens in the whole optimizer step, all ranks


def needs_reference(cfg) -> bool:
    return not cfg.precompute_ref_logps  # precomputed: the table replaces the second model


def samples_per_round(cfg) -> int:
    return cfg.batch_size * cfg.grad_accum_steps


def encode_pairs(samples: list[dict], run) -> Batch:
    """2B rows: prompt + chosen answer for every sample, then prompt + rejected answer."""
    return encode_conversations(
        run.processor,
        [s["prompt"] + s["chosen"] for s in samples] + [s["prompt"] + s["rejected"] for s in samples],
        [s["images"] for s in samples] * 2,
        [f"{s['sample_id']} (chosen)" for s in samples] + [f"{s['sample_id']} (rejected)" for s in samples],
        max_length=run.cfg.max_length, stop_ids=run.stop_ids, last_turn_only=True,
    )  # fmt: skip


def completion_logps(policy, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sums over completion tokens, SUM_t M l_t (B,), and the per-token logps (B, T)."""
    logps, _ = policy(**batch.model_inputs(), logps_mask=batch.mask)
    return (logps * batch.mask).sum(1), logps


@torch.no_grad()
def reference_logps(samples: list[dict], batch: Batch, run) -> torch.Tensor:
    """(2B,) reference sums: from the frozen reference model, or from the precomputed table."""
    if run.ref_policy is not None:
        return completion_logps(run.ref_policy, batch)[0]
    table = precomputed_reference(run)
    rows = torch.stack([table[s["split"]][s["index"]] for s in samples])  # (B, 2): chosen, rejected
    return torch.cat([rows[:, 0], rows[:, 1]]).to(run.device)


def precomputed_reference(run) -> dict[str, torch.Tensor]:
    """{split: (N, 2) chosen/rejected reference sums}, computed once before the first update and saved.

    Before any optimizer step the policy IS the reference, so we score every train and eval pair
    with it, all ranks splitting the work, and save the table in out_dir: later epochs and resumed
    runs read it back instead of keeping a second model in memory (--precompute-ref-logps).
    """
    if run.ref_logps_table is not None:
        return run.ref_logps_table
    path = Path(run.cfg.out_dir) / "ref_logps.pt"
    # Only a resumed run (step > 0) reads the file: at step 0 the policy is the reference, and a table
    # left in out_dir by an earlier run (another model or dataset, or --no-resume) would be stale.
    if path.exists() and run.step > 0:
        run.ref_logps_table = torch.load(path)
        return run.ref_logps_table
    if run.step > 0:
        raise ValueError(f"{path} is missing, and after training started the reference can no longer be recomputed; "
                         "restart the run from scratch (or drop --precompute-ref-logps)")  # fmt: skip
    table = {}
    for split, dataset in ((run.cfg.train_split, run.train_data), (run.cfg.eval_split, run.eval_data)):
        if dataset is None:
            continue
        per_rank = -(-len(dataset) // run.world_size)  # ceil: the last rank pads with repeats
        mine = [min(i, len(dataset) - 1) for i in range(run.rank * per_rank, (run.rank + 1) * per_rank)]
        sums = []
        for start in tqdm(range(0, per_rank, run.cfg.batch_size), desc=f"reference log-probs ({split})", disable=run.rank != 0):
            # agreed before the forward (a collective): a bad sample stops every rank, naming it
            samples, _ = on_every_rank(lambda: fetch_samples(
                dataset, mine[start : start + run.cfg.batch_size], DATA_FORMAT, split, run.cfg.skip_bad_samples, run.check_sample
            ), run.device)  # fmt: skip
            pair_sums = completion_logps(run.policy, encode_pairs(samples, run).to(run.device))[0]  # (2b,)
            sums.append(torch.stack(pair_sums.chunk(2), dim=1))  # (b, 2)
        table[split] = all_gather_rows(torch.cat(sums))[: len(dataset)].cpu()  # rank-major = index order
    if run.rank == 0:
        torch.save(table, path)
    run.ref_logps_table = table
    return table


def prepare(samples: list[dict], run) -> tuple[list[MicroBatch], dict]:
    """Encode one optimizer step's pairs into micro-batches and score them with the reference."""
    size = run.cfg.batch_size
    error, batches = None, []
    try:
        batches = [encode_pairs(samples[i : i + size], run).to(run.device) for i in range(0, len(samples), size)]
    except BadSampleError as err:
        error = err
    agree_on_failure(error, run.device)
    refs = [reference_logps(samples[i : i + size], b, run) for i, b in zip(range(0, len(samples), size), batches)]
    chosen_tokens = sum(float(b.mask.chunk(2)[0].sum()) for b in batches)
    num_pairs, num_chosen_tokens = all_reduce_sum([float(len(samples)), chosen_tokens], run.device)
    micro = [MicroBatch(b, r, num_pairs, num_chosen_tokens) for b, r in zip(batches, refs)]
    stats = {"truncated_rows": sum(b.num_truncated for b in batches)}  # rows whose answer was cut at --max-length
    return micro, stats


def _pair_loss(micro: MicroBatch, policy, run) -> tuple[torch.Tensor, dict]:
    sums, logps = completion_logps(policy, micro.batch)
    chosen, rejected = sums.chunk(2)  # (B,) each
    ref_chosen, ref_rejected = micro.ref_logps.chunk(2)
    lengths = micro.batch.mask.sum(1).chunk(2)
    num_pairs = chosen.shape[0]
    # Normalise by the whole step (all micro-batches, all ranks; FSDP sums gradients), as SFT does, so
    # accumulation and data parallelism give the big-batch gradient. mpo_loss averages the pair terms over this
    # micro-batch, so we scale its result by share = B / P_step; its sft term then needs
    # chosen_nll = (NLL sum / T_step) / share to come out as the step's token mean.
    share = num_pairs / micro.num_step_pairs
    nll_sum = -(logps.chunk(2)[0] * micro.batch.mask.chunk(2)[0]).sum()
    chosen_nll = nll_sum / micro.num_step_chosen_tokens / share
    value, metrics = mpo_loss(
        chosen, rejected, ref_chosen, ref_rejected, chosen_nll, run.cfg.beta, run.cfg.loss_types, run.cfg.loss_weights,
        chosen_lengths=lengths[0], rejected_lengths=lengths[1],
    )  # fmt: skip
    return value * share, {k: float(v) for k, v in metrics.items()}


def loss(micro: MicroBatch, run) -> tuple[torch.Tensor, dict]:
    return _pair_loss(micro, run.policy, run)


@torch.no_grad()
def evaluate(samples: list[dict], run) -> dict:
    """Implicit-reward metrics on held-out pairs (rewards/accuracies is the headline)."""
    micro, _ = prepare(samples, run)  # one "step" over the held-out pairs
    totals: dict[str, float] = {}
    for m in micro:
        _, metrics = _pair_loss(m, run.policy, run)
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + value / len(micro)
    return mean_over_ranks({f"eval/{k}": v for k, v in totals.items()}, run.device)
