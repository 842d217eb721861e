"""Tests for nanoalign/rewards.py: the built-in rewards, the timeout/failure counters, loading, scoring."""

import math
import threading
import time

import pytest
import torch

from nanoalign import rewards
from nanoalign.rewards import (
    RewardStats,
    accuracy_reward,
    format_reward,
    load_reward_funcs,
    score_completions,
    think_format_reward,
    verify_answers,
)

GOOD = "<think>There are 3 shapes.</think> The answer is \\boxed{3}."
WRONG = "<think>There are 4 shapes.</think> The answer is \\boxed{4}."


# ---------------------------------------------------------------------------------------------------
# accuracy_reward


@pytest.mark.parametrize("gold", ["3", "$3$", "\\boxed{3}", 3])
def test_accuracy_correct_and_wrong_numeric_answers(gold):
    # A bare "3" (or the int 3) only parses because it is wrapped in $...$ first.
    stats = RewardStats()
    scores = accuracy_reward([GOOD, WRONG], solution=[gold, gold], reward_stats=stats)
    assert scores == [1.0, 0.0]
    assert stats == RewardStats()  # nothing failed


def test_accuracy_equivalent_forms_and_missing_answer():
    scores = accuracy_reward(
        ["\\boxed{\\frac{6}{2}}", "\\boxed{3.0}", "<think>no idea</think> I give up."],
        solution=["3", "3", "3"],
    )
    # A completion without any answer is a wrong answer (0.0), not an unscorable sample.
    assert scores == [1.0, 1.0, 0.0]


def test_accuracy_unparseable_gold_is_none_and_counted():
    stats = RewardStats()
    # "$$" has no expression; "\frac{" parses only to the raw-string fallback.
    scores = accuracy_reward([GOOD, GOOD, GOOD], solution=["$$", "$\\frac{$", "3"], reward_stats=stats)
    assert scores == [None, None, 1.0]
    assert stats == RewardStats(num_bad_gold=2)


def test_accuracy_hanging_verify_times_out_as_counted_failure(monkeypatch):
    def slow_verify(*args, **kwargs):
        time.sleep(3.0)
        return True

    monkeypatch.setattr(rewards, "verify", slow_verify)
    stats = RewardStats()
    start = time.perf_counter()
    scores = accuracy_reward([GOOD], solution=["3"], reward_stats=stats, timeout_s=0.3)
    elapsed = time.perf_counter() - start
    assert scores == [None]  # never a silent 0.0
    assert stats == RewardStats(num_timeouts=1)
    assert elapsed < 1.5, f"took {elapsed:.2f}s; the 0.3s timeout was not enforced"


@pytest.fixture
def parse_fails_on_boom(monkeypatch):
    """math-verify's parse raises on any text containing "boom" (an internal sympy failure)."""
    real_parse = rewards.parse

    def flaky_parse(text, **kwargs):
        if "boom" in text:
            raise RuntimeError("sympy exploded")
        return real_parse(text, **kwargs)

    monkeypatch.setattr(rewards, "parse", flaky_parse)


def test_accuracy_exception_in_parse_is_counted_failure(parse_fails_on_boom):
    stats = RewardStats()
    scores = accuracy_reward([GOOD, "\\boxed{boom}"], solution=["3", "3"], reward_stats=stats)
    assert scores == [1.0, None]
    assert stats == RewardStats(num_errors=1)


def test_accuracy_internal_math_verify_errors_are_not_silent_zeros(monkeypatch):
    # math-verify swallows its own exceptions into [] / False (a silent 0.0) unless raise_on_error=True.
    import math_verify.grader

    def broken_compare(*args, **kwargs):
        raise TypeError("cannot compare")

    monkeypatch.setattr(math_verify.grader, "sympy_expr_eq", broken_compare)
    stats = RewardStats()
    assert accuracy_reward([GOOD], solution=["3"], reward_stats=stats) == [None]
    assert stats == RewardStats(num_errors=1)


def test_accuracy_works_off_the_main_thread():
    # math-verify's own signal.alarm timeouts raise off the main thread; ours must not rely on them.
    result = {}

    def worker():
        result["scores"], result["stats"] = verify_answers([GOOD, WRONG], ["$3$", "$3$"])

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(timeout=30)
    assert result["scores"] == [1.0, 0.0]
    assert result["stats"] == RewardStats()


def test_accuracy_requires_solution_column():
    with pytest.raises(ValueError, match="'solution' column"):
        accuracy_reward([GOOD], prompts=["How many shapes?"])


def test_accuracy_rejects_non_text_completions():
    with pytest.raises(ValueError, match="completion 0 is a list"):
        accuracy_reward([[{"role": "assistant", "content": GOOD}]], solution=["3"])


# ---------------------------------------------------------------------------------------------------
# format rewards


@pytest.mark.parametrize(
    "completion, expected",
    [
        (GOOD, 1.0),
        ("<think>\nmulti\nline\n</think>\n\\boxed{\\frac{1}{2}}", 1.0),
        ("The answer is \\boxed{3}.", 0.0),  # no think block
        ("<think>There are 3 shapes.</think> The answer is 3.", 0.0),  # no \boxed
        ("<think>maybe \\boxed{3}</think> The answer is 3.", 0.0),  # \boxed only inside think
        ("<think>x</think> \\boxed{}", 0.0),  # empty box
        ("Sure! <think>x</think> \\boxed{3}", 0.0),  # text before the think block
        ("<think>x</think><think>y</think> \\boxed{3}", 0.0),  # two think blocks
        ("<think>x</think> y</think> \\boxed{3}", 0.0),  # a second </think> in the answer
        ("<think>x \\boxed{3}", 0.0),  # think never closed
    ],
)
def test_format_reward(completion, expected):
    assert format_reward([completion]) == [expected]


@pytest.mark.parametrize(
    "completion, expected",
    [
        (GOOD, 1.0),
        ("<think></think>3", 1.0),  # TRL accepts an empty think block and any answer
        ("Answer: <think>x</think> 3", 0.0),  # must start with <think>
        ("<think>x 3", 0.0),  # unclosed
        ("<think>a<think>b</think> 3", 0.0),  # nested / second <think>
    ],
)
def test_think_format_reward(completion, expected):
    assert think_format_reward([completion]) == [expected]


# ---------------------------------------------------------------------------------------------------
# load_reward_funcs


def test_load_builtin_names():
    assert load_reward_funcs(["accuracy", "format", "think_format"]) == [
        accuracy_reward,
        format_reward,
        think_format_reward,
    ]


def test_load_custom_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_mod.py").write_text(
        "def length_reward(completions, **columns):\n"
        "    return [float(len(c)) for c in completions]\n"
        "NOT_CALLABLE = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    [fn] = load_reward_funcs(["my_rewards_mod:length_reward"])
    assert fn(["ab", "abc"]) == [2.0, 3.0]
    assert rewards.reward_name(fn) == "length"

    with pytest.raises(ValueError, match="no attribute 'missing'"):
        load_reward_funcs(["my_rewards_mod:missing"])
    with pytest.raises(ValueError, match=r"'my_rewards_mod:NOT_CALLABLE' is not a callable \(a int\)"):
        load_reward_funcs(["my_rewards_mod:NOT_CALLABLE"])


@pytest.mark.parametrize(
    "spec, message",
    [
        ("accurracy", "unknown reward function 'accurracy'"),
        ("some.module:", "unknown reward function"),
        ("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
    ],
)
def test_load_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message) as info:
        load_reward_funcs([spec])
    assert "--reward-funcs" in str(info.value)


# ---------------------------------------------------------------------------------------------------
# score_completions


def const_reward(completions, **columns):
    return [1.0, None, 0.0]


def half_reward(completions, **columns):
    return [0.5, 0.5, None]


def test_score_weighting_nan_and_metrics():
    rewards_, metrics = score_completions([const_reward, half_reward], [2.0, -1.0], ["a", "b", "c"], {})
    expected = torch.tensor([[2.0, -0.5], [math.nan, -0.5], [0.0, math.nan]])  # w_k * r_ik
    torch.testing.assert_close(rewards_, expected, equal_nan=True)
    assert metrics["rewards/const/mean"] == pytest.approx(0.5)  # unweighted nanmean of [1, 0]
    assert metrics["rewards/const/std"] == pytest.approx(math.sqrt(0.5))  # Bessel: (0.25+0.25)/1
    assert metrics["rewards/const/failure_rate"] == pytest.approx(1 / 3)
    assert metrics["rewards/half/mean"] == pytest.approx(0.5)
    assert "rewards/const/timeout_rate" not in metrics  # no reward_stats keyword -> no breakdown


def test_score_passes_columns_and_reports_stats_breakdown():
    seen = {}

    def spy_reward(completions, solution, prompts, reward_stats=None):
        seen.update(solution=solution, prompts=prompts, stats=reward_stats)
        reward_stats.num_timeouts += 1
        return [None, 1.0]

    columns = {"solution": ["1", "2"], "prompts": ["p", "q"]}
    _, metrics = score_completions([spy_reward], [1.0], ["x", "y"], columns)
    assert seen["solution"] == ["1", "2"] and seen["prompts"] == ["p", "q"]
    assert isinstance(seen["stats"], RewardStats)
    assert metrics["rewards/spy/timeout_rate"] == 0.5
    assert metrics["rewards/spy/failure_rate"] == 0.5


def test_score_accuracy_failures_show_up_in_metrics(parse_fails_on_boom):
    completions = [GOOD, "\\boxed{boom}", GOOD, WRONG]
    _, metrics = score_completions([accuracy_reward], [1.0], completions, {"solution": ["3", "3", "$$", "3"]})
    assert metrics["rewards/accuracy/error_rate"] == 0.25
    assert metrics["rewards/accuracy/bad_gold_rate"] == 0.25
    assert metrics["rewards/accuracy/timeout_rate"] == 0.0
    assert metrics["rewards/accuracy/failure_rate"] == 0.5
    assert metrics["rewards/accuracy/mean"] == 0.5  # [1.0, 0.0] after dropping the Nones


def test_score_wrong_length_is_value_error():
    with pytest.raises(ValueError, match=r"'const' returned 3 values for 2 completions"):
        score_completions([const_reward], [1.0], ["a", "b"], {})


def test_score_non_number_is_value_error():
    def text_reward(completions, **columns):
        return ["1.0" for _ in completions]

    with pytest.raises(ValueError, match=r"'text' returned a str \('1.0'\) for sample 0"):
        score_completions([text_reward], [1.0], ["a"], {})


def test_score_raising_function_is_runtime_error_with_advice():
    def broken_reward(completions, **columns):
        raise KeyError("answer")

    with pytest.raises(RuntimeError) as info:
        score_completions([broken_reward], [1.0], ["a", "b", "c", "d"], {"solution": list("1234")})
    message = str(info.value)
    assert "'broken'" in message
    assert "batch of 4 completions" in message
    assert "return None" in message
    assert isinstance(info.value.__cause__, KeyError)


def test_gold_warning_names_the_dataset_sample(caplog):
    scores, stats = verify_answers(["\\boxed{3}", "\\boxed{3}"], ["3", "\\frac{"], sample_ids=["a", "sample 7 (completion 1)"])
    assert scores == [1.0, None] and stats.num_bad_gold == 1
    assert "sample 7 (completion 1): gold" in caplog.text
