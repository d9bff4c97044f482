"""Plain progress lines, the progress bar's stand-in when the console is not a terminal."""

import io

import pytest
from rich.console import Console

from rollover.trainer.tracking import PlainProgress, busy_text, eval_line, format_duration, line_every, step_line


def test_step_line_reads_as_one_plain_line():
    assert step_line(20, 300, 0.4149, "52%", 812.4, 41.7) == (
        "step 20/300  reward 0.41  accuracy 52%  tokens/s 812  elapsed 41 s")
    assert step_line(1, 3, 0.0, "-", 0.0, 0.2) == "step 1/3  reward 0.00  accuracy -  tokens/s 0  elapsed 0 s"


def test_step_line_says_where_the_time_went():
    assert busy_text(0.846, 0.97) == "engine 85% trainer 97%"
    assert step_line(2, 3, 0.5, "50%", 10.0, 1.0, busy="engine 85% trainer 97%") == (
        "step 2/3  reward 0.50  accuracy 50%  tokens/s 10  elapsed 1 s  engine 85% trainer 97%")


@pytest.mark.parametrize("seconds, text", [(0, "0 s"), (59.9, "59 s"), (60, "1 min 00 s"), (725, "12 min 05 s"),
                                           (3599, "59 min 59 s"), (7380, "2 h 03 min")])
def test_durations(seconds, text):
    assert format_duration(seconds) == text


def test_eval_line():
    assert eval_line("eval", 20, 0.5234, 0.518) == "eval at step 20: accuracy 52.3%  reward 0.52"


@pytest.mark.parametrize("steps, every", [(1, 1), (3, 1), (30, 1), (31, 2), (100, 5), (300, 10), (301, 20),
                                          (1000, 50), (5000, 200)])
def test_a_round_number_of_steps_between_lines(steps, every):
    assert line_every(steps) == every


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def progress(clock: Clock) -> tuple[PlainProgress, io.StringIO]:
    out = io.StringIO()
    return PlainProgress(Console(file=out, soft_wrap=True), max_quiet_s=60.0, clock=clock), out


def test_a_line_every_few_steps_at_the_last_step_and_after_a_quiet_minute():
    clock = Clock()
    bar, out = progress(clock)
    with bar:  # train()'s calls on rich's Progress
        task = bar.add_task("train", total=100, completed=0, reward=0.0, accuracy="40%", tokens_per_s=0.0)
        for step in range(1, 13):
            clock.now += 2.0
            bar.update(task, completed=step, reward=step / 100, accuracy="40%", tokens_per_s=500.0)
        clock.now += 61.0  # one slow step: a line although 13 is not a multiple of 5
        bar.update(task, completed=13, reward=0.5, accuracy="45%", tokens_per_s=10.0)
        bar.update(task, completed=13, reward=0.5)  # same step again: no new line
        clock.now += 1.0
        bar.update(task, completed=100, reward=0.6, accuracy="50%", tokens_per_s=900.0)
    assert out.getvalue().splitlines() == [
        "step 5/100  reward 0.05  accuracy 40%  tokens/s 500  elapsed 10 s",
        "step 10/100  reward 0.10  accuracy 40%  tokens/s 500  elapsed 20 s",
        "step 13/100  reward 0.50  accuracy 45%  tokens/s 10  elapsed 1 min 25 s",
        "step 100/100  reward 0.60  accuracy 50%  tokens/s 900  elapsed 1 min 26 s",
    ]


def test_a_resumed_run_counts_from_its_checkpoint():
    clock = Clock()
    bar, out = progress(clock)
    task = bar.add_task("train", total=3, completed=2, reward=0.0, accuracy="-", tokens_per_s=0.0)
    bar.update(task, completed=2)  # no step yet: nothing
    clock.now += 3.0
    bar.update(task, completed=3, reward=0.25, tokens_per_s=100.0)
    assert out.getvalue() == "step 3/3  reward 0.25  accuracy -  tokens/s 100  elapsed 3 s\n"


def test_the_terminal_bar_leaves_third_party_writes_to_the_log(monkeypatch):
    """rich's bar would print what libraries write to sys.stderr above itself, on the console."""
    import sys

    from rollover.trainer.tracking import console, progress_bar

    assert isinstance(progress_bar(), PlainProgress)  # pytest captures stderr: not a terminal
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich: treat the console as a terminal
    assert console.is_terminal
    stdout, stderr = sys.stdout, sys.stderr
    with progress_bar() as bar:
        bar.add_task("train", total=2, reward=0.0, accuracy="-", tokens_per_s=0.0, busy="")
        assert not isinstance(bar, PlainProgress)
        assert sys.stdout is stdout and sys.stderr is stderr
