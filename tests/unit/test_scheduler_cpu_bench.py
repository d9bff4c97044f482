"""bench/sim/scheduler_cpu.py: its section of the simulator's JSON, written beside what is there."""

from __future__ import annotations

import json

import pytest

from bench.sim import scheduler_cpu


def test_writes_its_summary_and_keeps_the_rest_of_the_file(tmp_path):
    out = tmp_path / "scaling_sim.json"
    out.write_text(json.dumps({"summary": {"kept": 1}}))
    result = scheduler_cpu.main(["--engines", "1,4", "--steps", "1", "--warmup", "1",
                                 "--schedulers", "new", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["summary"] == {"kept": 1}
    rows = saved["scheduler_cpu"]["by_scheduler"]["new"]
    assert [r["engines"] for r in rows] == [1, 4]
    assert [r["in_flight_groups"] for r in rows] == [8, 32]  # 4 groups per engine, over-provision 2
    for r in rows:
        assert "steps" not in r and r["measured_steps"] == 1  # a summary, not every step
        assert 0 < r["scheduler_cpu_s_per_step"]["median"] <= r["loop_cpu_s_per_step"]
        assert 0 < r["metric_rollout_scheduler_cpu_s"] <= r["scheduler_cpu_s_per_step"]["max"]
    assert saved == json.loads(json.dumps(result))


def test_an_old_commit_missing_from_the_clone_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="is not in this clone"):
        scheduler_cpu.main(["--engines", "1", "--schedulers", "old", "--old-ref", "0" * 40,
                            "--out", str(tmp_path / "x.json")])
