"""`train_on_batch` on a tiny real model against an independent full-batch computation.

The reference below computes each row's log-probs from the model's own logits (no padding, no
packing, no chunked kernel), writes the GRPO/DAPO objectives out by hand, and steps plain SGD,
so micro-batch accumulation, the step-wide normalisers and pi_old for several updates are all
checked against definitions rather than against the code under test.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from rollover.trainer.batch import Row
from rollover.trainer.config import AlgoConfig, LoraConfig, ModelConfig, TrainConfig
from rollover.trainer.policy import Policy
from rollover.trainer.update import NonFiniteLoss, train_on_batch

LR = 0.5
CLIP = 0.2


def make_rows(count: int = 6, seed: int = 0) -> list[Row]:
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        prompt = [rng.randrange(4, 100) for _ in range(rng.randint(2, 5))]
        response = [rng.randrange(4, 100) for _ in range(rng.randint(1, 6))]
        advantage = [1.0, -0.5, 2.0, -1.5, 0.25, -0.75][i % 6]
        rows.append(Row(prompt, response, [-1.0] * len(response), [0] * len(response), advantage, False))
    return rows


def row_logprobs(model, row: Row) -> torch.Tensor:
    """Log-probs of the row's response tokens from the model's full logits."""
    ids = torch.tensor([row.prompt_ids + row.response_ids])
    logits = model(input_ids=ids).logits[0, :-1].double()
    targets = ids[0, 1:]
    logp = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    return logp[len(row.prompt_ids) - 1:]


def reference_update(model, minibatch: list[Row], old: dict[int, torch.Tensor], loss: str) -> None:
    """One SGD step of the clipped objective on `minibatch`, in place."""
    terms, lengths = [], []
    for row in minibatch:
        lp = row_logprobs(model, row)
        ratio = torch.exp(lp - old[id(row)])
        adv = torch.tensor(row.advantage, dtype=torch.float64)
        objective = torch.minimum(ratio * adv, ratio.clamp(1 - CLIP, 1 + CLIP) * adv)
        terms.append(-objective)
        lengths.append(len(row.response_ids))
    if loss == "grpo":  # mean over each sequence's tokens, then over sequences
        value = sum(t.mean() for t in terms) / len(terms)
    else:  # dapo / bnpo: mean over every token of the mini-batch
        value = sum(t.sum() for t in terms) / sum(lengths)
    model.zero_grad()
    value.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(LR * p.grad)


def shuffled_minibatches(rows: list[Row], count: int, seed: int) -> list[list[Row]]:
    order = rows[:]
    random.Random(seed).shuffle(order)
    return [order[i::count] for i in range(count)]


def run_trainer(policy, rows, loss, updates, micro_tokens, lr_lambda=lambda step: 1.0, offpolicy="none"):
    optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=LR)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    algo = AlgoConfig(loss=loss, offpolicy=offpolicy, clip_low=CLIP, clip_high=CLIP)
    train = TrainConfig(updates_per_batch=updates, micro_batch_tokens=micro_tokens, grad_clip=1e9)
    stats = train_on_batch(policy, optimizer, schedule, rows, algo, train, version=0, max_tokens=8,
                           temperature=1.0, seed=7)
    return stats, schedule


@pytest.mark.parametrize("loss", ["grpo", "dapo", "bnpo"])
@pytest.mark.parametrize("updates", [1, 2])
def test_train_on_batch_matches_an_independent_full_batch_computation(tiny_model, loss, updates):
    policy = Policy(ModelConfig(path=tiny_model, dtype="float32"), LoraConfig())
    reference = copy.deepcopy(policy.model).double()
    initial = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    rows = make_rows()
    # pi_old: the starting policy, fixed for every update of the batch.
    with torch.no_grad():
        old = {id(r): row_logprobs(reference, r) for r in rows}
    for minibatch in shuffled_minibatches(rows, updates, seed=7):
        reference_update(reference, minibatch, old, loss)

    # A 12-token budget splits each mini-batch into several micro-batches.
    stats, _ = run_trainer(policy, rows, loss, updates, micro_tokens=12)
    assert stats["updates"] == updates and stats["nonfinite"] == 0.0
    expected = dict(reference.named_parameters())
    for name, param in policy.model.named_parameters():
        torch.testing.assert_close(param.double(), expected[name].detach(), rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")
    # The update is not a no-op (so the comparison above is not trivially true).
    assert any((p - initial[n]).abs().max() > 1e-3 for n, p in policy.model.named_parameters())


@pytest.mark.parametrize("offpolicy", ["tis", "mask"])
def test_peers_samples_have_no_behaviour_policy_to_correct_for(tiny_model, offpolicy):
    """A swarm peer's rows (no behaviour log-probs, no versions) train as on-policy samples under
    every off-policy correction: the same update as the plain objective, computed independently."""
    policy = Policy(ModelConfig(path=tiny_model, dtype="float32"), LoraConfig())
    reference = copy.deepcopy(policy.model).double()
    rows = make_rows()
    for row in rows[::2]:  # half the rows come from a peer
        row.behaviour_logprobs, row.versions = None, None
    with torch.no_grad():
        old = {id(r): row_logprobs(reference, r) for r in rows}
    for minibatch in shuffled_minibatches(rows, 2, seed=7):
        reference_update(reference, minibatch, old, "grpo")
    for row in rows[1::2]:  # our own rows: behaviour = pi_old exactly, current version
        row.behaviour_logprobs = old[id(row)].tolist()
    run_trainer(policy, rows, "grpo", 2, 12, offpolicy=offpolicy)
    expected = dict(reference.named_parameters())
    for name, param in policy.model.named_parameters():
        torch.testing.assert_close(param.double(), expected[name].detach(), rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")


def test_the_learning_rate_logged_is_the_one_the_update_used(tiny_model):
    policy = Policy(ModelConfig(path=tiny_model, dtype="float32"), LoraConfig())
    # LR factor 1, 2, 3, ... per optimizer update: the updates use LR x 1 and LR x 2.
    stats, schedule = run_trainer(policy, make_rows(), "grpo", 2, 4096, lambda step: step + 1.0)
    assert stats["learning_rate"] == pytest.approx(LR * (1 + 2) / 2)
    assert schedule.last_epoch == 2  # the schedule advanced once per applied update


def test_a_later_non_finite_mini_batch_keeps_the_applied_update(tiny_model):
    policy = Policy(ModelConfig(path=tiny_model, dtype="float32"), LoraConfig())
    rows = make_rows()
    first, second = shuffled_minibatches(rows, 2, seed=7)
    second[0].advantage = float("nan")  # only the second mini-batch's loss is NaN
    before = [p.detach().clone() for p in policy.model.parameters()]
    stats, schedule = run_trainer(policy, rows, "grpo", 2, 4096)
    assert stats["updates"] == 1 and stats["nonfinite"] == 1.0
    assert "loss is nan" in stats["nonfinite_reason"]
    assert schedule.last_epoch == 1
    changed = any(not torch.equal(b, p) for b, p in zip(before, policy.model.parameters()))
    assert changed  # the first update was applied: the caller must sync the engine
    assert all(torch.isfinite(p).all() for p in policy.model.parameters())


def test_nothing_applied_raises(tiny_model):
    policy = Policy(ModelConfig(path=tiny_model, dtype="float32"), LoraConfig())
    rows = make_rows()
    for row in rows:
        row.advantage = float("nan")
    before = [p.detach().clone() for p in policy.model.parameters()]
    with pytest.raises(NonFiniteLoss, match="no update applied"):
        run_trainer(policy, rows, "grpo", 2, 4096)
    assert all(torch.equal(b, p) for b, p in zip(before, policy.model.parameters()))
