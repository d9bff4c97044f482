"""In-flight weight loads (`update_weights(..., keep_requests=True)`) on the real engine.

The running requests must go on without an abort, and every token must carry the version of the
weights that computed it. The tests find the split themselves, from the log-probs: "flat" weights
(final norm zeroed) make every logit zero, so a token sampled under them has log-prob exactly
-ln(vocab); with `recompute_kv` the tokens after the split must match a transformers reference of
the new weights. Every test leaves the engine idle on its original weights.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

import pytest
import torch

from rollover.rollout.engine import SamplingSettings, WeightLoadError
from rollover.rollout.group_run import GroupRun, GroupRunner
from rollover.rollout.metrics import StepCounters
from rollover.rollout.types import Group, Sample

pytestmark = pytest.mark.integration

LONG = 200
FORCED = SamplingSettings(temperature=1.0, ignore_eos=True)
HELD_BACK = SamplingSettings(temperature=1.0, ignore_eos=True, stream_interval=8)


@pytest.fixture(scope="module")
def hf_model(engine):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(engine.settings.model, dtype=torch.float32).eval()


@pytest.fixture
def original(hf_model, engine, run):
    """The engine's weights; put back (idle load, fresh version) after the test."""
    weights = {k: v.clone() for k, v in hf_model.state_dict().items()}
    yield weights
    run(engine.wait_idle(timeout=30))
    run(engine.update_weights(weights, version=engine.policy_version + 1))


def flat(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights whose logits are all zero: every token is sampled with log-prob -ln(vocab)."""
    return {k: torch.zeros_like(v) if k == "model.norm.weight" else v for k, v in weights.items()}


def is_flat(logprob: float, vocab: int) -> bool:
    return abs(logprob + math.log(vocab)) < 1e-3


def flat_split(lps: list[float], vocab: int) -> int:
    """Index of the first token sampled under the flat weights; every later one must be too."""
    split = next((i for i, lp in enumerate(lps) if is_flat(lp, vocab)), len(lps))
    assert all(is_flat(lp, vocab) for lp in lps[split:]), "old weights came back after the load"
    return split


def reference_logprobs(model, prompt: list[int], response: list[int]) -> list[float]:
    """log p(response[t] | prompt + response[:t]) from a transformers forward pass."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None])[:, 0].tolist()


def under(model, weights, prompt, response) -> list[float]:
    """Reference log-probs with `weights` loaded into `model` for the computation only."""
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(weights)
    try:
        return reference_logprobs(model, prompt, response)
    finally:
        model.load_state_dict(saved)


def runner(engine, sampling: SamplingSettings, budget: int = LONG) -> GroupRunner:
    """A GroupRunner used request by request (no scoring); request ids are unique per test run."""
    tag = f"keep-{engine.policy_version}"
    return GroupRunner(engine, scores=None, sampling=sampling, max_tokens=budget,
                       request_id=lambda uid, i: f"{tag}-{uid}-{i}")


def start_sample(r: GroupRunner, uid: int, prompt: list[int]) -> tuple[Sample, asyncio.Task]:
    """One sample's request, run by the scheduler's own per-request code (restamps included)."""
    sample = Sample(prompt_ids=prompt)
    run = GroupRun(Group(uid=uid, task={}, samples=[sample]))
    return sample, asyncio.create_task(r._request(run, 0, sample, StepCounters()))


async def until(cond: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def vocab(engine) -> int:
    return engine.llm.vllm_config.model_config.get_vocab_size()


def test_keep_load_continues_running_requests_with_exact_versions(engine, run, tokenizer, original):
    before, v = engine.policy_version, vocab(engine)
    fast, held = runner(engine, FORCED), runner(engine, HELD_BACK)
    cut = runner(engine, HELD_BACK, budget=240)

    async def scenario():
        running = [start_sample(r, uid, tokenizer.encode(f"{uid}+{uid * 7}="))
                   for uid, r in enumerate([fast, fast, held, held])]
        victim = start_sample(cut, 9, tokenizer.encode("93+48="))
        everyone = running + [victim]
        await until(lambda: all(len(s.response_ids) >= 20 for s, _ in everyone), "20 tokens each")
        load = asyncio.create_task(engine.update_weights(flat(original), keep_requests=True))
        await asyncio.sleep(0)  # the load has closed the gate: this request waits for it
        assert not load.done()
        newcomer = start_sample(fast, 20, tokenizer.encode("11+22="))
        assert await load == before + 1
        at_load = len(victim[0].response_ids)
        await until(lambda: len(victim[0].response_ids) >= at_load + 16, "tokens after the load")
        await engine.abort([cut.request_id(9, 0)])
        await asyncio.gather(*(t for _, t in everyone + [newcomer]))
        return [s for s, _ in running], victim[0], newcomer[0]

    running, victim, newcomer = run(scenario())
    for s in running:  # kept, not aborted: the whole budget under two versions
        assert s.finish_reason == "length" and len(s.response_ids) == LONG
    assert victim.finish_reason == "aborted" and 20 < len(victim.response_ids) < 240
    for s in running + [victim]:
        split = flat_split(s.logprobs, v)
        assert 0 < split < len(s.response_ids)  # tokens under each version
        assert s.versions == [before] * split + [before + 1] * (len(s.response_ids) - split)
    assert newcomer.finish_reason == "length" and flat_split(newcomer.logprobs, v) == 0
    assert newcomer.versions == [before + 1] * LONG


def test_cancelled_request_keeps_only_tokens_of_known_version(engine, run, tokenizer, original):
    """A stream cut without its last chunk never learns where the split is: those tokens go."""
    before, v = engine.policy_version, vocab(engine)
    r = runner(engine, HELD_BACK)

    async def scenario():
        sample, task = start_sample(r, 0, tokenizer.encode("57+21="))
        await until(lambda: len(sample.response_ids) >= 20, "20 tokens")
        kept_before_load = len(sample.response_ids)
        await engine.update_weights(flat(original), keep_requests=True)
        await until(lambda: len(sample.response_ids) >= kept_before_load + 24, "tokens after the load")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return sample, kept_before_load

    sample, kept_before_load = run(scenario())
    assert sample.finish_reason == "aborted"
    assert len(sample.response_ids) == len(sample.logprobs) == len(sample.versions) == kept_before_load
    assert flat_split(sample.logprobs, v) == kept_before_load  # all kept tokens are old-weight ones
    assert sample.versions == [before] * kept_before_load


def test_recompute_kv_load_serves_exactly_the_new_weights(engine, run, tokenizer, hf_model, original):
    """With recompute_kv the tokens after the split are exactly those of the new weights."""
    before = engine.policy_version
    perturbed = {k: v + 0.05 * torch.randn_like(v, generator=torch.Generator().manual_seed(2))
                 if k.endswith("proj.weight") else v for k, v in original.items()}
    r = runner(engine, FORCED)
    prompts = [tokenizer.encode("12+34=" * 3), tokenizer.encode("71+5=")]

    async def scenario():
        started = [start_sample(r, uid, p) for uid, p in enumerate(prompts)]
        await until(lambda: all(len(s.response_ids) >= 20 for s, _ in started), "20 tokens each")
        await engine.update_weights(perturbed, keep_requests=True, recompute_kv=True)
        await asyncio.gather(*(t for _, t in started))
        return [s for s, _ in started]

    for s in run(scenario()):
        assert s.finish_reason == "length" and len(s.response_ids) == LONG
        old = under(hf_model, original, s.prompt_ids, s.response_ids)
        new = under(hf_model, perturbed, s.prompt_ids, s.response_ids)
        split = next(i for i, (lp, ref) in enumerate(zip(s.logprobs, old)) if abs(lp - ref) > 2e-3)
        assert 0 < split < LONG
        assert s.logprobs[split:] == pytest.approx(new[split:], abs=2e-3)
        assert s.versions == [before] * split + [before + 1] * (LONG - split)


class BreaksMidway:
    """A transport that dies while copying (as far as the engine can tell, weights changed)."""

    async def push(self, llm, named_tensors) -> None:
        raise RuntimeError("worker died mid-copy")


def test_keep_load_that_fails_midway_aborts_the_frozen_requests(engine, run, tokenizer, original):
    before, v = engine.policy_version, vocab(engine)
    r = runner(engine, FORCED)
    transport = engine.weight_transport

    async def scenario():
        sample, task = start_sample(r, 0, tokenizer.encode("39+8="))
        await until(lambda: len(sample.response_ids) >= 20, "20 tokens")
        engine.weight_transport = BreaksMidway()
        try:
            with pytest.raises(RuntimeError, match="mid-copy"):
                await engine.update_weights(flat(original), keep_requests=True)
        finally:
            engine.weight_transport = transport
        await task
        with pytest.raises(WeightLoadError):
            await engine.generate(tokenizer.encode("1+1="), 4)
        return sample

    sample = run(scenario())
    assert sample.finish_reason == "aborted" and len(sample.response_ids) < LONG
    assert flat_split(sample.logprobs, v) == len(sample.response_ids)
    assert sample.versions == [before] * len(sample.response_ids)
    assert engine.policy_version == before


def test_span_labels_map_to_versions_by_when_their_load_started():
    """Labels from before the admission (vLLM's initial one, an older keep load's, even one an idle
    load has since outdated) mean the admission version; later keep loads name their own."""
    from vllm.outputs import WeightVersionSpan as Span

    from rollover.rollout.engine_control import keep_label, token_versions

    spans = [Span(keep_label(2, 5), 0, 3), Span(keep_label(3, 9), 3, 5)]
    assert token_versions(spans, 5, admitted_version=7, admitted_loads=2, loads_now=3) == [7, 7, 7, 9, 9]
    assert token_versions([Span("default", 0, 2)], 2, 4, 0, 0) == [4, 4]
    assert token_versions(None, 2, 4, admitted_loads=1, loads_now=1) == [4, 4]
    with pytest.raises(RuntimeError, match="no weight-version spans"):
        token_versions(None, 2, 4, admitted_loads=1, loads_now=2)
    with pytest.raises(RuntimeError, match="cover 2 tokens"):
        token_versions([Span("default", 0, 2)], 3, 4, 0, 0)
