"""Checkpoints: a manifest written last; damaged checkpoints are skipped on resume."""

import json

from rollover.trainer.checkpoint import find_checkpoint, save_checkpoint
from rollover.trainer.config import LoraConfig, ModelConfig, TrackingConfig
from rollover.trainer.policy import Policy
from rollover.trainer.tracking import Tracker


def two_checkpoints(tiny_model, out):
    policy = Policy(ModelConfig(path=tiny_model, dtype="float32"), LoraConfig())
    first = save_checkpoint(out, 2, policy, {"note": "two"}, keep=3)
    second = save_checkpoint(out, 4, policy, {"note": "four"}, keep=3)
    return first, second


def test_the_latest_intact_checkpoint_is_found(tiny_model, tmp_path):
    first, second = two_checkpoints(tiny_model, tmp_path)
    assert find_checkpoint(tmp_path) == (second, [])
    manifest = json.loads((second / "manifest.json").read_text())["files"]
    assert manifest["model.safetensors"]["size"] == (second / "model.safetensors").stat().st_size


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(tiny_model, tmp_path):
    first, second = two_checkpoints(tiny_model, tmp_path)
    weights = second / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    found, skipped = find_checkpoint(tmp_path)
    assert found == first
    assert skipped == [(second, f"model.safetensors has 1000 bytes, expected "
                                f"{(first / 'model.safetensors').stat().st_size}")]


def test_a_missing_or_altered_file_is_detected(tiny_model, tmp_path):
    first, second = two_checkpoints(tiny_model, tmp_path)
    (second / "tokenizer.json").unlink()
    assert find_checkpoint(tmp_path)[1] == [(second, "tokenizer.json is missing")]
    config = first / "config.json"
    config.write_text(config.read_text().replace("2", "3", 1))  # same size, other bytes
    assert find_checkpoint(tmp_path) == (None, [(second, "tokenizer.json is missing"),
                                                (first, "config.json does not match its checksum")])


def test_resume_keeps_one_metrics_line_per_step(tmp_path):
    tracker = Tracker(TrackingConfig(wandb="disabled"), tmp_path, {}, "t")
    for step in (1, 2, 3, 4, 5):
        tracker.log(step, {"loss": float(step)})
    assert tracker.forget_after(2) == 3
    tracker.log(3, {"loss": 30.0})
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["loss"]) for m in lines] == [(1, 1.0), (2, 2.0), (3, 30.0)]
