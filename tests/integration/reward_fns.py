"""Reward functions that misbehave, referenced by recipes in the trainer tests."""


def judge_down(prompts, completions, **columns):
    raise ConnectionError("judge unreachable")


def constant(prompts, completions, **columns):
    """The same reward for every completion: dynamic sampling rejects every group."""
    return [0.5] * len(completions)


def sleeps(prompts, completions, **columns):
    """A judge that hangs: far longer than any test's task.reward_timeout."""
    import time

    time.sleep(30)
    return [1.0] * len(completions)


def divides_by_zero(prompts, completions, **columns):
    """A bug that raises on every call."""
    return [len(c) / 0 for c in completions]


def crashes(prompts, completions, **columns):
    """A worker that dies mid-call (as a segfaulting extension would)."""
    import os

    os._exit(3)


def length(prompts, completions, **columns):
    """A well-behaved reward: the completion's length."""
    return [float(len(c)) for c in completions]


def pid(prompts, completions, **columns):
    """The process the call ran in (tests check where functions run)."""
    import os

    return [float(os.getpid())] * len(completions)
