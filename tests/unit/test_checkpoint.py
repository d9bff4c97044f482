"""Checkpoints: a manifest written last; damaged checkpoints are skipped on resume."""

import json

from rollover.trainer.checkpoint import find_checkpoint, save_checkpoint
from rollover.trainer.config import LoraConfig, ModelConfig, TrackingConfig
from rollover.trainer.policy import Policy
from rollover.trainer.runtime.run_folder import rewind_step_logs
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
    assert rewind_step_logs(tmp_path, 2) == {"metrics.jsonl": 3}
    tracker.log(3, {"loss": 30.0})
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["loss"]) for m in lines] == [(1, 1.0), (2, 2.0), (3, 30.0)]


# ---- kills mid-save (ROLLOVER_FAILPOINT makes the saving process SIGKILL itself there) ---------

SAVE = """
import sys
from pathlib import Path
from rollover.trainer.checkpoint import save_checkpoint

class Weights:  # a policy stand-in: save_checkpoint only calls save_pretrained
    def save_pretrained(self, folder):
        Path(folder, "model.safetensors").write_bytes(b"w" * 4096)

out, note = Path(sys.argv[1]), sys.argv[3]
save_checkpoint(out, int(sys.argv[2]), Weights(), {"note": note}, keep=3)
"""


def save_in_process(out, step, note, failpoint=None):
    """Save checkpoint `step` in a fresh process; returns its exit status (-9: killed itself)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "ROLLOVER_FAILPOINT"}
    if failpoint:
        env["ROLLOVER_FAILPOINT"] = failpoint
    return subprocess.run([sys.executable, "-c", SAVE, str(out), str(step), note], env=env).returncode


def note_of(checkpoint):
    from rollover.trainer.checkpoint import load_trainer_state

    return load_trainer_state(checkpoint)["note"]


def test_a_checkpoint_cut_mid_write_is_never_taken(tmp_path):
    assert save_in_process(tmp_path, 2, "two") == 0
    assert save_in_process(tmp_path, 3, "three", failpoint="checkpoint_write:3") == -9
    root = tmp_path / "checkpoints"
    cut = list(root.glob(".tmp-step-000003-*"))
    assert len(cut) == 1 and (cut[0] / "trainer_state.pt").exists()  # written, no manifest
    assert (root / "latest").read_text() == "step-000002"
    assert find_checkpoint(tmp_path) == (root / "step-000002", [])
    assert save_in_process(tmp_path, 3, "three again") == 0
    assert not list(root.glob(".tmp-*"))  # the next save removes what the kill left
    assert note_of(find_checkpoint(tmp_path)[0]) == "three again"


def test_a_kill_while_a_step_is_saved_again_keeps_its_checkpoint(tmp_path):
    """Saving an existing step: the old folder is moved aside, never deleted before the new one
    is in place (the old code's rmtree-then-rename lost the checkpoint `latest` named)."""
    from rollover.trainer.checkpoint import recover_interrupted_save

    assert save_in_process(tmp_path, 2, "two") == 0
    assert save_in_process(tmp_path, 4, "four") == 0
    assert save_in_process(tmp_path, 4, "four again", failpoint="checkpoint_replace:4") == -9
    root = tmp_path / "checkpoints"
    assert not (root / "step-000004").exists() and (root / ".aside-step-000004").is_dir()
    assert recover_interrupted_save(tmp_path) == [root / "step-000004"]
    found, skipped = find_checkpoint(tmp_path)
    assert (found, skipped) == (root / "step-000004", [])
    assert note_of(found) == "four"
    assert save_in_process(tmp_path, 4, "four again") == 0
    assert note_of(find_checkpoint(tmp_path)[0]) == "four again"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000002", "step-000004"]


def test_pruned_folders_are_renamed_before_they_are_deleted(tmp_path):
    for step in (1, 2, 3):
        assert save_in_process(tmp_path, step, str(step)) == 0
    root = tmp_path / "checkpoints"
    half_deleted = root / ".trash-step-000001"  # what a kill mid-delete leaves
    half_deleted.mkdir()
    (half_deleted / "trainer_state.pt").write_bytes(b"x")
    assert find_checkpoint(tmp_path) == (root / "step-000003", [])
    assert save_in_process(tmp_path, 4, "4") == 0  # keep=3: step 1 pruned
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000002", "step-000003", "step-000004"]


def test_the_uid_log_keeps_one_line_per_step_across_a_resume(tmp_path):
    from rollover.trainer.runtime.uid_log import UID_LOG, log_trained, read_trained

    for step in (1, 2, 3):
        log_trained(tmp_path, step, [10 * step, 10 * step + 1])
    with (tmp_path / UID_LOG).open("a") as log:
        log.write('{"step": 4, "ui')  # a line cut by a crash
    assert rewind_step_logs(tmp_path, 2) == {UID_LOG: 2}  # step 3 and the cut line
    log_trained(tmp_path, 3, [99])
    assert read_trained(tmp_path) == [(1, [10, 11]), (2, [20, 21]), (3, [99])]


def test_a_resume_rewinds_every_per_step_log_in_the_run_folder(tmp_path):
    """The swarm's audit log is rewound with the trainer's own logs, though the trainer never
    names it: every JSON-lines log at the top of the run folder is a per-step log."""
    import json

    from rollover.swarm.node import AUDIT_LOG

    for name in (AUDIT_LOG, "metrics.jsonl"):
        (tmp_path / name).write_text("".join(json.dumps({"step": step, "x": step}) + "\n" for step in (1, 2, 3, 4)))
    (tmp_path / "rl-train.log").write_text("not a per-step log\n")
    assert rewind_step_logs(tmp_path, 2) == {AUDIT_LOG: 2, "metrics.jsonl": 2}
    for name in (AUDIT_LOG, "metrics.jsonl"):
        assert [json.loads(line)["step"] for line in (tmp_path / name).read_text().splitlines()] == [1, 2]
    assert (tmp_path / "rl-train.log").read_text() == "not a per-step log\n"


def test_a_resume_without_a_checkpoint_starts_its_step_logs_afresh(tmp_path):
    """train.resume=true after a run died before its first checkpoint: that run's step lines
    (metrics, trained uids, swarm audit) must not precede the new run's own step 0 and 1."""
    from rollover.trainer.config import Recipe
    from rollover.trainer.run import resume_point

    for name in ("metrics.jsonl", "trained_uids.jsonl", "swarm_audit.jsonl"):
        (tmp_path / name).write_text('{"step": 0, "x": 1}\n{"step": 1, "x": 2}\n{"step": 2, "x"')
    (tmp_path / "rl-train.log").write_text("the earlier attempt's console\n")
    recipe = Recipe.model_validate({"train": {"resume": True, "output_dir": str(tmp_path)}})
    assert resume_point(recipe, tmp_path) is None
    for name in ("metrics.jsonl", "trained_uids.jsonl", "swarm_audit.jsonl"):
        assert (tmp_path / name).read_text() == ""
    assert (tmp_path / "rl-train.log").read_text() == "the earlier attempt's console\n"  # not a step log


def test_a_named_checkpoint_that_is_damaged_or_absent_is_refused_in_one_line(tiny_model, tmp_path):
    """train.resume: PATH gets the manifest check a resume from the run folder makes."""
    import pytest

    from rollover.tasks.errors import UsageError
    from rollover.trainer.config import Recipe
    from rollover.trainer.run import resume_point

    first, second = two_checkpoints(tiny_model, tmp_path)
    named = lambda path: Recipe.model_validate({"train": {"resume": str(path)}})  # noqa: E731
    assert resume_point(named(second), tmp_path) == second
    (second / "tokenizer.json").unlink()
    with pytest.raises(UsageError, match=r"step-000004 is not a complete checkpoint \(tokenizer.json is missing\)"):
        resume_point(named(second), tmp_path)
    with pytest.raises(UsageError, match="no such folder"):
        resume_point(named(tmp_path / "step-000009"), tmp_path)
