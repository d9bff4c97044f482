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

The class holds no global state and exposes plain async methods, so it can be hosted inside a
Ray actor unchanged (`stream` is an async generator, which Ray actors support).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections import OrderedDict
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
from rollover.rollout.engine_control import (  # noqa: F401 - re-exported
    EngineBusyError,
    EngineControl,
    WeightLoadError,
    token_versions,
)
from rollover.rollout.weight_sync import SharedMemoryTransport, WeightTransport

from rollover.tasks.errors import RolloverError
log = logging.getLogger(__name__)

# vLLM finish reason -> ours. `repetition` (vLLM stopped a repetitive pattern) is a finished
# sample; `error` is a retryable request-level failure the scheduler counts and retries.
_FINISH = {"stop": "stop", "length": "length", "abort": "aborted",
           "repetition": "repetition", "error": "error"}

# Request ids aborted before their request was admitted (waiting at the gate, or not submitted
# yet: a Ray actor may see the abort before the stream call), remembered so the request ends at
# admission. Bounded: the oldest are forgotten first.
EARLY_ABORT_MEMORY = 10_000


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


class RolloutEngine(EngineControl):
    """One vLLM engine: stream requests, abort them, load new weights between steps, sleep."""

    def __init__(
        self, settings: EngineSettings, weight_transport: WeightTransport | None = None
    ) -> None:
        self.settings = settings
        self.weight_transport = weight_transport or SharedMemoryTransport()
        self.policy_version = 0
        self._llm: Any = None
        self._active: set[str] = set()  # request ids whose stream has not ended
        self._abort_requested: set[str] = set()  # asked to abort, stream still open
        self._reabort: set[str] = set()  # aborts to repeat on the request's first output
        self._waiting: set[str] = set()  # request ids waiting at the admission gate
        self._aborted_early: OrderedDict[str, None] = OrderedDict()  # see EARLY_ABORT_MEMORY
        self._prefix_caching = False
        # Closed while weights load or the engine sleeps: new requests wait here, so each is
        # stamped with the version that will really serve it.
        self._serving = asyncio.Event()
        self._serving.set()
        self._why_closed = ""
        self._weights_broken: str | None = None  # set when a load failed midway
        self._keep_loads = 0  # in-flight (keep_requests) weight loads started so far
        self._asleep = False

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
            if current_platform.is_cpu():
                os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(s.kv_cache_gib))))
                block_size = block_size or CPU_BLOCK_SIZE
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
                **s.extra,
            )
            started = time.perf_counter()
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
            self._llm.shutdown()
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
        return self._asleep

    def decode(self, token_ids: list[int]) -> str:
        """Token ids to text with the engine's tokenizer (for verifiers and logs)."""
        return self.llm.get_tokenizer().decode(token_ids, skip_special_tokens=True)

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
        """Wait until the engine serves, register the request; return the version to stamp.

        No await between the gate check and the registration, so a weight load that closes
        the gate next sees this request as running. The caller checks `_take_early_abort` next
        (no await between): an abort may have come while the request waited here.
        """
        self._waiting.add(request_id)
        try:
            while not self._serving.is_set():
                await self._serving.wait()
        finally:
            self._waiting.discard(request_id)
        if self._weights_broken:
            raise WeightLoadError(self._weights_broken)
        if request_id in self._active:
            raise ValueError(f"request id {request_id!r} is already running (vLLM would abort both)")
        self._active.add(request_id)
        return self.policy_version

    def _take_early_abort(self, request_id: str) -> bool:
        """True (once) if `request_id` was aborted before it was admitted."""
        if request_id not in self._aborted_early:
            return False
        del self._aborted_early[request_id]
        return True

    def _release(self, request_id: str) -> None:
        self._active.discard(request_id)
        self._abort_requested.discard(request_id)
        self._reabort.discard(request_id)

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
        loads = self._keep_loads  # read with the admission (no await between)
        sent = 0
        try:
            if self._take_early_abort(rid):  # aborted before admission: vLLM never sees it
                yield TokenChunk([], [], version, "aborted", [])
                return
            async for out in self.llm.generate(TokensPrompt(prompt_token_ids=prompt_ids), params, rid):
                if rid in self._reabort and not out.finished:
                    # The abort may have raced the request's registration: repeat it now.
                    self._reabort.discard(rid)
                    await self.llm.abort([rid])
                comp = out.outputs[0]
                ids = list(comp.token_ids)
                lps = _sampled_logprobs(ids, comp.logprobs)
                finish = _FINISH.get(comp.finish_reason, comp.finish_reason) if out.finished else None
                versions = self._versions(comp, sent + len(ids), version, loads) if out.finished else None
                if ids or finish:
                    # New weights compute tokens only after a keep load bumped the count, so a
                    # chunk received before that holds admission-version tokens only.
                    yield TokenChunk(ids, lps, version, finish, versions, self._keep_loads != loads)
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
        loads = self._keep_loads
        if self._take_early_abort(rid):
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
                          self._versions(comp, len(ids), version, loads), self._keep_loads != loads)

    def _versions(self, comp: Any, n_tokens: int, version: int, loads: int) -> list[int]:
        """Exact per-token versions of a finished request (admitted at `version`, `loads`)."""
        return token_versions(comp.weight_versions, n_tokens, version, loads, self._keep_loads)

    @property
    def active_requests(self) -> set[str]:
        """Request ids whose stream is still open."""
        return set(self._active)

    async def abort(self, request_ids: Iterable[str]) -> int:
        """Abort requests; their streams end with `aborted`. Returns how many were open
        (running, or waiting for admission).

        A request whose registration raced the abort is aborted again on its first output. An id
        not running yet (waiting at the admission gate during a weight load, or not submitted
        yet) is remembered: its request ends `aborted`, with no token, when admitted.
        """
        ids, early = [], 0
        for r in request_ids:
            if r in self._active:
                ids.append(r)
                continue
            early += r in self._waiting
            self._aborted_early[r] = None
            self._aborted_early.move_to_end(r)
            if len(self._aborted_early) > EARLY_ABORT_MEMORY:
                self._aborted_early.popitem(last=False)
        if ids:
            self._abort_requested.update(ids)
            self._reabort.update(ids)
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
            open_ids = self._active if mine is None else self._active & mine
            if not open_ids and (mine is not None or not self.num_unfinished()):
                return
            if time.monotonic() > deadline:
                raise EngineBusyError(
                    f"engine not idle after {timeout:.0f} s: {len(open_ids)} open streams, "
                    f"{self.num_unfinished()} unfinished requests"
                )
            again = open_ids if mine is not None else open_ids & self._abort_requested
            if again:
                await self.abort(again)
            await asyncio.sleep(0.01)


def _sampled_logprobs(token_ids: list[int], logprobs: Any) -> list[float]:
    """The log-prob of each sampled token from vLLM's per-position dicts."""
    if logprobs is None:
        raise RuntimeError("engine returned no log-probs (logprobs=0 was requested)")
    return [float(pos[tok].logprob) for tok, pos in zip(token_ids, logprobs)]
