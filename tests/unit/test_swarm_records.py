"""The swarm record schema: what a peer may send, and every way its bytes are turned away."""

import json

import pytest

from rollover.swarm.records import (Caps, Rejected, completion_digest, decode_group, encode_group,
                                    group_digest, round_at, round_deadline)

SPEC = {"task": "arithmetic", "seed": 0, "index": 7, "digits_min": 1, "digits_max": 3, "operands": 2}
CAPS = Caps(max_record_bytes=4096, max_completions=4, max_completion_chars=64, max_groups_per_peer=2)


def reason(raw) -> str:
    with pytest.raises(Rejected) as caught:
        decode_group(raw, CAPS)
    return caught.value.reason


def test_round_trip_keeps_spec_and_text():
    raw = encode_group(5, SPEC, ["1+2=3#3", "héllo #4"])
    record = decode_group(raw, CAPS)
    assert record.round == 5 and record.spec == SPEC and record.completions == ["1+2=3#3", "héllo #4"]
    assert json.loads(raw) == {"format": 1, "round": 5, "spec": SPEC, "completions": ["1+2=3#3", "héllo #4"]}


@pytest.mark.parametrize("payload, expected", [
    (b"\xff\xfe not text", "not_utf8"),
    (b"{not json", "malformed"),
    (b"[1, 2]", "malformed"),
    (json.dumps({"format": 1, "round": 1, "spec": SPEC, "completions": ["a"], "rewards": [1.0]}).encode(), "malformed"),
    (json.dumps({"format": 1, "round": 1, "spec": SPEC, "completions": ["a"], "answer": "3"}).encode(), "malformed"),
    (json.dumps({"format": 1, "round": 1, "spec": {"task": {"nested": 1}}, "completions": ["a"]}).encode(), "malformed"),
    (json.dumps({"format": 1, "round": "1", "spec": SPEC, "completions": ["a"]}).encode(), "malformed"),
    (json.dumps({"format": 1, "round": -1, "spec": SPEC, "completions": ["a"]}).encode(), "malformed"),
    (json.dumps({"format": 2, "round": 1, "spec": SPEC, "completions": ["a"]}).encode(), "malformed"),
    (json.dumps({"format": 1, "round": 1, "spec": SPEC, "completions": []}).encode(), "malformed"),
    (json.dumps({"format": 1, "round": 1, "spec": SPEC, "completions": [3]}).encode(), "malformed"),
    (b'{"format": 1, "round": 1, "spec": {"x": NaN}, "completions": ["a"]}', "malformed"),
    (json.dumps({"format": 1, "round": 1, "spec": SPEC, "completions": ["a"] * 5}).encode(), "too_many_completions"),
    (json.dumps({"format": 1, "round": 1, "spec": SPEC, "completions": ["a" * 65]}).encode(), "completion_too_long"),
    (b"x" * 4097, "oversized"),
    ("a string, not bytes", "malformed"),
])
def test_bad_bytes_are_rejected_by_reason(payload, expected):
    assert reason(payload) == expected


def test_digests_ignore_order_but_not_task_or_text():
    assert group_digest(SPEC, ["a", "b"]) == group_digest(SPEC, ["b", "a"])
    assert group_digest(SPEC, ["a", "b"]) != group_digest({**SPEC, "index": 8}, ["a", "b"])
    assert group_digest(SPEC, ["a", "b"]) != group_digest(SPEC, ["a", "c"])
    assert completion_digest(SPEC, "a") != completion_digest(SPEC, "b")
    # Spacing and invisible characters are not a new text: a copy with extra spaces is a copy.
    assert completion_digest(SPEC, "7+5=12; #12") == completion_digest(SPEC, " 7 + 5=12;\u200b#12\n")


def test_rounds_are_epochs_of_the_wall_clock():
    assert [round_at(t, 30.0) for t in (0.0, 29.999, 30.0, 95.0)] == [0, 0, 1, 3]
    assert round_deadline(3, 30.0) == 120.0
