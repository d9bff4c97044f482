"""Reward functions that misbehave, referenced by recipes in the trainer tests."""


def judge_down(prompts, completions, **columns):
    raise ConnectionError("judge unreachable")
