"""The engine wrapper on the real vLLM engine (CPU build, builtin:tiny-math).

Log-probs are checked against an independent computation: the same weights in transformers,
teacher-forced on the streamed tokens (temperature 1, so the sampling distribution is the
model's softmax).
"""

from __future__ import annotations

import asyncio
import os

import pytest
import torch

from rollover.rollout.engine import (
    EngineBusyError,
    EngineSettings,
    EngineStartError,
    RolloutEngine,
    SamplingSettings,
)

pytestmark = pytest.mark.integration

FORCED = SamplingSettings(temperature=1.0, ignore_eos=True)


@pytest.fixture(scope="module")
def hf_model(engine):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(engine.settings.model, dtype=torch.float32)
    return model.eval()


def reference_logprobs(model, prompt: list[int], response: list[int]) -> list[float]:
    """log p(response[t] | prompt + response[:t]) from a transformers forward pass."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None])[:, 0].tolist()


def assert_logprobs_under(model, weights, prompt, ids, lps) -> None:
    """The streamed log-probs are those of `weights` (loaded into `model` for the check only)."""
    original = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(weights)
    try:
        assert lps == pytest.approx(reference_logprobs(model, prompt, ids), abs=2e-3)
    finally:
        model.load_state_dict(original)


async def collect(engine, prompt, budget, request_id=None, abort_after=None, sampling=FORCED):
    """Stream one request; optionally abort it once `abort_after` tokens have arrived."""
    ids, lps, versions, finish = [], [], [], None
    async for chunk in engine.stream(prompt, budget, sampling, request_id=request_id):
        ids += chunk.token_ids
        lps += chunk.logprobs
        versions += [chunk.version] * len(chunk.token_ids)
        finish = chunk.finish_reason or finish
        if abort_after is not None and len(ids) >= abort_after and finish is None:
            await engine.abort([request_id])
            abort_after = None
    return ids, lps, versions, finish


def test_stream_delivers_every_token_with_its_logprob(engine, run, tokenizer, hf_model):
    prompt = tokenizer.encode("25+68=")
    ids, lps, versions, finish = run(collect(engine, prompt, 24))
    assert finish == "length" and len(ids) == len(lps) == 24
    assert versions == [engine.policy_version] * 24
    assert lps == pytest.approx(reference_logprobs(hf_model, prompt, ids), abs=2e-3)
    assert engine.decode(ids) == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("interval", [1, 8])
def test_abort_keeps_streamed_tokens_and_resume_continues_from_ids(
    engine, run, tokenizer, hf_model, interval
):
    prompt = tokenizer.encode("407+385=")
    sampling = SamplingSettings(temperature=1.0, ignore_eos=True, stream_interval=interval)
    ids, lps, _, finish = run(collect(engine, prompt, 200, request_id=f"abort-{interval}",
                                      abort_after=8, sampling=sampling))
    assert finish == "aborted"
    assert 8 <= len(ids) < 200 and len(lps) == len(ids)
    assert lps == pytest.approx(reference_logprobs(hf_model, prompt, ids), abs=2e-3)
    run(engine.wait_idle(timeout=5))
    assert engine.num_unfinished() == 0 and not engine.active_requests

    # Resume: prompt + kept tokens, with the remaining budget of a 40-token sample.
    kept = ids[:10] if len(ids) >= 10 else ids
    more, more_lps, _, finish = run(collect(engine, prompt + kept, 40 - len(kept)))
    assert finish == "length" and len(kept) + len(more) == 40
    full_ref = reference_logprobs(hf_model, prompt, kept + more)
    assert more_lps == pytest.approx(full_ref[len(kept):], abs=2e-3)


def test_zero_budget_request_is_refused(engine, run, tokenizer):
    with pytest.raises(ValueError):
        run(collect(engine, tokenizer.encode("1+1="), 0))


def test_update_weights_needs_idle_engine_and_stamps_new_version(engine, run, tokenizer, hf_model):
    # A prompt spanning several KV blocks: a prefix cache that survived the weight load
    # would serve KV from the old weights and the log-probs would not match.
    prompt = tokenizer.encode("12+34=" * 14)
    assert engine.prefix_caching
    run(collect(engine, prompt, 4))  # caches the prompt's blocks under the old weights
    original = {k: v.clone() for k, v in hf_model.state_dict().items()}
    perturbed = {k: v + 0.05 * torch.randn_like(v, generator=torch.Generator().manual_seed(0))
                 if k.endswith("proj.weight") else v for k, v in original.items()}

    async def busy_update():
        stream = engine.stream(prompt, 200, FORCED, request_id="busy")
        await stream.__anext__()  # the request is running now
        with pytest.raises(EngineBusyError):
            await engine.update_weights(perturbed)
        await engine.abort(["busy"])
        async for _ in stream:
            pass
        await engine.wait_idle(timeout=5)

    run(busy_update())
    before = engine.policy_version
    assert run(engine.update_weights(perturbed)) == before + 1
    ids, lps, versions, _ = run(collect(engine, prompt, 16))
    assert versions == [before + 1] * 16
    assert_logprobs_under(hf_model, perturbed, prompt, ids, lps)
    # Back to the original weights, with an explicit version (as after a checkpoint restore).
    assert run(engine.update_weights(original.items(), version=before + 5)) == before + 5
    ids, lps, versions, _ = run(collect(engine, prompt, 16))
    assert versions == [before + 5] * 16
    assert lps == pytest.approx(reference_logprobs(hf_model, prompt, ids), abs=2e-3)
    assert run(engine.reset_prefix_cache()) is True


def test_engine_that_cannot_start_raises_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(EngineStartError, match="no-such-model"):
        RolloutEngine(EngineSettings(model=str(missing))).start()


def test_kv_cache_gib_sizes_the_cpu_cache_and_wins_over_the_legacy_variable(engine, monkeypatch):
    """vLLM's CPU platform replaces the KV size with VLLM_CPU_KVCACHE_SPACE (whole GiB) when it is
    set; the recipe key must win, fractions included (a 1 GiB cache costs ~9 s per start here)."""
    from vllm import envs
    from vllm.v1.engine.async_llm import AsyncLLM

    assert engine.llm.vllm_config.cache_config.kv_cache_memory_bytes == 2**28  # default 0.25 GiB
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    seen = {}

    def config_only(args, **_):  # vLLM's own config resolution (the platform hook), no engine
        seen["config"] = args.create_engine_config()
        raise RuntimeError("config resolved; no engine wanted")

    monkeypatch.setattr(AsyncLLM, "from_engine_args", staticmethod(config_only))
    try:
        with pytest.raises(EngineStartError, match="config resolved"):
            RolloutEngine(EngineSettings(model=engine.settings.model, max_model_len=256,
                                         kv_cache_gib=0.125)).start()
    finally:
        envs.disable_envs_cache()
    assert seen["config"].cache_config.kv_cache_memory_bytes == 128 * 2**20


def test_abort_of_unknown_or_finished_requests_is_harmless(engine, run):
    assert run(engine.abort(["never-submitted"])) == 0
    run(asyncio.sleep(0))


def test_request_sent_during_a_weight_load_is_served_by_the_new_weights(engine, run, tokenizer, hf_model):
    prompt = tokenizer.encode("58+27=")
    original = {k: v.clone() for k, v in hf_model.state_dict().items()}
    perturbed = {k: v + 0.05 * torch.randn_like(v, generator=torch.Generator().manual_seed(1))
                 if k.endswith("proj.weight") else v for k, v in original.items()}
    before = engine.policy_version

    async def load_while_requesting():
        load = asyncio.create_task(engine.update_weights(perturbed))
        await asyncio.sleep(0)  # the load has started: the request below arrives in the middle
        assert not load.done()
        got = await collect(engine, prompt, 12, request_id="during-load")
        await load
        return got

    ids, lps, versions, _ = run(load_while_requesting())
    assert versions == [before + 1] * 12
    assert_logprobs_under(hf_model, perturbed, prompt, ids, lps)
    run(engine.update_weights(original, version=before + 2))
    assert engine.policy_version == before + 2


def test_a_request_id_in_use_is_refused(engine, run, tokenizer):
    prompt = tokenizer.encode("3+4=")

    async def twice():
        first = engine.stream(prompt, 200, FORCED, request_id="same-id")
        await first.__anext__()
        with pytest.raises(ValueError, match="already running"):
            await collect(engine, prompt, 4, request_id="same-id")
        await engine.abort(["same-id"])
        finish = None
        async for chunk in first:
            finish = chunk.finish_reason or finish
        return finish

    assert run(twice()) == "aborted"  # the first request was not disturbed by the second
    run(engine.wait_idle(timeout=5))


def test_wait_idle_never_cuts_another_callers_request_short(engine, run, tokenizer):
    """The scheduler's wait_idle must not abort an evaluation running beside it."""
    from rollover.rollout.engine import SamplingSettings as S

    prompt = tokenizer.encode("91+9=")

    async def evaluation_beside_the_scheduler():
        evaluation = asyncio.create_task(engine.generate(prompt, 60, S(temperature=1.0, ignore_eos=True)))
        mine = engine.stream(prompt, 200, FORCED, request_id="sched-own")
        await mine.__anext__()

        async def drain():  # the scheduler's group task, reading its stream to the end
            async for _ in mine:
                pass

        reader = asyncio.create_task(drain())
        await engine.abort(["sched-own"])
        await engine.wait_idle(timeout=5, request_ids=["sched-own"])  # only the caller's request
        await reader
        await engine.wait_idle(timeout=30)  # the whole engine: waits for the evaluation to end
        return await evaluation

    out = run(evaluation_beside_the_scheduler())
    assert out.finish_reason == "length" and len(out.token_ids) == 60


def _reader_wait_is_capped(worker) -> bool:
    """Runs in a vLLM worker: is rollover's plugin patching this process's queue readers?"""
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

    return hasattr(SpinCondition.wait, "__wrapped_by_rollover__")


def test_cpu_engine_runs_its_model_in_its_engine_core_process(engine, run):
    """One spawned process per CPU engine: the model runs in vLLM's engine core, not in a worker
    process of its own (rollout/cpu_executor.py), so a start imports torch and vLLM once less."""
    import psutil

    (model_pid,) = run(engine.llm.collective_rpc(_pid))
    model_process = psutil.Process(model_pid)
    assert model_process.name() == "VLLM::EngineCore" and model_process.ppid() == os.getpid()
    assert model_process.children() == []  # no VLLM::Worker below it


def _pid(worker) -> int:
    return os.getpid()


def test_cpu_engine_processes_run_the_idle_plugin(engine, run):
    """vLLM loads rollover's `vllm.general_plugins` entry point in the process that runs its
    worker, and the CPU engine switched it on there: without it a worker process of its own
    (ROLLOVER_CPU_EXECUTOR=mp, or tensor-parallel) spins a core through every update and an idle
    one can miss its wake-up for 5 s (rollout/vllm_plugin.py)."""
    from rollover.rollout.vllm_plugin import BUSY_LOOP_ENV

    assert float(os.environ[BUSY_LOOP_ENV]) < 1.0  # vLLM's own window is 1 s
    assert run(engine.llm.collective_rpc(_reader_wait_is_capped)) == [True]


def test_an_idle_load_pauses_vllms_scheduler_without_its_fixed_sleep(engine, run, hf_model, monkeypatch):
    """The push runs with vLLM's scheduler paused, asked of the engine core directly: vLLM's
    `pause_generation` ends in a fixed 20 ms sleep that only orders outputs of running requests,
    and an idle load has none (a keep load, with requests frozen, still goes through it)."""
    calls = []
    real_pause = engine.llm.pause_generation

    async def spied_pause(*args, **kwargs):
        calls.append("pause_generation")
        return await real_pause(*args, **kwargs)

    monkeypatch.setattr(engine.llm, "pause_generation", spied_pause)
    transport = engine.weight_transport
    real_push = transport.push
    paused = []

    async def push(llm, named_tensors):
        paused.append(await llm.is_paused())
        return await real_push(llm, named_tensors)

    monkeypatch.setattr(transport, "push", push)
    weights = {k: v.clone() for k, v in hf_model.state_dict().items()}
    before = engine.policy_version
    assert run(engine.update_weights(weights)) == before + 1
    assert paused == [True] and calls == []
    assert not run(engine.llm.is_paused())  # resumed after the load
    assert run(engine.update_weights(weights, keep_requests=True)) == before + 2
    assert calls == ["pause_generation"] and paused == [True, True]
