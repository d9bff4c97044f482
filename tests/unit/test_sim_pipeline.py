"""The pipelined simulation (bench/sim/pipelined.py, pipeline_sweep.py, gpu_profile.py): the product's
RolloutAhead over simulated engines, figures worked out by hand or recomputed from the runs."""

from __future__ import annotations

import json

import pytest

from bench.sim import gpu_profile, pipeline_sweep
from bench.sim.pipelined import Profile, StaleTokenTrained, simulate_pipeline
from bench.sim.sim_engine import SimCosts, run_virtual

COSTS = SimCosts(base_s=0.01, per_seq_s=0.001, sync_s=0.5)  # round numbers for hand sums


def constant(length: int, train_s: float = 0.3) -> Profile:
    """Every response `length` tokens (log-normal with sigma 0), exact delivery times."""
    return Profile("hand", COSTS, train_s, median=length, sigma=0.0, max_len=4 * length, quantum=0.0)


def test_synchronous_steps_through_the_pipeline_are_the_hand_computed_sum():
    """1 engine, 2 groups of 8, every response 40 tokens, max_async 0: a step is 40 iterations of
    16 requests (0.01 + 0.016 s each), then the update (0.3 s) and the weight load (0.5 s)."""
    run = run_virtual(simulate_pipeline(constant(40), engines=1, mode="sync", groups_per_engine=2,
                                        warmup=1, steps=3))
    rollout = 40 * (0.01 + 0.001 * 16)
    step = rollout + 0.3 + 0.5
    assert run["seconds_per_step"] == pytest.approx(step, rel=1e-6)
    assert run["useful_tokens_per_s"] == pytest.approx(16 * 40 / step, rel=1e-6)
    assert run["engine_busy"] == pytest.approx(rollout / step, rel=1e-6)
    assert run["trainer_busy"] == pytest.approx(0.3 / step, rel=1e-6)
    assert run["token_lag_max"] == 0 and run["generated_per_useful"] == pytest.approx(1.0)


def test_pipelined_mode_on_two_engines_never_trains_a_token_older_than_max_staleness():
    profile = Profile("cpu-like", SimCosts(), 0.2)  # the CPU workload's long tail, train_s 0.2
    seen = []

    def on_batch(result, version):  # the lag recomputed here from every token's version
        seen.append(max(version - v for g in result.groups for s in g.samples for v in s.versions))

    run = run_virtual(simulate_pipeline(profile, engines=2, mode="april_pipe2", max_staleness=2,
                                        warmup=2, steps=6, on_batch=on_batch))
    assert len(seen) == 8 and max(seen) <= 2
    assert max(seen) >= 1  # the pipeline did train tokens a version or more old: the bound was exercised
    assert run["token_lag_max"] == max(seen[2:])
    assert 0 < run["token_lag_mean"] <= run["token_lag_max"]


def test_the_bound_comes_from_the_pipeline_telling_the_scheduler_the_train_version(monkeypatch):
    """Were the scheduler told the engine's version instead (batches run ahead unaccounted), the
    same run would train tokens older than max_staleness: the bound above is the product's."""
    from rollover.rollout.pipeline import RolloutAhead

    monkeypatch.setattr(RolloutAhead, "train_version", lambda self: self.engine.policy_version)
    with pytest.raises(StaleTokenTrained, match="max_staleness 2"):
        run_virtual(simulate_pipeline(Profile("cpu-like", SimCosts(), 0.2), engines=2, mode="april_pipe2",
                                      max_staleness=2, warmup=2, steps=6))


def test_a_stale_token_handed_to_the_trainer_is_an_error():
    """max_async 1 with max_staleness 0 (which the recipe refuses): every batch produced ahead
    is trained one version after it was generated, and the check says so."""
    with pytest.raises(StaleTokenTrained, match="max_staleness 0"):
        run_virtual(simulate_pipeline(Profile("cpu-like", SimCosts(), 0.2), engines=2, mode="april_pipe1",
                                      max_staleness=0, warmup=0, steps=4))


def test_the_gpu_calibration_cites_every_figure_and_derives_its_costs():
    cal = gpu_profile.calibration()
    for name, fig in cal["figures"].items():
        assert fig["source"] and fig["figure"], name
    assert all(s["source"] and s["value"] for s in cal["published_speedups"].values())
    # by hand: 7.6e9 bf16 weights read per iteration at 77% of 3.35 TB/s; 256 requests at 12,500 tok/s
    base = 2 * 7.6e9 / (3.35e12 * 0.77)
    per_seq = (256 / 12500 - base) / 256
    d = cal["derived_per_real_token"]
    assert d["base_s"] == pytest.approx(base) and d["per_seq_s"] == pytest.approx(per_seq)
    assert d["prefill_per_token_s"] == pytest.approx(2 * 7.6e9 / (989e12 * 0.5))
    assert 0.02 <= d["sync_s"] <= 2.3  # issue 26's published range for 7B-32B models
    costs = gpu_profile.gpu_costs(64)
    assert costs.base_s == pytest.approx(64 * base) and costs.per_seq_s == pytest.approx(64 * per_seq)
    # the train step that makes a 90 s rollout 75% of the step, with a 0.7 s weight load
    assert gpu_profile.train_s_for(90.0, 0.7) == pytest.approx(30.0 - 0.7)


def test_quick_sweep_writes_a_summary_with_computed_ratios_and_keeps_the_file(tmp_path):
    out = tmp_path / "scaling_sim.json"
    out.write_text(json.dumps({"scheduler_cpu": {"kept": 1}}))
    pipeline_sweep.main(["--quick", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["scheduler_cpu"] == {"kept": 1}
    section = saved["pipeline"]
    assert {(r["profile"], r["engines"]) for r in section["runs"]} == {
        (p, e) for p in ("cpu", "gpu") for e in (1, 2)}
    assert all("steps" not in r for r in section["runs"])  # a summary, not every step
    rate = {(r["profile"], r["engines"], r["mode"]): r["useful_tokens_per_s"] for r in section["runs"]}
    for (prof, engines, mode), value in rate.items():
        if mode != "sync":
            assert section["ratios"][prof][str(engines)][f"{mode}_over_sync"] == pytest.approx(
                value / rate[(prof, engines, "sync")])
    # the long tail costs the synchronous loop; overlapping the update gains on top of APRIL
    assert rate[("gpu", 2, "april_pipe1")] > rate[("gpu", 2, "april")] > rate[("gpu", 2, "sync")]
    assert all(r["token_lag_max"] <= r["max_staleness"] for r in section["runs"])
    assert section["calibrations"]["gpu"]["figures"]["rollout_share"]["source"]
    # a second part replaces its own rows and keeps the others
    pipeline_sweep.main(["--quick", "--profiles", "cpu", "--engines", "1", "--modes", "sync", "--out", str(out)])
    again = json.loads(out.read_text())["pipeline"]["runs"]
    assert len(again) == len(section["runs"])


def test_bad_options_are_one_line_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        pipeline_sweep.parse_args(["--profiles", "tpu"])
    assert exc.value.code == 2 and "--profiles takes cpu and/or gpu" in capsys.readouterr().err
