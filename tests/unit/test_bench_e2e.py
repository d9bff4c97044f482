"""The end-to-end benchmark's arithmetic (bench/e2e/e2e_lib.py): target, time to target, medians, speedup.

The expected values are worked out by hand in the comments; nothing is started.
"""

import pytest

from bench.e2e import e2e_lib as lib


def curve(*points: tuple[int, float, float]) -> list[dict]:
    return [{"step": s, "train_seconds": t, "accuracy": a} for s, t, a in points]


def run(points: list[dict], spp: float = 1.0) -> dict:
    return {"ok": True, "curve": points, "seconds_per_step": spp, "completion_tokens_per_s": 100.0,
            "generated_tokens_per_s": 120.0}


def test_target_is_a_fraction_of_the_best_gain_over_the_median_start():
    # initial median of 0.40, 0.44, 0.42, 0.46 = (0.42 + 0.44) / 2 = 0.43
    # system medians: trl 0.55, april 0.66 -> best 0.66; 0.43 + 0.8 * (0.66 - 0.43) = 0.614
    target = lib.target_accuracy([0.40, 0.44, 0.42, 0.46],
                                 {"trl": [0.50, 0.60, 0.55], "april": [0.70, 0.62, 0.66]}, 0.8)
    assert target["accuracy"] == pytest.approx(0.614)
    assert target["initial"] == pytest.approx(0.43)
    assert target["best_final"] == pytest.approx(0.66) and target["best_system"] == "april"


def test_no_target_when_nothing_improved():
    target = lib.target_accuracy([0.5, 0.5], {"trl": [0.49], "april": [0.5]}, 0.8)
    assert target["accuracy"] is None and "improved" in target["note"]
    assert lib.target_accuracy([], {"trl": []}, 0.8)["accuracy"] is None


def test_time_to_target_is_the_first_evaluation_at_or_above():
    points = curve((0, 0.0, 0.40), (10, 5.0, 0.55), (20, 11.0, 0.62), (30, 16.0, 0.70))
    assert lib.time_to_target(points, 0.614) == 11.0
    assert lib.time_to_target(points, 0.55) == 5.0  # equal counts as reached
    assert lib.time_to_target(points, 0.40) == 0.0  # already there at step 0
    assert lib.time_to_target(points, 0.71) is None


def test_median_counts_never_as_infinite():
    assert lib.median_or_never([12.0, None, 10.0]) == 12.0  # 10, 12, inf
    assert lib.median_or_never([None, None, 10.0]) is None  # 10, inf, inf: typically never
    assert lib.median_or_never([4.0, None]) is None  # (4 + inf) / 2
    assert lib.median_or_never([3.0, 5.0]) == 4.0
    assert lib.median_or_never([]) is None
    assert lib.spread([12.0, None, 10.0]) == {"median": 12.0, "min": 10.0, "max": None, "n": 3}


def test_speedup_is_the_baseline_over_the_fastest_other_system():
    # 30 / min(20, 12) = 2.5, april the best; a system that never reached is left out
    assert lib.speedup(30.0, {"sync": 20.0, "april": 12.0, "april_pipeline": None}) == {
        "speedup": 2.5, "best_system": "april"}
    never = lib.speedup(None, {"april": 12.0})
    assert never["speedup"] is None and never["best_system"] == "april" and "baseline" in never["note"]
    assert lib.speedup(30.0, {"april": None})["speedup"] is None
    assert lib.ratio(1.0, 3.0) == 0.333 and lib.ratio(1.0, 0.0) is None and lib.ratio(None, 2.0) is None


def test_workload_summary_by_hand():
    runs = {
        "trl": [run(curve((0, 0, 0.40), (10, 10, 0.50), (20, 20, 0.60)), 1.0),
                run(curve((0, 0, 0.42), (10, 11, 0.48), (20, 22, 0.56)), 1.1),
                run(curve((0, 0, 0.38), (10, 9, 0.52), (20, 18, 0.58)), 0.9)],
        "april": [run(curve((0, 0, 0.40), (10, 6, 0.60), (20, 12, 0.70)), 0.6),
                  run(curve((0, 0, 0.44), (10, 7, 0.58), (20, 14, 0.66)), 0.7),
                  {"ok": False, "error": "boom"}],
    }
    summary = lib.summarize_workload(runs, fraction=0.5)
    # initial: median(0.40, 0.42, 0.38, 0.40, 0.44) = 0.40; finals: trl 0.58, april median(0.70, 0.66) = 0.68
    # target = 0.40 + 0.5 * (0.68 - 0.40) = 0.54
    assert summary["target"]["accuracy"] == pytest.approx(0.54)
    trl, april = summary["systems"]["trl"], summary["systems"]["april"]
    # trl crosses 0.54 at 20, 22, 18 s -> median 20 (18-22); april at 6 and 7 s -> 6.5, one run failed
    assert trl["seconds_to_target"] == {"median": 20, "min": 18, "max": 22, "n": 3}
    assert (trl["reached"], trl["failed"]) == (3, 0)
    assert april["seconds_to_target"] == {"median": 6.5, "min": 6, "max": 7, "n": 2}
    assert (april["runs"], april["reached"], april["failed"]) == (3, 2, 1)
    assert april["final_accuracy"]["median"] == pytest.approx(0.68)
    assert april["seconds_per_step"]["median"] == pytest.approx(0.65)
    assert summary["speedup_to_target"] == pytest.approx(3.077)  # 20 / 6.5
    assert summary["speedup_best_system"] == "april"
    assert summary["pipeline_vs_april_seconds_per_step"] is None  # no april_pipeline runs


def test_a_baseline_that_never_reaches_the_target_bounds_the_speedup_from_below():
    runs = {
        "trl": [run(curve((0, 0, 0.40), (10, 30, 0.45), (20, 60, 0.50)), 3.0),
                run(curve((0, 0, 0.40), (10, 28, 0.46), (20, 56, 0.49)), 2.8),
                run(curve((0, 0, 0.40), (10, 29, 0.60), (20, 58, 0.62)), 2.9)],
        "april": [run(curve((0, 0, 0.40), (10, 10, 0.60), (20, 20, 0.70)), 1.0),
                  run(curve((0, 0, 0.40), (10, 12, 0.62), (20, 24, 0.68)), 1.2)],
    }
    summary = lib.summarize_workload(runs, fraction=0.5)
    # finals: trl median(0.50, 0.49, 0.62) = 0.50, april median(0.70, 0.68) = 0.69 -> target 0.545;
    # trl reaches it in one seed of three (29 s): its median is never, so no speedup figure
    assert summary["target"]["accuracy"] == pytest.approx(0.545)
    assert summary["speedup_to_target"] is None and "never" in summary["speedup_note"]
    # lower bounds per trl seed: 60 (ran 60 s without), 56, 29 (reached) -> median 56; april 11 s
    assert summary["speedup_to_target_at_least"] == pytest.approx(56 / 11, abs=1e-3)


def test_pipeline_ratio_and_metric_aggregates():
    runs = {"april": [run(curve((0, 0, 0.4), (1, 1, 0.6)), 0.9)],
            "april_pipeline": [run(curve((0, 0, 0.4), (1, 1, 0.6)), 0.6)]}
    assert lib.summarize_workload(runs, 0.8)["pipeline_vs_april_seconds_per_step"] == 1.5  # 0.9 / 0.6
    rows = [{"pipeline/engine_busy": 0.5, "pipeline/flag": True, "rollout/staleness_drops": 1,
             "rollout/drops": {"stale": 1, "filtered": 2}},
            {"pipeline/engine_busy": 1.0, "rollout/staleness_drops": 2, "rollout/drops": {"stale": 2}},
            {"accuracy": 0.3}]
    assert lib.mean_prefixed(rows, "pipeline/") == {"pipeline/engine_busy": 0.75}  # bools are not figures
    assert lib.drop_totals(rows) == {"rollout/drops/filtered": 2, "rollout/drops/stale": 3,
                                     "rollout/staleness_drops": 3}


def test_median_curve_per_step():
    a = curve((0, 0.0, 0.4), (10, 4.0, 0.5))
    b = curve((0, 0.0, 0.6), (10, 6.0, 0.7), (20, 9.0, 0.8))
    assert lib.median_curve([a, b]) == [{"step": 0, "train_seconds": 0.0, "accuracy": 0.5},
                                        {"step": 10, "train_seconds": 5.0, "accuracy": 0.6},
                                        {"step": 20, "train_seconds": 9.0, "accuracy": 0.8}]


def test_refreshing_a_workload_drops_a_note_its_new_summary_does_not_make():
    import argparse

    from bench.e2e import e2e_vs_trl as bench

    # Saved before any run finished: the note said no system reached the target. Both now did
    # (trl at 20 s, april at 10 s against the 0.5 + 0.8 x 0.1 = 0.58 target), so it must go.
    entry = {"speedup_note": "no rl-train system reached the target",
             "runs": {"trl": {"0": run(curve((0, 0.0, 0.5), (10, 20.0, 0.6)))},
                      "april": {"0": run(curve((0, 0.0, 0.5), (10, 10.0, 0.6)))}}}
    bench.refresh(entry, argparse.Namespace(seeds=[0], systems=["trl", "april"], target_fraction=0.8))
    assert entry["speedup_to_target"] == 2.0 and "speedup_note" not in entry


def test_trl_rows_carry_the_prompt_rl_train_renders_and_completions_become_text():
    """The chat workload: TRL gets conversational rows whose template rendering is exactly the
    prompt ids rl-train builds, and the reward sees the assistant's text, not a message list."""
    from transformers import AutoTokenizer

    from bench.e2e.trl_baseline import completion_text, trl_prompt
    from rollover.tasks.prompts import prompt_ids
    from rollover.trainer.builtin.models import resolve_model_path
    from rollover.trainer.config import TaskConfig

    tok = AutoTokenizer.from_pretrained(resolve_model_path("builtin:chat-math"))
    record = {"question": "Mia has 7 apples. She buys 5 more. How many apples does Mia have now?"}
    chat = TaskConfig(prompt_format="chat", system_prompt="Solve the problem. End with the answer as #### N.")
    rendered = tok.apply_chat_template(trl_prompt(record, chat), add_generation_prompt=True, tokenize=False)
    assert tok(rendered, add_special_tokens=False)["input_ids"] == prompt_ids(record, tok, "chat", chat.system_prompt)
    raw = TaskConfig(prompt_format="raw", system_prompt="Answer.")
    assert trl_prompt(record, raw) == "Answer.\n" + record["question"]
    assert completion_text([{"role": "assistant", "content": "12 apples.\n#### 12"}]) == "12 apples.\n#### 12"
    assert completion_text("#12") == "#12"
