"""Mixed precision: float32 masters and AdamW state, bfloat16 compute, bfloat16 to the engine.

The reference run below is independent of the code under test: a plain transformers model in
float32, log-probs from its full logits, the GRPO objective written out (one update per batch,
so the ratio is 1 and the gradient is -A * d log p, averaged per sequence, then over sequences),
and plain `torch.optim.AdamW` with the same gradient clipping.
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from rollover.kernels.logprobs import chunked_logprobs
from rollover.trainer.checkpoint import load_trainer_state, save_checkpoint
from rollover.trainer.config import AlgoConfig, LoraConfig, ModelConfig, TrainConfig
from rollover.trainer.optim import build_lr_schedule, build_optimizer
from rollover.trainer.policy import Policy
from rollover.trainer.run import load_checkpoint_weights
from rollover.trainer.batch import Row
from rollover.trainer.update import train_on_batch

LR = 1e-6
STEPS = 4
TRAIN = TrainConfig(lr=LR, steps=STEPS, grad_clip=1.0)
ALGO = AlgoConfig(loss="grpo", offpolicy="none")


def make_rows() -> list[Row]:
    """Six fixed samples of varied lengths and advantages (behaviour log-probs unused here)."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i, advantage in enumerate([1.0, -0.5, 2.0, -1.5, 0.25, -0.75]):
        prompt = torch.randint(4, 100, (2 + i % 3,), generator=g).tolist()
        response = torch.randint(4, 100, (1 + i,), generator=g).tolist()
        rows.append(Row(prompt, response, [-1.0] * len(response), [0] * len(response), advantage, False))
    return rows


def row_logprobs(model, row: Row) -> torch.Tensor:
    """Log-probs of the row's response tokens from the model's full float32 logits."""
    ids = torch.tensor([row.prompt_ids + row.response_ids])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    logp = logp.gather(-1, ids[0, 1:, None]).squeeze(-1)
    return logp[len(row.prompt_ids) - 1:]


def run_policy(tiny_model: str, dtype: str) -> tuple[Policy, dict[str, torch.Tensor]]:
    """STEPS updates through the trainer's own path; returns the policy and its starting weights."""
    policy = Policy(ModelConfig(path=tiny_model, dtype=dtype), LoraConfig())
    start = {n: p.detach().float().clone() for n, p in policy.model.named_parameters()}
    optimizer = build_optimizer(policy.trainable_parameters(), lr=LR, weight_decay=0.0)
    schedule = build_lr_schedule(optimizer, TRAIN)
    for step in range(STEPS):
        train_on_batch(policy, optimizer, schedule, make_rows(), ALGO, TRAIN, version=0,
                       max_tokens=16, temperature=1.0, seed=step)
    return policy, start


def reference_deltas(tiny_model: str) -> dict[str, torch.Tensor]:
    """The same STEPS updates in float32 with plain torch, written out independently."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    rows = make_rows()
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = sum(-(row.advantage * row_logprobs(model, row)).mean() for row in rows) / len(rows)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return {n: p.detach() - start[n] for n, p in model.named_parameters()}


def test_bfloat16_updates_move_the_weights_as_float32_ones_do(tiny_model):
    expected = reference_deltas(tiny_model)
    policy, start = run_policy(tiny_model, "bfloat16")
    got = {n: p.detach().float() - start[n] for n, p in policy.model.named_parameters()}
    assert got.keys() == expected.keys()
    flat_got = torch.cat([got[n].flatten() for n in expected])
    flat_want = torch.cat([expected[n].flatten() for n in expected])
    # Adam moves each weight by about lr per step: STEPS * lr in every coordinate, ideally.
    assert 0.5 * STEPS * LR < flat_want.abs().mean() <= STEPS * LR * 1.01
    ratio = float(flat_got.norm() / flat_want.norm())
    error = float((flat_got - flat_want).norm() / flat_want.norm())
    assert abs(ratio - 1) < 0.03 and error < 0.15, (ratio, error)  # bfloat16 masters: 0.23, 0.99
    for name, tensor in got.items():  # every tensor moved, none was rounded away
        assert float(tensor.norm() / expected[name].norm()) > 0.9, name


def test_float32_masters_and_state_bfloat16_compute_and_engine_weights(tiny_model):
    policy = Policy(ModelConfig(path=tiny_model, dtype="bfloat16"), LoraConfig())
    assert policy.compute_dtype == torch.bfloat16 and policy.dtype == "bfloat16"
    assert {p.dtype for p in policy.model.parameters()} == {torch.float32}
    optimizer = build_optimizer(policy.trainable_parameters(), lr=LR, weight_decay=0.0)
    train_on_batch(policy, optimizer, build_lr_schedule(optimizer, TRAIN), make_rows(), ALGO,
                   TRAIN, version=0, max_tokens=16, temperature=1.0, seed=0)
    states = [t for s in optimizer.state.values() for t in s.values() if t.dim() > 0]
    assert states and {t.dtype for t in states} == {torch.float32}
    weights = policy.engine_weights()
    live = policy.model.state_dict()
    assert weights.keys() == live.keys()
    for name, tensor in weights.items():
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, live[name].to(torch.bfloat16)), name  # a cast of the master
    masters = policy.engine_weights(cast=False)  # for a transport that casts bucket by bucket
    assert all(t.dtype == torch.float32 and t.data_ptr() == live[n].data_ptr() for n, t in masters.items())
    # The forward runs in bfloat16: log-probs match a bfloat16 model's, not the float32 one's.
    ids = torch.tensor([[5, 9, 17, 33, 40, 8, 71]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        got = policy.token_logprobs(ids, mask)[0]
        policy.model.float()
        full = torch.log_softmax(policy.model(input_ids=ids).logits[:, :-1].float(), -1)
        full = full.gather(-1, ids[:, 1:, None]).squeeze(-1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = policy.model.model(input_ids=ids).last_hidden_state[:, :-1]
            low = torch.log_softmax((low @ policy.model.lm_head.weight.t().bfloat16()).float(), -1)
        low = low.gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(got, low, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, full, atol=1e-4, rtol=0)


def test_kl_reference_is_frozen_in_the_compute_dtype(tiny_model):
    policy = Policy(ModelConfig(path=tiny_model, dtype="bfloat16"), LoraConfig())
    policy.enable_reference()
    params = list(policy.reference.parameters())
    assert {p.dtype for p in params} == {torch.bfloat16}
    assert not any(p.requires_grad for p in params) and not policy.reference.training
    starting = load_file(f"{tiny_model}/model.safetensors")
    reference = policy.reference.state_dict()
    for name, tensor in starting.items():
        assert torch.equal(reference[name], tensor.to(torch.bfloat16)), name
    ids = torch.tensor([[5, 9, 17, 33]])
    logprobs = policy.reference_logprobs(ids, torch.ones_like(ids), 1.0)
    assert logprobs.dtype == torch.float32 and logprobs.shape == (1, 3) and not logprobs.requires_grad


def test_lora_adapter_is_float32_over_a_bfloat16_frozen_base(tiny_model):
    policy = Policy(ModelConfig(path=tiny_model, dtype="bfloat16"),
                    LoraConfig(enabled=True, r=4, alpha=8, target_modules=["q_proj", "up_proj"]))
    trainable = policy.trainable_parameters()
    assert trainable and {p.dtype for p in trainable} == {torch.float32}
    frozen = [p for p in policy.model.parameters() if not p.requires_grad]
    assert frozen and {p.dtype for p in frozen} == {torch.bfloat16}
    assert {t.dtype for t in policy.engine_weights().values()} == {torch.bfloat16}
    for p in trainable:  # lora_B starts at zero: give the adapter a gradient everywhere
        torch.nn.init.normal_(p, std=0.02)
    before = [p.detach().clone() for p in trainable]
    optimizer = build_optimizer(trainable, lr=LR, weight_decay=0.0)
    train_on_batch(policy, optimizer, build_lr_schedule(optimizer, TRAIN), make_rows(), ALGO,
                   TRAIN, version=0, max_tokens=16, temperature=1.0, seed=0)
    for p, b in zip(trainable, before):  # one Adam step moves each adapter weight by ~lr
        moved = (p.detach() - b).abs()
        assert p.dtype == torch.float32 and 0.5 * LR < float(moved.mean()) <= 1.01 * LR


def test_checkpoint_round_trips_float32_masters_and_optimizer_state(tiny_model, tmp_path):
    policy = Policy(ModelConfig(path=tiny_model, dtype="bfloat16"), LoraConfig())
    optimizer = build_optimizer(policy.trainable_parameters(), lr=LR, weight_decay=0.0)
    schedule = build_lr_schedule(optimizer, TRAIN)
    train_on_batch(policy, optimizer, schedule, make_rows(), ALGO, TRAIN, version=0,
                   max_tokens=16, temperature=1.0, seed=0)
    folder = save_checkpoint(tmp_path, 1, policy, {"optimizer": optimizer.state_dict()}, keep=2)
    saved = load_file(str(folder / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}

    resumed = Policy(ModelConfig(path=tiny_model, dtype="bfloat16"), LoraConfig())
    load_checkpoint_weights(resumed, folder)
    for (name, a), b in zip(policy.model.named_parameters(), resumed.model.parameters()):
        assert b.dtype == torch.float32 and torch.equal(a, b), name
    resumed_opt = build_optimizer(resumed.trainable_parameters(), lr=LR, weight_decay=0.0)
    resumed_opt.load_state_dict(load_trainer_state(folder)["optimizer"])
    for before, after in zip(optimizer.state.values(), resumed_opt.state.values()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert after[key].dtype == before[key].dtype and torch.equal(after[key], before[key]), key
    # The next update from the resumed state equals the one the original run makes.
    for p, o in ((policy, optimizer), (resumed, resumed_opt)):
        train_on_batch(p, o, build_lr_schedule(o, TRAIN), make_rows(), ALGO, TRAIN, version=0,
                       max_tokens=16, temperature=1.0, seed=1)
    for a, b in zip(policy.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_head_matmul_under_autocast_has_the_gradient_of_its_own_log_probs():
    g = torch.Generator().manual_seed(0)
    hidden = (3 * torch.randn(24, 16, generator=g)).requires_grad_()  # logits of a few units
    weight = torch.randn(300, 16, generator=g).requires_grad_()
    targets = torch.randint(0, 300, (24,), generator=g)
    upstream = torch.randn(24, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logprobs, _ = chunked_logprobs(hidden, weight, targets, chunk_size=7)
    got = torch.autograd.grad((logprobs * upstream).sum(), (hidden, weight))
    # Independent: the bfloat16 logits, then a float32 log-softmax, differentiated by autograd.
    logits = (hidden.bfloat16() @ weight.bfloat16().t()).float()
    want_lp = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    want = torch.autograd.grad((want_lp * upstream).sum(), (hidden, weight))
    torch.testing.assert_close(logprobs, want_lp, atol=1e-5, rtol=1e-5)
    for a, b in zip(got, want):  # float32 logits in the backward were ~5% off here
        assert a.dtype == torch.float32
        assert float((a - b).abs().max() / b.abs().max()) < 0.01
