"""The likelihood filter (issue 25): honest peers pass, poison is refused.

The numeric tests give the inbox reference and group scores chosen by hand; the model tests use
the shipped tiny-math as the judging node (the real LocalJudge: re-tokenise, re-score, log-probs
at the recipe's temperature), honest groups sampled by tiny-math itself under another seed and by
tiny-math-wide (another width and vocabulary), and the benchmark's poison kinds.
"""

from __future__ import annotations

import asyncio

import pytest

from rollover.rollout.types import Group, Sample
from rollover.swarm.config import SwarmConfig
from rollover.swarm.inbox import Inbox, Incoming
from rollover.swarm.records import Caps, encode_group

from swarm_fakes import TASK, CharJudge  # noqa: E402 - tests/unit is on sys.path

CAPS = Caps(max_record_bytes=8192, max_completions=16, max_completion_chars=256, max_groups_per_peer=4)
CFG = SwarmConfig()


def inbox(reference: list[float]) -> Inbox:
    box = Inbox(TASK, CAPS, CFG.likelihood_z, likelihood_z_each=CFG.likelihood_z_each,
                likelihood_floor=CFG.likelihood_floor)
    box.note_reference(reference)
    return box


# A node's own samples, as the bench measured tiny-math's: median -0.2 nats/token, MAD about 0.12.
OWN = [-0.2 + 0.24 * (i / 63 - 0.5) for i in range(64)]
# After training sharpens it: median -0.03, MAD about 0.02 (the bench's tiny-math+400steps).
SHARP = [-0.03 + 0.04 * (i / 63 - 0.5) for i in range(64)]


def test_one_odd_wrong_completion_does_not_refuse_an_honest_group():
    # Sampling at temperature 1 writes the odd glitch ("4+0=p+0=2;"): far below, and wrong.
    values = [-0.2] * 15 + [-6.0]
    rewards = [1.0] * 7 + [0.0] * 9
    assert not inbox(OWN).is_unlikely(values, rewards)  # before issue 25: any one of G refused it


def test_a_sharpened_node_still_accepts_a_less_sharp_honest_peer():
    # The base model's text under the sharpened policy: about 0.5 nats/token lower (bench: up to 0.9).
    values = [-0.55] * 8 + [-0.5] * 8
    rewards = [1.0, 0.0] * 8
    assert not inbox(SHARP).is_unlikely(values, rewards)  # before: MAD 0.02 made that 17 deviations


@pytest.mark.parametrize("values, rewards", [
    ([-3.0] * 16, [1.0, 0.0] * 8),  # a whole group of foreign text (the bench's poison: 2.7-12 nats below)
    ([-0.2] * 15 + [-2.9], [0.0] * 15 + [1.0]),  # one foreign right answer among honest wrong ones
])
def test_foreign_text_is_refused(values, rewards):
    assert inbox(OWN).is_unlikely(values, rewards)
    assert inbox(SHARP).is_unlikely(values, rewards)


def test_no_verdict_before_the_reference_has_enough_own_samples():
    box = inbox(OWN[:16])
    assert box.likelihood.min_reference > 16 and not box.is_unlikely([-50.0] * 4, [1.0, 0.0, 0.0, 0.0])
    box.note_reference(OWN[16:])
    assert box.is_unlikely([-50.0] * 4, [1.0, 0.0, 0.0, 0.0])


def test_a_resumed_node_judges_with_the_reference_it_had():
    # Before: the reference was not checkpointed, so for two steps after a restart any text passed.
    restored = inbox([])
    restored.load_state_dict(inbox(OWN).state_dict())
    assert sorted(restored.reference) == sorted(OWN)
    assert restored.is_unlikely([-3.0] * 16, [1.0, 0.0] * 8)
    assert not restored.is_unlikely([-0.2] * 16, [1.0, 0.0] * 8)


def test_the_reference_is_our_samples_scored_by_the_judge_not_the_sampler(tmp_path):
    """A node whose sampler reports log-probs on another scale (top-k renormalised, other
    numerics) than the judge's: the reference must come from the judge, or every peer, scored
    by the judge, lies outside it. Before issue 25 every honest group here was refused."""
    from rollover.swarm.node import SwarmNode
    from rollover.swarm.records import round_at

    cfg = SwarmConfig(enabled=True, external_groups=2, round_seconds=30.0)
    node = SwarmNode(cfg, TASK, group_size=2, run_folder=tmp_path, seed=0, clock=lambda: 3000.0)
    node._start_publish = lambda *args: None

    async def no_read() -> None:
        return None

    node._collect_briefly = no_read
    round_index = round_at(3000.0, cfg.round_seconds)
    own = [Group(uid=i, task=TASK.record(i), samples=[
        Sample(prompt_ids=[1], response_ids=[5, 6, 7], logprobs=[-0.001] * 3, text="x", reward=1.0)
        for _ in range(2)]) for i in range(40)]
    peers = [Incoming(f"peer{i}", round_index, 0, encode_group(round_index, TASK.record(100 + i)["spec"],
                                                                [TASK.record(100 + i)["solution"], "#1"]))
             for i in range(2)]
    judge = CharJudge()  # every text at -1 nats/token: ours and the peer's alike
    for step in range(3):
        if step == 2:
            node.inbox.admit(peers, round_index, node.credit)
        groups, _ = asyncio.run(node.exchange(step, own[16 * step:16 * step + 16], judge))
    assert len(groups) == 2 and not node.inbox.rejected, dict(node.inbox.rejected)
    assert len(node.inbox.reference) == 48 and set(node.inbox.reference) == {-1.0}


# ---- with the shipped model ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_thread():
    """Small forward passes: one thread is 4x faster than two spinning beside other processes."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(one_thread):
    from bench.swarm.likelihood_filter import RECIPE, generate, judge_for, load_policy
    from rollover.tasks.registry import build_task
    from rollover.trainer.config import load_recipe

    recipe = load_recipe(RECIPE)
    task = build_task(recipe.task)
    ours = load_policy(recipe, "builtin:tiny-math")
    judge = judge_for(ours, recipe, task)
    records = [task.record(i) for i in range(32)]
    own = generate(ours, recipe, records[:8], seed=0)  # 128 own samples: the reference
    box = Inbox(task, Caps(), CFG.likelihood_z, likelihood_z_each=CFG.likelihood_z_each,
                likelihood_floor=CFG.likelihood_floor)
    box.note_reference(v for g in own for v in judge.mean_logprobs(judge.build_group(g["record"], g["texts"], "own")))
    honest = {"same_model_other_seed": generate(ours, recipe, records[8:], seed=1),
              "tiny-math-wide": generate(load_policy(recipe, "builtin:tiny-math-wide"), recipe, records[8:], seed=2)}
    return {"box": box, "judge": judge, "records": records[8:], "honest": honest, "G": recipe.rollout.group_size}


def verdicts(world, groups) -> list[bool]:
    judge, out = world["judge"], []
    for g in groups:
        group = judge.build_group(g["record"], g["texts"], "peer")
        if max(group.rewards) > min(group.rewards):  # uninformative groups never reach the filter
            out.append(world["box"].is_unlikely(judge.mean_logprobs(group), group.rewards))
    return out


@pytest.mark.parametrize("peer", ["same_model_other_seed", "tiny-math-wide"])
def test_an_honest_peers_groups_pass(world, peer):
    refused = verdicts(world, world["honest"][peer])
    # The rule before issue 25 refused 28-32% of these (bench/results/likelihood_filter.json).
    assert len(refused) >= 10 and sum(refused) <= 1, refused


@pytest.mark.parametrize("kind", ["wrong_working", "irrelevant_words", "other_task", "padding"])
def test_each_poison_kind_is_refused(world, kind):
    from bench.swarm.likelihood_filter import poison_groups

    refused = verdicts(world, poison_groups(kind, world["records"], world["G"], seed=0))
    assert len(refused) >= 8 and all(refused), refused

