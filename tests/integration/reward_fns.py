"""Reward functions that misbehave, referenced by recipes in the trainer tests."""


def judge_down(prompts, completions, **columns):
    raise ConnectionError("judge unreachable")


def constant(prompts, completions, **columns):
    """The same reward for every completion: dynamic sampling rejects every group."""
    return [0.5] * len(completions)
