"""Reward functions for the online methods (GRPO, GSPO, RLOO, Online DPO) and the helper that scores a batch.

A reward function follows TRL's protocol, fn(completions: list[str], **columns) -> list[float | None]:
`completions` are the decoded texts, `columns` the dataset's columns for the same rows (e.g. `solution=[...]`)
plus `prompts=[...]`. None means "this function cannot score this sample"; the algorithms treat it as NaN
(rl.combine_rewards). A function that declares a `reward_stats` keyword gets a fresh RewardStats per call
(counts per step, no global). Built-ins: format, think_format (regexes of the "<think>...</think> answer"
layout) and accuracy (math-verify against the gold `solution`, with a wall-clock timeout that works off the
main thread). `accuracy()` is train.py's held-out eval: greedy answers checked the same way.

Simplified compared with TRL / open-r1:
- Completions are plain strings; no conversational (list-of-messages) completions.
- No async reward functions and no reward models; a reward model can be wrapped as a plain function.
- accuracy_reward uses one math-verify configuration (LaTeX extraction, first match) for gold and
  answer; TRL tunes the answer-side normalization separately.
- A timed-out math-verify call cannot be killed (Python threads cannot be interrupted); it is abandoned
  in a daemon thread. Fine for rare pathological inputs; if timeouts are frequent, use a process pool.
- Metrics are per rank; the trainer averages them across ranks.
"""

import functools
import importlib
import inspect
import logging
import math
import numbers
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch
from math_verify import LatexExtractionConfig, parse, verify
from sympy import Basic, MatrixBase

from nanoalign.rollout import generating, sample_completions

logger = logging.getLogger(__name__)
# We turn math-verify's signal-based timeouts off on purpose (see _verify_one) and enforce our own;
# it warns about that on every call, which would flood the training log.
logging.getLogger("math_verify").setLevel(logging.ERROR)

RewardFunc = Callable[..., list[float | None]]


# ----- Counters


@dataclass
class RewardStats:
    """Why samples of one reward-function call were scored None, filled by the function; logged as
    rewards/<name>/{bad_gold,error,timeout}_rate, which add up to its failure_rate."""

    num_bad_gold: int = 0  # the gold answer could not be parsed into a math expression
    num_errors: int = 0  # parsing or verifying raised an exception
    num_timeouts: int = 0  # parsing + verifying one sample took longer than the timeout
    sample_ids: list[str] | None = None  # set by score_completions: which dataset sample each completion is of

    def add(self, other: "RewardStats") -> None:
        self.num_bad_gold += other.num_bad_gold
        self.num_errors += other.num_errors
        self.num_timeouts += other.num_timeouts

    def rates(self, num_samples: int) -> dict[str, float]:
        return {"bad_gold_rate": self.num_bad_gold / num_samples, "error_rate": self.num_errors / num_samples,
                "timeout_rate": self.num_timeouts / num_samples}  # fmt: skip


# ----- Format rewards

# TRL's think_format_reward pattern: "<think>" first, closed by the first "</think>", no second "<think>" anywhere
# (the lookahead). Group 1 is the reasoning, group 2 everything after the first "</think>" (the answer).
_THINK_BLOCK = re.compile(r"^<think>(?!.*<think>)(.*?)</think>(.*)$", re.DOTALL)
# A \boxed{...} whose content is not empty or blank: "\boxed{3}", "\boxed{\frac{1}{2}}", not "\boxed{}".
_BOXED = re.compile(r"\\boxed\{\s*[^\s}].*\}", re.DOTALL)


def _check_texts(completions: list, fn_name: str) -> None:
    """Chat messages (TRL's conversational format) would fail deep inside re with a bare TypeError."""
    for i, c in enumerate(completions):
        if not isinstance(c, str):
            raise ValueError(f"{fn_name}: completion {i} is a {type(c).__name__}, expected the decoded completion "
                             "text (str). Decode completions before scoring them.")  # fmt: skip


def think_format_reward(completions: list[str], **columns: list) -> list[float | None]:
    """1.0 if the completion starts with one "<think>...</think>" block (TRL semantics), else 0.0."""
    _check_texts(completions, "think_format_reward")
    return [1.0 if _THINK_BLOCK.match(c) else 0.0 for c in completions]


def format_reward(completions: list[str], **columns: list) -> list[float | None]:
    """1.0 if the completion is "<think>...</think>" then an answer (closing no second think block) with a
    non-empty \\boxed{...}, e.g. "<think>There are 3 shapes.</think> The answer is \\boxed{3}."."""
    _check_texts(completions, "format_reward")
    matches = [_THINK_BLOCK.match(c) for c in completions]
    return [1.0 if m is not None and "</think>" not in m.group(2) and _BOXED.search(m.group(2)) is not None else 0.0 for m in matches]


# ----- Accuracy reward (math-verify)

# One extraction config for gold and answer: LaTeX only ($...$, \(...\), \[...\], \boxed{...}),
# stop at the first match (math-verify tries the highest-priority, rightmost match first).
_EXTRACTION = [LatexExtractionConfig()]


def _gold_as_latex(gold: Any, index: int) -> str:
    """The gold answer as LaTeX that math-verify's LaTeX extraction can find."""
    if isinstance(gold, numbers.Real) and not isinstance(gold, bool):
        gold = str(gold)  # datasets often store numeric answers as numbers
    if not isinstance(gold, str):
        raise ValueError(f"accuracy_reward: solution {index} is a {type(gold).__name__} ({gold!r}); expected the gold "
                         "answer as a string such as '3' or '$3$'. Fix the 'solution' column of the dataset.")  # fmt: skip
    # LaTeX extraction only looks inside math delimiters, so a bare "3" would parse to nothing.
    if not any(d in gold for d in ("$", "\\boxed", "\\(", "\\[")):
        gold = f"${gold}$"
    return gold


def _verify_one(completion: str, gold_latex: str) -> float | None:
    """1.0 / 0.0 for one sample, or None if the gold has no math expression. May raise; may hang."""
    # parsing_timeout=None / timeout_seconds=None: math-verify's signal.alarm timeouts work only on the main thread;
    # _run_with_timeout enforces the limit instead. raise_on_error=True: an internal failure raises (counted) instead
    # of a silent 0.0. Malformed LaTeX does not raise: it parses to a plain-string fallback.
    gold = parse(gold_latex, extraction_config=_EXTRACTION, extraction_mode="first_match",
                 parsing_timeout=None, raise_on_error=True)
    # An unparseable gold yields [] or only the raw-string fallback ("\frac{" -> ['\\frac{']), which
    # would be compared by string equality. Neither is a real gold answer: not scorable.
    # (TRL returns 1.0 here; we return None and count it: README.md, "Differences from TRL".)
    if not any(isinstance(g, (Basic, MatrixBase)) for g in gold):
        return None
    answer = parse(completion, extraction_config=_EXTRACTION, extraction_mode="first_match",
                   parsing_timeout=None, raise_on_error=True)
    # A completion with no answer parses to [] and verifies False: a wrong answer (0.0), not a failure.
    return float(verify(gold, answer, timeout_seconds=None, raise_on_error=True))


def _run_with_timeout(fn: Callable[[], Any], timeout_s: float) -> tuple[str, Any]:
    """Run fn() with a wall-clock limit -> ("ok", value) | ("error", exception) | ("timeout", None).

    A daemon thread per call (~0.1 ms), not a ThreadPoolExecutor: executor threads are joined at exit, so a
    sympy call that never returns would hang the trainer on shutdown and block every sample queued behind it.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except Exception as e:  # handed back to the caller, which counts it and logs it
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True, name="nanoalign-verify")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        return "timeout", None  # abandoned: it finishes (or not) in the background
    if "error" in box:
        return "error", box["error"]
    return "ok", box["value"]


def verify_answers(completions: list[str], solutions: list[Any], timeout_s: float = 5.0,
                   sample_ids: list[str] | None = None) -> tuple[list[float | None], RewardStats]:  # fmt: skip
    """Score each completion against its gold answer with math-verify -> (scores, stats).

    1.0 correct, 0.0 wrong or no answer found, None when the gold does not parse (num_bad_gold), parse/verify
    raised (num_errors) or took more than timeout_s of wall clock (num_timeouts). Safe off the main thread.
    sample_ids (one per completion) name the samples in the warning.
    """
    _check_texts(completions, "accuracy_reward")
    stats = RewardStats()
    scores: list[float | None] = []
    first_problem: str | None = None  # for the log line: which sample, what went wrong
    names = sample_ids or [f"completion {i}" for i in range(len(completions))]
    for i, (completion, solution) in enumerate(zip(completions, solutions)):
        gold_latex = _gold_as_latex(solution, i)
        status, value = _run_with_timeout(functools.partial(_verify_one, completion, gold_latex), timeout_s)
        if status == "ok" and value is None:
            stats.num_bad_gold += 1
            first_problem = first_problem or f"{names[i]}: gold {solution!r} does not parse"
        elif status == "error":
            stats.num_errors += 1
            first_problem = first_problem or f"{names[i]}: {type(value).__name__}: {value}"
        elif status == "timeout":
            stats.num_timeouts += 1
            first_problem = first_problem or f"{names[i]}: timed out after {timeout_s}s"
        scores.append(value if status == "ok" else None)

    if first_problem is not None:
        logger.warning("accuracy_reward: %d of %d samples scored None (bad gold %d, errors %d, timeouts %d); first: %s",
                       sum(s is None for s in scores), len(scores), stats.num_bad_gold, stats.num_errors, stats.num_timeouts,
                       first_problem)  # fmt: skip
    return scores, stats


def accuracy_reward(completions: list[str], solution: list[Any] | None = None, *, reward_stats: RewardStats | None = None,
                    timeout_s: float = 5.0, **columns: list) -> list[float | None]:  # fmt: skip
    """1.0 if the completion's first LaTeX answer equals the gold `solution` (math-verify), else 0.0; None for
    samples that cannot be scored (verify_answers), counted in `reward_stats`. Gold may be "3", "$3$" or "\\boxed{3}"."""
    if solution is None:
        raise ValueError(f"accuracy_reward needs a 'solution' column with the gold answers; the batch has columns "
                         f"{sorted(columns)}. Add it to the dataset or drop 'accuracy' from --reward-funcs.")  # fmt: skip
    scores, stats = verify_answers(completions, solution, timeout_s, reward_stats.sample_ids if reward_stats else None)
    if reward_stats is not None:
        reward_stats.add(stats)
    return scores


# ----- Loading and scoring

BUILTIN_REWARD_FUNCS: dict[str, RewardFunc] = {"accuracy": accuracy_reward, "format": format_reward, "think_format": think_format_reward}


def load_reward_funcs(specs: list[str]) -> list[RewardFunc]:
    """--reward-funcs specs -> callables. A spec is a built-in name or "package.module:function"."""
    funcs = []
    for spec in specs:
        if spec in BUILTIN_REWARD_FUNCS:
            funcs.append(BUILTIN_REWARD_FUNCS[spec])
            continue
        module_name, sep, attr = spec.partition(":")
        if not sep or not module_name or not attr:
            raise ValueError(f"--reward-funcs: unknown reward function {spec!r}. Use a built-in name "
                             f"({', '.join(BUILTIN_REWARD_FUNCS)}) or an import path 'package.module:function'.")  # fmt: skip
        try:
            module = importlib.import_module(module_name)
        except Exception as e:  # ImportError, or an error raised while the module runs: cannot load
            raise ValueError(f"--reward-funcs: cannot import module {module_name!r} for spec {spec!r} "
                             f"({type(e).__name__}: {e}). Check that it is installed or on PYTHONPATH.") from e  # fmt: skip
        fn = getattr(module, attr, None)
        if not callable(fn):
            found = f"a {type(fn).__name__}" if hasattr(module, attr) else f"module {module_name!r} has no attribute {attr!r}"
            raise ValueError(f"--reward-funcs: {spec!r} is not a callable ({found}). Point it at a function "
                             "fn(completions, **columns) -> list[float | None].")  # fmt: skip
        funcs.append(fn)
    return funcs


def reward_name(fn: RewardFunc) -> str:
    """Metric name of a reward function: its __name__ without a trailing "_reward"."""
    return getattr(fn, "__name__", type(fn).__name__).removesuffix("_reward")  # callable objects have no __name__


def _check_scores(scores: Any, name: str, num_samples: int) -> list[float]:
    """Validate one function's output -> floats with NaN for None."""
    if not isinstance(scores, (list, tuple)):
        raise ValueError(f"reward function {name!r} returned a {type(scores).__name__}; expected a list of {num_samples} "
                         "values (float or None).")  # fmt: skip
    if len(scores) != num_samples:
        raise ValueError(f"reward function {name!r} returned {len(scores)} values for {num_samples} completions; "
                         "expected exactly one value (float or None) per completion.")  # fmt: skip
    out = []
    for i, s in enumerate(scores):
        if s is None:
            out.append(math.nan)
        elif isinstance(s, numbers.Real) and math.isfinite(s):
            out.append(float(s))
        elif isinstance(s, numbers.Real):  # nan/inf: a silent NaN would look like None, so make it explicit
            raise ValueError(f"reward function {name!r} returned {s} for sample {i}; return None for samples it cannot score.")
        else:
            raise ValueError(f"reward function {name!r} returned a {type(s).__name__} ({s!r}) for sample {i}; expected a float or None.")
    return out


def _accepts_reward_stats(fn: RewardFunc) -> bool:
    try:
        return "reward_stats" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins / C callables without a signature: treat as plain
        return False


def score_completions(reward_funcs: list[RewardFunc], weights: list[float], completions: list[str], columns: dict[str, list],
                      sample_ids: list[str] | None = None) -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
    """Call each reward function once on the batch -> (rewards (N, K) float32 = weights[k] * r_ik, NaN for None; metrics).
    Metrics per function (reward_name): rewards/<name>/mean and /std (unweighted, nan-aware; std ddof=1), /failure_rate
    (fraction scored None, for any reason), and with a `reward_stats` keyword /{bad_gold,error,timeout}_rate."""
    num_samples = len(completions)
    for key in set(columns) & {"completions", "reward_stats"}:
        raise ValueError(f"dataset column {key!r} clashes with a reward-function argument; rename it.")
    names = [reward_name(fn) for fn in reward_funcs]
    if len(set(names)) != len(names):
        raise ValueError(f"reward functions share a name ({names}); their metrics would collide.")

    per_func: list[list[float]] = []  # K lists of N unweighted rewards, NaN for None
    metrics: dict[str, float] = {}
    for fn, name in zip(reward_funcs, names):
        stats = RewardStats(sample_ids=sample_ids) if _accepts_reward_stats(fn) else None
        kwargs = dict(columns, reward_stats=stats) if stats is not None else columns
        try:
            scores = fn(completions, **kwargs)
        except Exception as e:
            raise RuntimeError(f"reward function {name!r} raised {type(e).__name__} on a batch of {num_samples} completions "
                               f"(columns: {sorted(columns)}). Fix it, or make it return None for the samples it cannot "
                               "score instead of raising.") from e  # fmt: skip
        values = _check_scores(scores, name, num_samples)
        per_func.append(values)

        r = torch.tensor(values, dtype=torch.float64)  # (N,)
        valid = r[~r.isnan()]
        metrics[f"rewards/{name}/mean"] = valid.mean().item() if len(valid) else math.nan
        metrics[f"rewards/{name}/std"] = valid.std().item() if len(valid) > 1 else math.nan
        metrics[f"rewards/{name}/failure_rate"] = (len(r) - len(valid)) / num_samples
        if stats is not None:
            for key, rate in stats.rates(num_samples).items():
                metrics[f"rewards/{name}/{key}"] = rate

    rewards = torch.tensor(per_func, dtype=torch.float32).T  # (N, K), unweighted
    rewards = rewards * torch.tensor(weights, dtype=torch.float32)  # (N, K); NaN * w stays NaN
    return rewards, metrics


# ----- Held-out accuracy: greedy answers checked with math-verify (train.py's eval for every algorithm)


def accuracy(model, processor, samples: list[dict], *, batch_size: int, max_new_tokens: int, stop_ids, pad_id, device,
             sampler: str = "nanoalign") -> tuple[float, float, float, list[tuple[str, bool]]]:  # fmt: skip
    """Greedy answers to the samples' prompts checked against their `solution` with math-verify.
    Returns (number correct, number of samples, completion tokens) and each sample's (answer, right)."""
    answers, num_tokens = [], 0.0
    with generating(model):
        for i in range(0, len(samples), batch_size):
            chunk = samples[i : i + batch_size]
            rollout = sample_completions(model, processor, [s["prompt"] for s in chunk], [s["images"] for s in chunk], num_generations=1,
                                         max_new_tokens=max_new_tokens, greedy=True, stop_ids=stop_ids, pad_id=pad_id, device=device,
                                         sampler=sampler)  # fmt: skip
            scores, _ = verify_answers(rollout.texts, [s["solution"] for s in chunk])
            answers += [(text, score == 1.0) for text, score in zip(rollout.texts, scores)]
            num_tokens += sum(len(ids) for ids in rollout.completion_ids)
    return float(sum(right for _, right in answers)), float(len(samples)), num_tokens, answers
