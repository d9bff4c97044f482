"""A hostile swarm, on the receiving side: no record stops admission, copies earn nothing and
censor no one, peers choose no special tokens, sybil keys buy no influence, wrong working does
not count as right (issue 21). The task and verifier are the real arithmetic ones; the judge
stands in for the trainer only where a test says so (LocalJudge tests use the real one).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.dht.crypto import RSASignatureValidator

from rollover.swarm.inbox import Inbox, Incoming
from rollover.swarm.records import Caps, Rejected, decode_group, encode_group
from rollover.swarm.credit import SenderCredit
from rollover.tasks.registry import DatasetTask, record_from_spec

ROOT = Path(__file__).resolve().parents[2]
from swarm_fakes import TASK, CharJudge  # noqa: E402 - tests/unit is on sys.path
CAPS = Caps(max_record_bytes=4096, max_completions=8, max_completion_chars=256, max_groups_per_peer=3)
ROUND = 100


def spec(index: int) -> dict:
    return TASK.record(index)["spec"]


def numbers(index: int) -> list[int]:
    return [int(n) for n in TASK.record(index)["question"].rstrip("=").split("+")]


def worked(index: int) -> str:
    """The right column-by-column solution, written out here (not with the task's own code)."""
    nums = numbers(index)
    width = max(len(str(n)) for n in nums)
    steps, carry = [], 0
    for column in range(width):
        terms = [n // 10**column % 10 for n in nums if column < len(str(n))] + ([carry] if carry else [])
        steps.append("+".join(map(str, terms)) + f"={sum(terms)};")
        carry = sum(terms) // 10
    return "".join(steps) + f"#{sum(nums)}"


def group_of(index: int, tag: str = "") -> list[str]:
    """One right solution and two wrong answers that differ per `tag` (distinct honest groups)."""
    return [worked(index), f"#{sum(numbers(index)) + 1}{tag}", f"#{sum(numbers(index)) + 2}{tag}"]


def item(sender, index, spec_index, completions=None, round_index=ROUND, raw=None, the_spec=None):
    raw = raw if raw is not None else encode_group(
        round_index, the_spec or spec(spec_index), completions or group_of(spec_index))
    return Incoming(sender, round_index, index, raw)


def inbox(**kwargs) -> Inbox:
    return Inbox(TASK, CAPS, likelihood_z=4.0, **kwargs)


def proven(*senders: str) -> SenderCredit:
    credit = SenderCredit()
    for sender in senders:
        for _ in range(9):
            credit.record(sender, useful=True)
        credit.record(sender, useful=False)
    return credit


# ---- item 1: one record cannot stop admission ---------------------------------------------------

SURROGATE_COMPLETION = ('{"completions":["\\ud800#1"],"format":1,"round":%d,"spec":%s}'
                        % (ROUND, json.dumps(spec(3), sort_keys=True))).encode()
SURROGATE_SPEC = ('{"completions":["#1"],"format":1,"round":%d,"spec":{"task":"\\udfff"}}' % ROUND).encode()
NESTING_BOMB = b"[" * 2000 + b"]" * 2000  # valid JSON, 4 KB, deeper than the parser's recursion


@pytest.mark.parametrize("poison", [SURROGATE_COMPLETION, SURROGATE_SPEC, NESTING_BOMB],
                         ids=["surrogate-completion", "surrogate-spec", "nesting-bomb"])
def test_a_poison_record_is_malformed_and_the_poll_goes_on(poison):
    box = inbox()
    # "0000" sorts first: today the poison is read before every honest record of the poll.
    items = [item("0000", 0, 3, raw=poison), item("honest", 0, 5), item("other", 0, 6, completions=group_of(6, "x"))]
    assert box.admit(items, ROUND) == 2
    assert dict(box.rejected) == {"malformed": 1}
    assert {c.sender for c in box.pool} == {"honest", "other"}


def test_decode_refuses_text_that_is_not_unicode_and_deep_nesting():
    for raw in (SURROGATE_COMPLETION, SURROGATE_SPEC, NESTING_BOMB,
                b'{"format":1,"round":1,"spec":{"a":[[[[1]]]]},"completions":["x"]}'):
        with pytest.raises(Rejected) as caught:
            decode_group(raw, Caps())
        assert caught.value.reason == "malformed"
    # Brackets inside strings are text, not nesting.
    fine = encode_group(1, spec(3), ["[[[[[[[[{{{{{{" * 3 + "#1"])
    assert decode_group(fine, Caps()).completions == ["[[[[[[[[{{{{{{" * 3 + "#1"]


def test_a_judge_error_costs_that_group_only():
    class Picky(CharJudge):
        def build_group(self, record, completions, sender):
            if sender == "bad":
                raise ValueError("peer text tokenised to a special token")
            return super().build_group(record, completions, sender)

    box = inbox()
    box.admit([item("bad", 0, 1), item("good", 0, 2)], ROUND)
    taken = box.take(2, Picky(), SenderCredit(), 1.0, random.Random(0))
    assert [c.sender for c, _ in taken] == ["good"]
    assert box.rejected["malformed"] == 1


# ---- item 3 and 9: copies -----------------------------------------------------------------------

def test_a_spec_spelled_otherwise_is_not_this_task():
    for field, value in (("seed", False), ("digits_min", 1.0), ("operands", 2.0)):
        box = inbox()
        assert box.admit([item("a", 0, 4, the_spec={**spec(4), field: value})], ROUND) == 0
        assert dict(box.rejected) == {"unknown_task": 1}, field


@pytest.mark.parametrize("copy", [
    lambda texts: [" " + t.replace(";", " ; ") + "\n" for t in texts][::-1],  # spacing, order
    lambda texts: [t.replace("=", "\u200b=") for t in texts],  # invisible characters
])
def test_an_edited_copy_is_refused_and_the_original_stays_uncredited(copy):
    box = inbox()
    original = group_of(7)
    assert box.admit([item("honest", 0, 7, completions=original)], ROUND) == 1
    assert box.admit([item("copier", 0, 7, completions=copy(original))], ROUND) == 0
    assert dict(box.rejected) == {"copied": 1}
    [kept] = box.pool  # the copier could not make us drop the original
    assert kept.sender == "honest"
    credit = SenderCredit()
    [(candidate, _)] = box.take(2, CharJudge(), credit, 1.0, random.Random(0))
    assert candidate.sender == "honest"  # trained once
    assert credit.judged == {}  # and nobody earns credit for a contested group


def test_completions_mixed_from_several_groups_are_a_copy():
    box = inbox()
    one, two = group_of(8, "a"), group_of(8, "b")
    box.admit([item("p", 0, 8, completions=one), item("q", 0, 8, completions=two)], ROUND)
    mixed = [one[1], two[1], two[2]]
    assert box.admit([item("mixer", 0, 8, completions=mixed)], ROUND) == 0
    assert box.rejected["copied"] == 1


def test_a_verbatim_copy_three_rounds_later_is_still_a_copy():
    box = inbox()
    box.admit([item("honest", 0, 9)], ROUND)
    later = ROUND + 3
    assert box.admit([item("copier", 0, 9, round_index=later)], later) == 0
    assert dict(box.rejected) == {"copied": 1}


def test_copy_memory_survives_a_restart():
    box = inbox()
    box.admit([item("honest", 0, 9)], ROUND)
    restored = inbox()
    restored.load_state_dict(box.state_dict())
    respaced = [" ".join(text) for text in group_of(9)]
    later = ROUND + 3
    assert restored.admit([item("copier", 0, 9, completions=respaced, round_index=later)], later) == 0
    assert dict(restored.rejected) == {"copied": 1}


def test_two_honest_peers_may_write_the_same_right_answer():
    box = inbox()
    box.admit([item("p", 0, 10, completions=group_of(10, "a"))], ROUND)
    assert box.admit([item("q", 0, 10, completions=group_of(10, "b"))], ROUND) == 1  # 1 of 3 shared


def test_our_own_samples_regrouped_are_not_external():
    box = inbox()
    own = group_of(12, "own") + [f"#{sum(numbers(12)) + 5}"]
    box.note_own("me", ROUND, spec(12), own)
    assert box.admit([item("echo", 0, 12, completions=[own[3], own[0]])], ROUND) == 0  # subset, reordered
    assert dict(box.rejected) == {"copied": 1}


# ---- item 5: sybil keys ---------------------------------------------------------------------------

def test_new_senders_per_round_are_budgeted():
    box = inbox(new_senders_per_round=4)
    flood = [item(f"sybil{i:03d}", 0, i) for i in range(40)]
    assert box.admit(flood, ROUND) == 4
    assert box.rejected["new_senders"] == 36
    # A peer with credit is not a newcomer: the flood does not keep it out.
    assert box.admit([item("honest", 0, 50)], ROUND, proven("honest")) == 1


def test_the_pool_is_capped_and_the_lowest_credit_leaves_first():
    box = inbox(pool_cap=4, new_senders_per_round=100)
    credit = proven("honest")
    box.admit([item(f"sybil{i}", 0, i) for i in range(10)], ROUND, credit)
    assert len(box.pool) == 4 and box.rejected["pool_full"] == 6
    assert box.admit([item("honest", 0, 20)], ROUND, credit) == 1  # evicts an unproven sender
    assert len(box.pool) == 4 and "honest" in {c.sender for c in box.pool}
    assert box.rejected["pool_full"] == 7


def test_fresh_keys_share_one_prior_when_drawing():
    credit = proven("honest")
    picks = 0
    for seed in range(100):
        box = inbox(new_senders_per_round=1000, pool_cap=1000)
        box.admit([item(f"sybil{i:03d}", 0, 100 + i) for i in range(200)] + [item("honest", 0, 1)],
                  ROUND, credit)
        copy = SenderCredit()
        copy.load_state_dict(credit.state_dict())
        [(candidate, _)] = box.take(1, CharJudge(), copy, 1.0, random.Random(seed), max_judged=1)
        picks += candidate.sender == "honest"
    # honest credit 10/12 against one shared prior of 1/2: P = 0.625 per draw (~62 of 100; 40 is
    # 4.5 standard deviations below). Credit per key would give 0.83 / 100.8: about 1 of 100.
    assert picks > 40


def test_metrics_and_status_name_only_the_top_senders(tmp_path):
    from rollover.swarm.node import SwarmNode
    from rollover.swarm.config import SwarmConfig

    node = SwarmNode(SwarmConfig(enabled=True), TASK, group_size=2, run_folder=tmp_path, seed=0)
    for i in range(600):
        node.credit.record(f"peer{i:03d}", useful=i % 7 == 0)
    status = node._status(ROUND)
    assert 1 <= len(status["credit"]) <= 32
    best = max(node.credit.credit(f"peer{i:03d}") for i in range(600))
    assert max(status["credit"].values()) == round(best, 3)
    assert len(json.dumps(status)) < 4096  # fits a record whatever the swarm's size


def test_dataset_specs_are_checked_without_rebuilding_the_row_map(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": str(i)}) + "\n" for i in range(6)))
    task = DatasetTask(str(path), "question", "answer", eval_size=2)
    wanted = task.record(3)

    class NoScans(list):
        def __getitem__(self, key):
            if isinstance(key, slice):
                raise AssertionError("the training rows were scanned for one spec")
            return super().__getitem__(key)

    task.row_numbers = NoScans(task.row_numbers)
    assert record_from_spec(task, dict(wanted["spec"])) == wanted


# ---- item 7: sender ids -----------------------------------------------------------------------------

def _marker(public_key) -> bytes:
    text = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return b"[owner:" + text + b"]"


def test_one_key_is_one_sender_whatever_its_comment():
    from rollover.swarm.identity import sender_id

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    marker = _marker(key)
    aliases = [marker[:-1] + b" alias%d]" % i for i in range(3)]
    assert {sender_id(m) for m in aliases} == {sender_id(marker)}


@pytest.mark.parametrize("exponent, bits", [(2**3000 + 1, 4096), (65537, 1024), (65537, 8192)],
                         ids=["3000-bit-exponent", "1024-bit-key", "8192-bit-key"])
def test_costly_or_weak_keys_are_refused(exponent, bits):
    from rollover.swarm.identity import BadKey, check_public_key, sender_id

    modulus = random.Random(bits).getrandbits(bits) | (1 << (bits - 1)) | 1  # the size is what counts
    marker = _marker(rsa.RSAPublicNumbers(exponent, modulus).public_key())
    for check in (sender_id, check_public_key):
        with pytest.raises(BadKey):
            check(marker)


# ---- item 8: worked steps ---------------------------------------------------------------------------

def test_the_arithmetic_steps_are_checked_one_by_one():
    from rollover.tasks.arithmetic import steps_are_right

    assert steps_are_right("7+5=12;4+8+1=13;#132", [47, 85])
    assert steps_are_right(" 7 + 5 = 12 ; 4+8+1=13; #132", [47, 85])
    assert not steps_are_right("7+5=12;4+8+1=14;#132", [47, 85])  # one wrong digit
    assert not steps_are_right("7+5=12;4+8=12;#132", [47, 85])  # the carry dropped
    assert not steps_are_right("#132", [47, 85])  # no working at all
    assert not steps_are_right("7+5=12;4+8+1=13;9+9=18;#132", [47, 85])  # a step too many
    assert not steps_are_right("7+5=12;so 4+8+1=13;#132", [47, 85])  # words between steps


def test_a_right_answer_on_wrong_working_is_not_rewarded():
    index = 13
    right, total = worked(index), sum(numbers(index))
    digit = right.index("=") + 1
    wrong_working = right[:digit] + str((int(right[digit]) + 1) % 10) + right[digit + 1:]  # ends in the right answer
    assert wrong_working.endswith(f"#{total}") and wrong_working != right
    swapped = [wrong_working, right.replace(f"#{total}", f"#{total + 1}")]  # answers swapped between pads
    box = inbox()
    box.admit([item("poisoner", 0, index, completions=swapped)], ROUND)
    credit = SenderCredit()
    assert box.take(2, CharJudge(), credit, 1.0, random.Random(0)) == []  # both score 0: uninformative
    assert box.rejected["wrong_steps"] == 1 and credit.credit("poisoner") < 0.5


def test_wrong_working_among_right_answers_costs_credit_but_is_trained_as_wrong():
    index = 14
    right, total = worked(index), sum(numbers(index))
    bad = "0+0=0;" + right
    box = inbox()
    box.admit([item("p", 0, index, completions=[right, bad, f"#{total + 3}"])], ROUND)
    credit = SenderCredit()
    [(_, group)] = box.take(2, CharJudge(), credit, 1.0, random.Random(0))
    assert group.rewards == [1.0, 0.0, 0.0]
    assert credit.useful.get("p", 0) == 0 and credit.judged["p"] == 1


# ---- item 6: publishing ---------------------------------------------------------------------------

def test_a_signature_lookalike_in_a_completion_survives_publishing():
    text = "x [signature:abc] y \\[signature:q]"
    raw = encode_group(ROUND, spec(2), [text, "#3"])
    assert RSASignatureValidator._SIGNATURE_RE.search(raw) is None  # hivemind would strip it
    assert decode_group(raw, Caps()).completions == [text, "#3"]


# ---- item 4 (and issue 20): peer text never yields our special tokens ------------------------------

def _judge(tokenizer, max_tokens: int):
    from rollover.trainer.config import load_recipe
    from rollover.trainer.external import LocalJudge

    recipe = load_recipe(ROOT / "recipes/grpo_math.yaml", [f"rollout.max_tokens={max_tokens}"])

    class Policy:  # LocalJudge.build_group needs only the tokenizer
        pass

    policy = Policy()
    policy.tokenizer = tokenizer
    decoded = []

    def score_group(group):  # what the trainer's score_group decodes
        texts = [tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in group.samples]
        decoded.extend(texts)
        return [TASK.score(t, group.task) for t in texts]

    return LocalJudge(recipe, policy, score_group), decoded


def _chat_tokenizer():
    """A tokenizer with real chat special tokens (<|im_end|> its end-of-sequence)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)]
    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(["<unk>", *chars])}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>"])


@pytest.mark.parametrize("make, markup", [
    ("builtin", "</s>"), ("builtin", "<s>"), ("chat", "<|im_end|>"), ("chat", "<|im_start|>")])
def test_special_token_markup_in_peer_text_stays_text(make, markup):
    from rollover.trainer.builtin.models import make_tokenizer

    tokenizer = make_tokenizer() if make == "builtin" else _chat_tokenizer()
    assert tokenizer.convert_tokens_to_ids(markup) in tokenizer.all_special_ids  # a real special token
    judge, decoded = _judge(tokenizer, max_tokens=40)
    record = TASK.record(15)
    total = sum(numbers(15))
    head, tail = str(total)[:1], str(total)[1:] or "0"
    text = f"#{head}{markup}{tail}"
    group = judge.build_group(record, [text, f"#{total}"], "peer")
    ids = group.samples[0].response_ids
    special = set(tokenizer.all_special_ids)
    assert [i for i in ids if i in special] == [tokenizer.eos_token_id] and ids[-1] == tokenizer.eos_token_id
    assert decoded[0] == text  # what is scored is what is trained
    assert group.samples[0].reward == TASK.score(text, record)
    assert group.samples[0].reward == float(int(head) == total)  # "#4</s>2" is an answer of 4


def test_peer_text_filling_the_budget_is_cut_off_not_stopped():
    from rollover.trainer.builtin.models import make_tokenizer

    tokenizer = make_tokenizer()  # one token per character
    judge, _ = _judge(tokenizer, max_tokens=8)
    record = TASK.record(16)
    group = judge.build_group(record, ["#1234567", "#123456", "#123456789"], "peer")
    assert [s.finish_reason for s in group.samples] == ["length", "stop", "length"]
    assert [len(s.response_ids) for s in group.samples] == [8, 8, 8]
    assert group.samples[1].response_ids[-1] == tokenizer.eos_token_id
    assert group.samples[0].response_ids[-1] != tokenizer.eos_token_id


def test_in_one_poll_a_proven_original_beats_a_copier_whose_key_sorts_first():
    box = inbox()
    credit = proven("zz-honest")
    original = group_of(17)
    box.admit([item("00-copier", 0, 17, completions=original[::-1]),
               item("zz-honest", 0, 17, completions=original)], ROUND, credit)
    assert [c.sender for c in box.pool] == ["zz-honest"] and dict(box.rejected) == {"copied": 1}


@pytest.mark.parametrize("later", ["round", "expiration"])
def test_in_one_poll_the_earlier_record_is_the_original_whatever_the_keys(later):
    """A copier can only republish what was already published: its copy is of the same or a later
    round and expires no earlier. Read in one poll with neither sender proven, the earlier record
    is kept, for every pair of keys (was: a hash of round and key decided, half the time wrong)."""
    original = group_of(18)
    for trial in range(16):
        box = inbox()
        honest, copier = f"honest{trial}", f"copier{trial}"
        first = ROUND - 1 if later == "round" else ROUND
        copy_expiration = 1000.0 if later == "round" else 1001.0
        items = [Incoming(copier, ROUND, 0, encode_group(ROUND, spec(18), original[::-1]), copy_expiration),
                 Incoming(honest, first, 0, encode_group(first, spec(18), original), 1000.0)]
        assert box.admit(items, ROUND) == 1, trial
        assert [c.sender for c in box.pool] == [honest] and dict(box.rejected) == {"copied": 1}, trial
