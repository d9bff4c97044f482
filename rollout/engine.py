"""An asyncio wrapper over vLLM's `AsyncLLM` for rollouts: token ids in, token deltas out.

Why a wrapper: vLLM's abort returns no partial output, so every request is streamed token by
token (`RequestOutputKind.DELTA`, one log-prob per token) and the caller keeps what arrived.
Every chunk is stamped with the policy version the engine held when the request was admitted.
Weight loads are atomic with respect to that version: while weights load (or the engine
sleeps) the admission gate is closed, vLLM's scheduler is paused, and the version is bumped
after the prefix cache is reset, so no request is stamped with one version and served by another.
An in-flight load (`update_weights(..., keep_requests=True)`) changes the weights under running
requests: their chunks from then on are `provisional`, and the last chunk of every request
carries the exact version of each of its tokens (`TokenChunk.versions`, from vLLM's
weight-version spans; see engine_control).

The engine is composed of three parts: this class (lifecycle and requests), its admission gate
(`AdmissionGate`, rollout/admission.py: running, waiting and aborted requests, and the version
they are stamped with) and its control (`EngineControl`, rollout/engine_control.py: weight loads,
the weight probe, sleep and wake-up, which close the gate).

The class holds no global state and exposes plain async methods, so it can be hosted inside a
Ray actor unchanged (`stream` is an async generator, which Ray actors support).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

from rollover.rollout.settings import (  # noqa: F401 - re-exported: callers import them from here
    CPU_BLOCK_SIZE,
    SLEEP_MODE_NEEDS_CUDA,
    EngineSettings,
    SamplingSettings,
    SleepModeUnavailable,
)
from rollover.rollout.admission import EARLY_ABORT_MEMORY, AdmissionGate  # noqa: F401 - re-exported
from rollover.rollout.cpu_executor import engine_core_executor, spawned_with
from rollover.rollout.engine_api import SingleEngine
from rollover.rollout.engine_control import (  # noqa: F401 - re-exported
    EngineBusyError,
    EngineControl,
    WeightLoadError,
    token_versions,
)
from rollover.rollout.vllm_plugin import BUSY_LOOP_ENV
from rollover.rollout.weights.weight_check import EngineReading
from rollover.rollout.weights.weight_sync import NamedTensors, SharedMemoryTransport, WeightTransport
from rollover.tasks.errors import RolloverError

log = logging.getLogger(__name__)

# Seconds a CPU engine's processes may busy-wait for their next message (vLLM spins for 1 s).
CPU_BUSY_LOOP_S = 0.05
# Seconds a stopping CPU engine gets before it is killed (it waits ~3 s on its worker otherwise).
CPU_SHUTDOWN_GRACE_S = 1.0
# vLLM finish reason -> ours. `repetition` (vLLM stopped a repetitive pattern) is a finished
# sample; `error` is a retryable request-level failure the scheduler counts and retries.
_FINISH = {"stop": "stop", "length": "length", "abort": "aborted",
           "repetition": "repetition", "error": "error"}


class EngineStartError(RolloverError, RuntimeError):
    """The engine could not be started (bad model path, no memory, broken install)."""


@dataclass
class TokenChunk:
    """Tokens streamed for one request since the previous chunk."""

    token_ids: list[int]
    logprobs: list[float]
    # Policy version at the request's admission: the version of these tokens unless `provisional`.
    version: int
    # On the last chunk only: stop | length | repetition (finished), aborted, error.
    finish_reason: str | None = None
    # On the last chunk only: the exact version of every token of the request (all its chunks,
    # this one included, in order). Callers that keep the tokens restamp them with it.
    versions: list[int] | None = None
    # An in-flight weight load started since the admission: these tokens may be of a newer
    # version than `version`. Only the last chunk's `versions` settles them; a stream that ends
    # without a last chunk (cancelled) leaves them unknown, so they must be dropped.
    provisional: bool = False


class RolloutEngine(SingleEngine):
    """One vLLM engine: stream requests, abort them, load new weights between steps, sleep.

    An `Engine` of rollout/engine_api.py (and a `ProbedEngine`, a `PoolMember`)."""

    def __init__(
        self, settings: EngineSettings, weight_transport: WeightTransport | None = None
    ) -> None:
        self.settings = settings
        self.weight_transport = weight_transport or SharedMemoryTransport()
        self._llm: Any = None
        self._prefix_caching = False
        self._shutdown_grace_s: float | None = None  # None: vLLM's default
        # Closed while weights load or the engine sleeps: new requests wait there, so each is
        # stamped with the version that will really serve it.
        self.gate = AdmissionGate()
        self.control = EngineControl(self)

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> "RolloutEngine":
        """Build the engine (blocking, ~20 s on CPU); idempotent. Raises EngineStartError."""
        if self._llm is not None:
            return self
        s = self.settings
        # A callable sent through collective_rpc (weight loading) needs this before start.
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.platforms import current_platform
            from vllm.v1.engine.async_llm import AsyncLLM

            if s.sleep_mode and not current_platform.is_cuda_alike():
                raise SleepModeUnavailable(SLEEP_MODE_NEEDS_CUDA)
            block_size = s.block_size
            cpu_args: dict[str, Any] = {}
            spawn_env: dict[str, str] = {}
            if current_platform.is_cpu():
                block_size = block_size or CPU_BLOCK_SIZE
                cpu_args["kv_cache_memory_bytes"] = int(s.kv_cache_gib * 2**30)
                # The model runs in vLLM's engine-core process, bound to our cores (cpu_executor.py).
                executor_args, spawn_env = engine_core_executor(s.extra)
                cpu_args.update(executor_args)
                # The CPU engine holds nothing a kill would leak; vLLM's default grace is 5 s.
                self._shutdown_grace_s = CPU_SHUTDOWN_GRACE_S
                # Its processes sleep when idle instead of spinning on the cores the trainer
                # needs (rollout/vllm_plugin.py); inherited by the processes vLLM starts.
                os.environ.setdefault(BUSY_LOOP_ENV, str(CPU_BUSY_LOOP_S))
                # vLLM's CPU platform would replace the size with this legacy whole-GiB variable.
                legacy = os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
                if legacy:
                    log.warning("VLLM_CPU_KVCACHE_SPACE=%s ignored: rollout.kv_cache_gib (%g GiB) "
                                "sizes the KV cache", legacy, s.kv_cache_gib)
            args = AsyncEngineArgs(
                model=s.model,
                dtype=s.dtype,
                max_model_len=s.max_model_len,
                seed=s.seed,
                gpu_memory_utilization=s.gpu_memory_utilization,
                enforce_eager=s.enforce_eager,
                enable_prefix_caching=s.enable_prefix_caching,
                logprobs_mode=s.logprobs_mode,
                max_num_seqs=s.max_num_seqs,
                block_size=block_size,
                enable_sleep_mode=s.sleep_mode,
                disable_log_stats=True,
                **{**cpu_args, **s.extra},
            )
            started = time.perf_counter()
            with spawned_with(spawn_env):
                self._llm = AsyncLLM.from_engine_args(args)
        except SleepModeUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure here is a start failure
            raise EngineStartError(
                f"vLLM engine failed to start for model '{s.model}': {type(exc).__name__}: {exc}"
            ) from exc
        self._prefix_caching = bool(self._llm.vllm_config.cache_config.enable_prefix_caching)
        log.info("vLLM engine up in %.1f s (%s)", time.perf_counter() - started, s.model)
        return self

    def shutdown(self) -> None:
        """Stop the engine processes."""
        if self._llm is not None:
            self._llm.shutdown(timeout=self._shutdown_grace_s)
            self._llm = None

    @property
    def llm(self) -> Any:
        if self._llm is None:
            raise RuntimeError("engine not started: call start() first")
        return self._llm

    @property
    def max_model_len(self) -> int:
        """Prompt + response tokens one request may hold."""
        if self._llm is not None:
            return int(self._llm.vllm_config.model_config.max_model_len)
        return self.settings.max_model_len

    @property
    def errored(self) -> bool:
        """True once the vLLM engine has died (every later request would fail)."""
        return self._llm is not None and bool(self._llm.errored)

    @property
    def prefix_caching(self) -> bool:
        return self._prefix_caching

    @property
    def asleep(self) -> bool:
        """True between `sleep()` and `wake_up()` (sleep mode only)."""
        return self.control.asleep

    @property
    def policy_version(self) -> int:
        """The version new requests are stamped with (kept by the gate)."""
        return self.gate.version

    @policy_version.setter
    def policy_version(self, version: int) -> None:
        self.gate.version = version

    def decode(self, token_ids: list[int]) -> str:
        """Token ids to text with the engine's tokenizer (for verifiers and logs)."""
        return self.llm.get_tokenizer().decode(token_ids, skip_special_tokens=True)

    def mark_lost(self, why: str) -> None:
        """Nothing to do: a pool declares an engine dead when it raises `EngineLost`, which an
        in-process engine never does (its failures are its own errors, `errored`)."""

    # ---- requests --------------------------------------------------------------------------

    def _params(self, max_tokens: int, sampling: SamplingSettings, final_only: bool) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            max_tokens=max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            ignore_eos=sampling.ignore_eos,
            seed=sampling.seed,
            stream_interval=sampling.stream_interval,
            logprobs=0,
            detokenize=False,  # text is decoded once, from the final token ids
            output_kind=RequestOutputKind.FINAL_ONLY if final_only else RequestOutputKind.DELTA,
        )

    async def _admit(self, request_id: str) -> int:
        """`AdmissionGate.admit`: wait for the gate, register; the version to stamp."""
        return await self.gate.admit(request_id)

    def _release(self, request_id: str) -> None:
        self.gate.release(request_id)

    async def stream(
        self,
        prompt_ids: list[int],
        max_tokens: int,
        sampling: SamplingSettings = SamplingSettings(),
        request_id: str | None = None,
    ) -> AsyncIterator[TokenChunk]:
        """Submit `prompt_ids` with a budget of `max_tokens`; yield tokens as they are sampled.

        The last chunk carries the finish reason (`aborted` after `abort`, or when vLLM aborted
        the request itself) and the exact version of every token of the request (`versions`).
        Whatever was yielded before an abort is all there is: the caller must keep it.
        """
        from vllm.inputs import TokensPrompt

        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        rid = request_id or uuid.uuid4().hex
        params = self._params(max_tokens, sampling, final_only=False)
        version = await self._admit(rid)
        loads = self.gate.keep_loads  # read with the admission (no await between)
        sent = 0
        try:
            if self.gate.take_early_abort(rid):  # aborted before admission: vLLM never sees it
                yield TokenChunk([], [], version, "aborted", [])
                return
            async for out in self.llm.generate(TokensPrompt(prompt_token_ids=prompt_ids), params, rid):
                if not out.finished and self.gate.take_reabort(rid):
                    # The abort may have raced the request's registration: repeat it now.
                    await self.llm.abort([rid])
                comp = out.outputs[0]
                ids = list(comp.token_ids)
                lps = _sampled_logprobs(ids, comp.logprobs)
                finish = _FINISH.get(comp.finish_reason, comp.finish_reason) if out.finished else None
                versions = self._versions(comp, sent + len(ids), version, loads) if out.finished else None
                if ids or finish:
                    # New weights compute tokens only after a keep load bumped the count, so a
                    # chunk received before that holds admission-version tokens only.
                    yield TokenChunk(ids, lps, version, finish, versions, self.gate.keep_loads != loads)
                    sent += len(ids)
        finally:
            self._release(rid)

    async def generate(
        self,
        prompt_ids: list[int],
        max_tokens: int,
        sampling: SamplingSettings = SamplingSettings(),
        request_id: str | None = None,
    ) -> TokenChunk:
        """One request, no streaming: the whole response at once (evaluation, raw throughput)."""
        from vllm.inputs import TokensPrompt

        rid = request_id or uuid.uuid4().hex
        params = self._params(max_tokens, sampling, final_only=True)
        last = None
        version = await self._admit(rid)
        loads = self.gate.keep_loads
        if self.gate.take_early_abort(rid):
            self._release(rid)
            return TokenChunk([], [], version, "aborted", [])
        try:
            async for out in self.llm.generate(TokensPrompt(prompt_token_ids=prompt_ids), params, rid):
                last = out
        finally:
            self._release(rid)
        comp = last.outputs[0]
        ids = list(comp.token_ids)
        return TokenChunk(ids, _sampled_logprobs(ids, comp.logprobs), version,
                          _FINISH.get(comp.finish_reason, comp.finish_reason),
                          self._versions(comp, len(ids), version, loads), self.gate.keep_loads != loads)

    def _versions(self, comp: Any, n_tokens: int, version: int, loads: int) -> list[int]:
        """Exact per-token versions of a finished request (admitted at `version`, `loads`)."""
        return token_versions(comp.weight_versions, n_tokens, version, loads, self.gate.keep_loads)

    @property
    def active_requests(self) -> set[str]:
        """Request ids whose stream is still open."""
        return set(self.gate.active)

    async def abort(self, request_ids: Iterable[str]) -> int:
        """Abort requests; their streams end with `aborted`. Returns how many were open
        (running, or waiting for admission).

        A request whose registration raced the abort is aborted again on its first output. An id
        not running yet (waiting at the admission gate during a weight load, or not submitted
        yet) is remembered: its request ends `aborted`, with no token, when admitted.
        """
        ids, early = self.gate.sort_aborts(request_ids)
        if ids:
            await self.llm.abort(ids)
        return len(ids) + early

    async def abort_all(self) -> int:
        """Abort every open request (every caller's: prefer `abort` with your own ids)."""
        return await self.abort(self.active_requests)

    def num_unfinished(self) -> int:
        """Requests vLLM itself still tracks (the engine-side view, not ours)."""
        return int(self.llm.get_num_unfinished_requests())

    async def wait_idle(self, timeout: float = 10.0, request_ids: Iterable[str] | None = None) -> None:
        """Wait until requests are gone; EngineBusyError after `timeout` seconds.

        With `request_ids` (the caller's own): aborts those still open and waits until their
        streams close. Without: waits until no stream is open and vLLM tracks no request,
        repeating only aborts already asked for (an abort can race a request's registration);
        a request nobody asked to abort (an evaluation beside the scheduler) is waited for,
        never cut short.
        """
        mine = None if request_ids is None else set(request_ids)
        deadline = time.monotonic() + timeout
        while True:
            open_ids = self.gate.active if mine is None else self.gate.active & mine
            if not open_ids and (mine is not None or not self.num_unfinished()):
                return
            if time.monotonic() > deadline:
                raise EngineBusyError(
                    f"engine not idle after {timeout:.0f} s: {len(open_ids)} open streams, "
                    f"{self.num_unfinished()} unfinished requests"
                )
            again = open_ids if mine is not None else open_ids & self.gate.abort_requested
            if again:
                await self.abort(again)
            await asyncio.sleep(0.01)

    # ---- weights and sleep: the engine's control (rollout/engine_control.py) -----------------

    async def update_weights(self, named_tensors: NamedTensors, version: int | None = None,
                             keep_requests: bool = False, recompute_kv: bool = False) -> int:
        """Load trainer weights (checkpoint names); bump the policy version; return it.
        Atomic with respect to the version; see `EngineControl.update_weights`."""
        return await self.control.update_weights(named_tensors, version, keep_requests, recompute_kv)

    async def weight_probe(self, token_ids: list[int]) -> list[EngineReading]:
        """This engine's version and prompt log-probs of `token_ids` (rollout/weights/weight_check.py)."""
        return await self.control.weight_probe(token_ids)

    async def reset_prefix_cache(self) -> bool:
        """Drop cached KV blocks. True if reset or nothing to reset."""
        return await self.control.reset_prefix_cache()

    async def sleep(self, level: int = 1) -> None:
        """Free the engine's GPU memory for a colocated trainer (no-op without sleep mode)."""
        await self.control.sleep(level)

    async def wake_up(self) -> None:
        """Take the GPU memory back and serve again (no-op without sleep mode or when awake)."""
        await self.control.wake_up()


def _sampled_logprobs(token_ids: list[int], logprobs: Any) -> list[float]:
    """The log-prob of each sampled token from vLLM's per-position dicts."""
    if logprobs is None:
        raise RuntimeError("engine returned no log-probs (logprobs=0 was requested)")
    return [float(pos[tok].logprob) for tok, pos in zip(token_ids, logprobs)]
