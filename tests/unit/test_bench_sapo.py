"""The SAPO benchmark's bookkeeping: own tokens, accuracy per own token, the mixed swarm's nodes."""

from __future__ import annotations

import pytest

from bench.swarm import sapo_swarm as sapo


def node_rows(tokens_per_step: list[int], evals: dict[int, float]) -> list[dict]:
    """A node's metrics.jsonl rows as the trainer writes them: eval rows and step rows."""
    rows = [{"step": 0, "eval/accuracy": evals[0]}]
    for step, tokens in enumerate(tokens_per_step, start=1):
        rows.append({"step": step, "rollout/reward_before_filter": 0.5, "rollout/generated_tokens": tokens,
                     "time/step": 1.0, "swarm/received": 8.0, "swarm/rejected": 5.0, "swarm/rejected/unlikely": 2.0,
                     "swarm/rejected/wrong_steps": 3.0})
        if step in evals:
            rows.append({"step": step, "eval/accuracy": evals[step], "time/eval": 0.5})
    return rows


def test_a_node_counts_its_own_tokens_up_to_each_evaluation():
    figures = sapo.node_figures(node_rows([1000, 3000, 500, 500], {0: 0.5, 2: 0.55, 4: 0.6}))
    assert figures["own_tokens"] == 5000
    assert figures["accuracy_curve"] == [{"step": 0, "own_tokens": 0, "accuracy": 0.5},
                                         {"step": 2, "own_tokens": 4000, "accuracy": 0.55},
                                         {"step": 4, "own_tokens": 5000, "accuracy": 0.6}]
    assert figures["accuracy_gain_per_m_own_tokens"] == pytest.approx(0.1 / 5000 * 1e6, abs=1e-3)  # 20 points per M
    assert figures["wall_seconds"] == pytest.approx(4 * 1.0 + 2 * 0.5)
    assert figures["rejected_by_reason"] == {"unlikely": 2.0, "wrong_steps": 3.0}


def test_sharing_is_compared_per_own_token_with_the_same_kind_of_node_alone():
    alone = [sapo.node_figures(node_rows([1000] * 4, {0: 0.5, 4: 0.6})) for _ in range(2)]  # 25 per M
    shared = [sapo.node_figures(node_rows([500] * 4, {0: 0.5, 4: 0.6})) for _ in range(2)]  # 50 per M
    runs = [{"config": "8/0", "ok": True, "nodes": [{"role": "tiny-math", **n} for n in alone]},
            {"config": "4/4", "ok": True, "nodes": [{"role": "tiny-math", **n} for n in shared]}]
    summary = sapo.summarize(runs, ["8/0", "4/4"])
    assert summary["8/0"]["by_role"]["tiny-math"]["gain_per_token_vs_alone"] == 1.0
    assert summary["4/4"]["by_role"]["tiny-math"]["gain_per_token_vs_alone"] == 2.0
    assert summary["4/4"]["by_role"]["tiny-math"]["own_tokens"]["median"] == 2000
    assert summary["4/4"]["received"] == 16 and summary["4/4"]["refused_share_of_received"] == {"unlikely": 0.25}
    assert summary["4/4"]["completions_rescored_wrong_per_received_group"] == 6 / 16  # counted apart


def test_a_mixed_swarm_has_a_cold_half_and_another_model_half():
    assert sapo.node_overrides("mixed-4/4", 4) == [
        "0:rollout.temperature=0.5", "1:rollout.temperature=0.5",
        "2:model.path=builtin:tiny-math-wide", "3:model.path=builtin:tiny-math-wide"]
    assert sapo.node_overrides("4/4", 4) == []
    assert sapo.config_overrides("mixed-6/2")[:2] == ["rollout.groups_per_step=6", "swarm.external_groups=2"]
    assert [sapo.node_role("mixed-4/4", i, 4) for i in (0, 3)] == ["tiny-math T=0.5", "tiny-math-wide"]


@pytest.mark.parametrize("configs", ["mixed-0/4", "mixed-4", "4/x"])
def test_a_malformed_configuration_is_refused(configs, capsys):
    with pytest.raises(SystemExit):
        sapo.parse_args(["--configs", configs])
    assert "--configs" in capsys.readouterr().err
