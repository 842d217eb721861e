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
The numbers follow Hugging Face TRL's DPOTrainer v1.9-v1.16 (REFERENCE.md, "DPO / MPO").

Simplified / decided here:
    - pure functions on sequence log-prob sums; the caller runs the policy and the frozen reference.
    - no label smoothing, no BCO running-mean reward shift (TRL dropped it in 0.29).
    - ipo divides each term by its own token count (TRL averages the log-probs of every term when
      "ipo" is requested); the reward metrics always use the sums.
    - the sft term is passed in (chosen_nll), because only the caller has the per-token logits.
"""

import torch
import torch.nn.functional as F

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
