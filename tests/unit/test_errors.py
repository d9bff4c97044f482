"""One error vocabulary (tasks/errors.py): rl-train reads the exit status off the error itself.

Each case runs `rl-train`'s main in a child process with one step replaced by a function that
raises an error class defined right there, which no handler in trainer/run.py can list: the run
must still end in one line with that class's status, never a traceback.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

CASES = {
    # (what raises, base class, expected status, expected stderr line start)
    "usage_before_the_engine": ("run.build_task", "UsageError", 2, "rl-train: error: made-up mistake"),
    "failure_after_the_engine": ("run.build_trainer", "RolloverError", 1, "rl-train: stopped at step 0: made-up mistake"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_new_error_class_is_one_line_with_its_own_exit_status(case, tmp_path):
    target, base, status, line = CASES[case]
    script = textwrap.dedent(f"""
        import sys
        from types import SimpleNamespace
        from rollover.tasks.errors import RolloverError, UsageError
        from rollover.trainer import cli, run

        class MadeUp({base}):
            pass

        def fail(*args, **kwargs):
            raise MadeUp("made-up mistake\\nwith a second line nobody should see")

        run.start_engines = lambda settings, cluster: SimpleNamespace(shutdown=lambda: None)
        {target} = fail
        sys.exit(cli.main(["recipes/grpo_math.yaml", "train.output_dir={tmp_path / 'run'}",
                           "tracking.wandb=disabled"]))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == status, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "second line" not in done.stderr, done.stderr[-3000:]
    errors = [text for text in done.stderr.splitlines() if text.startswith("rl-train:")]
    assert len(errors) == 1 and errors[0].startswith(line), done.stderr[-3000:]
