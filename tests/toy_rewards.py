"""Reward functions for tests/test_algorithms.py, loaded by import path (`--reward-funcs toy_rewards:says_three`).

They follow the protocol of nanoalign/rewards.py: fn(completions, **columns) -> list[float | None].
tests/ must be on sys.path (pytest: pythonpath in pyproject.toml; torchrun workers get it through PYTHONPATH).
"""


def says_three(completions, **columns):
    """The toy task: 1 for an answer of 3, whatever the image shows (any policy can learn it fast)."""
    return [1.0 if "\\boxed{3}" in c else 0.0 for c in completions]


def shorter(completions, **columns):
    """A reward that almost never ties (-length / 50), so every group has non-zero advantages."""
    return [-len(c) / 50 for c in completions]


def abstain(completions, **columns):
    """Scores nothing: None for every sample ("not applicable")."""
    return [None for _ in completions]


def explode(completions, **columns):
    """A buggy reward function that raises."""
    raise KeyError("no such column")


def too_few(completions, **columns):
    """A buggy reward function that returns one value for the whole batch."""
    return [1.0]
