"""Killed anywhere, resumed exactly: bench/chaos/chaos.py's random-kill experiment, at test size.

Six SIGKILLs of a real `rl-train` (inside each phase of a step, during the engine start, and at a
random moment), a resume after each, then the checks of bench/chaos/chaos.py: no process outlives
its run, no cut checkpoint is taken, one trained-uid entry per step, every drawn uid trained once,
buffered or dropped with a reason, and the final checkpoint loads in transformers and vLLM. Six
is every kind of kill once; the benchmark (`python -m bench.chaos.chaos`, 10 kills) adds more
random moments. ~3-4 minutes on 2 cores (every resume starts the engine again).
ROLLOVER_CHAOS_KILLS changes the number of kills.
"""

from __future__ import annotations

import json
import os

import pytest

from bench.chaos import chaos

pytestmark = pytest.mark.integration


def test_killed_anywhere_resumed_exactly(tmp_path):
    kills = int(os.environ.get("ROLLOVER_CHAOS_KILLS", len(chaos.FAILPOINTS) + 2))
    report = chaos.chaos(tmp_path / "run", kills=kills, seed=int(os.environ.get("ROLLOVER_CHAOS_SEED", "0")))
    (tmp_path / "chaos.json").write_text(json.dumps(report, indent=2))
    rounds = report["rounds"]
    assert len(rounds) == kills >= len(chaos.FAILPOINTS) + 2
    assert {r["kind"] for r in rounds} >= {*chaos.FAILPOINTS, "startup", "random"}
    failed = [name for name, ok in report["checks"].items() if not ok]
    assert not failed, (failed, [{k: r[k] for k in ("kind", "returncode", "left_running", "output_tail")}
                                 for r in rounds], report["final_output_tail"])
    # Each kill but the startup one lands after a new checkpoint (failpoints: in the second step).
    assert report["final"]["steps"] >= kills - 1
    assert report["final"]["returned"] == chaos.GROUPS * report["final"]["steps"]
