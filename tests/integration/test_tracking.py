"""Tracking: metrics.jsonl always, W&B offline without an API key (the real wandb package)."""

import json

import pytest

from rollover.trainer.config import TrackingConfig
from rollover.trainer.tracking import Tracker, wandb_mode

pytestmark = pytest.mark.integration


def test_offline_wandb_run_and_metrics_file(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert wandb_mode("auto") == "offline"
    tracker = Tracker(TrackingConfig(), tmp_path, {"rollout": {"group_size": 4}}, "t")
    tracker.log(1, {"reward": 0.5, "rollout/drops": {"filtered": 2}})
    tracker.log_samples(1, [("1+1=", "#2", 1.0)])
    tracker.log(2, {"reward": 0.75})
    run_id = (tmp_path / "wandb_id").read_text()
    tracker.finish({"eval_accuracy_last": 0.5})
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "reward": 0.5, "rollout/drops": {"filtered": 2}}, {"step": 2, "reward": 0.75}]
    offline_runs = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline_runs) == 1 and list(offline_runs[0].glob("*.wandb"))
    assert "wandb sync" in capsys.readouterr().err
