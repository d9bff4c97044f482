"""The inbox: every kind of bad record is turned away by reason; credit and caps steer sampling.

The task and its verifier are the real built-in arithmetic ones; the judge stands in for the
trainer only in how it tokenises (characters) and in the likelihood it reports (set by the test).
"""

import random

import pytest

from rollover.swarm.inbox import Incoming, Inbox
from rollover.swarm.records import Caps, encode_group
from rollover.swarm.credit import SenderCredit, per_sender_cap
from rollover.tasks import arithmetic

from swarm_fakes import TASK, CharJudge  # noqa: E402 - tests/unit is on sys.path
CAPS = Caps(max_record_bytes=4096, max_completions=8, max_completion_chars=256, max_groups_per_peer=3)
ROUND = 100


def right_and_wrong(index: int) -> list[str]:
    """One correct solution (the task's own reference, worked steps included) and one wrong answer."""
    numbers = arithmetic.make_problem(0, index, 1, 3, 2, None)
    return [arithmetic.solution_text(numbers), f"#{sum(numbers) + 1}"]


def incoming(sender, index, spec_index=None, round_index=ROUND, payload_round=None, completions=None,
             spec=None):
    spec_index = index if spec_index is None else spec_index
    spec = spec or TASK.record(spec_index)["spec"]
    raw = encode_group(round_index if payload_round is None else payload_round, spec,
                       completions or right_and_wrong(spec_index))
    return Incoming(sender, round_index, index, raw)


def inbox() -> Inbox:
    box = Inbox(TASK, CAPS, likelihood_z=4.0)
    box.note_reference([-1.0 + 0.01 * i for i in range(-20, 21)])  # our own samples: around -1
    return box


def test_an_honest_record_is_rescored_by_our_verifier():
    box = inbox()
    assert box.admit([incoming("a", 0, spec_index=11)], ROUND) == 1
    [(candidate, group)] = box.take(4, CharJudge(), SenderCredit(), 1.0, random.Random(0))
    assert candidate.sender == "a" and group.sender == "a"
    assert group.rewards == [1.0, 0.0]  # right_and_wrong's order, scored by the real verifier
    assert group.task == TASK.record(11)  # regenerated here, not taken from the peer


@pytest.mark.parametrize("item, expected", [
    (incoming("a", 0, payload_round=ROUND - 1), "replayed"),  # an old signed record under a new key
    (incoming("a", 0, payload_round=ROUND + 1), "wrong_round"),
    (incoming("a", 0, round_index=ROUND - 2), "replayed"),  # a closed round
    (incoming("a", 0, round_index=ROUND + 1), "wrong_round"),  # a round that has not begun
    (incoming("a", 0, spec={"task": "reasoning_gym", "index": 0}), "unknown_task"),
    (incoming("a", 0, spec={**TASK.record(3)["spec"], "seed": 1_000_003}), "unknown_task"),  # held-out
    (incoming("a", 0, spec={**TASK.record(3)["spec"], "digits_max": 12}), "unknown_task"),
    (incoming("a", 0, spec={**TASK.record(3)["spec"], "index": -5}), "index_out_of_range"),
    (incoming("a", 0, spec={**TASK.record(3)["spec"], "index": "3"}), "unknown_task"),
    (incoming("a", 3), "too_many_groups"),  # slot index past max_groups_per_peer
    (Incoming("a", ROUND, 0, b"\xc3\x28"), "not_utf8"),
    (Incoming("a", ROUND, 0, {"not": "bytes"}), "malformed"),
])
def test_bad_records_are_counted_by_reason(item, expected):
    box = inbox()
    assert box.admit([item], ROUND) == 0
    assert dict(box.rejected) == {expected: 1}
    assert box.pool == []


def test_duplicates_copies_and_echoes():
    box = inbox()
    box.note_own("me", ROUND, TASK.record(20)["spec"], right_and_wrong(20))
    assert box.admit([incoming("a", 0, spec_index=5)], ROUND) == 1  # seen first
    items = [incoming("a", 1, spec_index=5),  # the same group again from the same sender
             incoming("b", 0, spec_index=5, completions=right_and_wrong(5)[::-1]),  # reordered copy
             incoming("c", 0, spec_index=20)]  # our own group echoed back
    assert box.admit(items, ROUND) == 0
    # The first copy stays (a copier cannot censor it) but, contested, earns no one credit.
    assert dict(box.rejected) == {"duplicate": 1, "copied": 2}
    [kept] = box.pool
    assert kept.sender == "a" and kept.contested


def test_a_record_read_again_is_judged_once():
    box = inbox()
    item = incoming("a", 0)
    box.admit([item], ROUND)
    box.admit([item], ROUND)
    assert len(box.pool) == 1 and not box.rejected and box.received == 1


def test_the_per_round_cap_stops_flooding():
    box = inbox()
    box.admit([incoming("a", i, spec_index=i) for i in range(3)], ROUND)  # 3 = the cap
    box.admit([incoming("a", 3, spec_index=3), incoming("a", 0, spec_index=7)], ROUND)  # past it; a reused slot
    assert dict(box.rejected) == {"too_many_groups": 1} and len(box.pool) == 3


def test_an_honest_peer_at_its_full_rate_is_never_flooding():
    """A peer publishing its per-round cap every round, read by a node that takes fewer per round
    than that, keeps the previous round's groups pooled: its new round must still get in."""
    box, credit, taken = inbox(), SenderCredit(), 0
    for offset in range(4):
        round_index = ROUND + offset
        published = [incoming("a", i, spec_index=10 * offset + i, round_index=round_index) for i in range(3)]
        assert box.admit(published, round_index, credit) == 3
        taken += len(box.take(1, CharJudge(), credit, 1.0, random.Random(offset)))
    assert not box.rejected and taken == 4
    assert {c.round for c in box.pool} == {ROUND + 2, ROUND + 3}  # at most ROUNDS_KEPT rounds of it


def test_wrong_answers_claimed_right_are_harmless():
    box = inbox()
    numbers = arithmetic.make_problem(0, 4, 1, 3, 2, None)
    box.admit([incoming("liar", 0, spec_index=4, completions=[f"#{sum(numbers) + 1}", f"#{sum(numbers) + 2}"])],
              ROUND)
    credit = SenderCredit()
    assert box.take(2, CharJudge(), credit, 1.0, random.Random(0)) == []
    assert dict(box.rejected) == {"uninformative": 1}
    assert credit.credit("liar") == pytest.approx(1 / 3)


def test_unlikely_text_is_rejected_and_costs_credit():
    box = inbox()
    poisoned = right_and_wrong(6)
    box.admit([incoming("thief", 0, spec_index=6, completions=poisoned)], ROUND)
    credit = SenderCredit()
    judge = CharJudge({poisoned[0]: -9.0})  # far below our own samples (about -1, spread 0.2)
    assert box.take(2, judge, credit, 1.0, random.Random(0)) == []
    assert dict(box.rejected) == {"unlikely": 1}
    assert credit.credit("thief") < 0.5


def test_no_reference_yet_means_no_likelihood_verdict():
    box = Inbox(TASK, CAPS, likelihood_z=4.0, likelihood_floor=0.3)
    assert not box.is_unlikely([-50.0])
    box.note_reference([-1.0] * 40)  # identical own samples: the scale floor (0.3 nats/token) applies
    assert box.is_unlikely([-1.0 - 4.1 * 0.3] * 3) and not box.is_unlikely([-1.0 - 3.9 * 0.3] * 3)


def test_one_sender_fills_at_most_its_share():
    box = Inbox(TASK, Caps(max_groups_per_peer=8), likelihood_z=4.0)
    box.admit([incoming("a", i, spec_index=i) for i in range(6)], ROUND)
    taken = box.take(4, CharJudge(), SenderCredit(), 0.5, random.Random(0))
    assert len(taken) == per_sender_cap(4, 0.5) == 2
    assert len(box.pool) == 4  # the rest wait for a later step


def test_credit_steers_sampling():
    credit = SenderCredit()
    for _ in range(18):
        credit.record("good", useful=True)
        credit.record("bad", useful=False)
    assert credit.credit("good") == pytest.approx(19 / 20) and credit.credit("bad") == pytest.approx(1 / 20)
    picks = {"good": 0, "bad": 0}
    for seed in range(200):
        box = inbox()
        box.admit([incoming("good", 0, spec_index=seed), incoming("bad", 0, spec_index=seed + 500)], ROUND)
        [(candidate, _)] = box.take(1, CharJudge(), SenderCredit(dict(credit.useful), dict(credit.judged)),
                                    1.0, random.Random(seed))
        picks[candidate.sender] += 1
    # P(good) = 0.95 per draw: 200 draws give about 190; 160 is more than 7 standard deviations off.
    assert picks["good"] > 160


def test_judged_records_stay_judged_across_a_restart():
    box = inbox()
    item = incoming("a", 0, spec_index=2)
    box.admit([item], ROUND)
    restored = inbox()
    restored.load_state_dict(box.state_dict())
    assert restored.admit([item], ROUND) == 0 and not restored.rejected


def test_closed_rounds_leave_the_pool():
    box = inbox()
    box.admit([incoming("a", 0)], ROUND)
    box.admit([], ROUND + 2)
    assert box.pool == []
