"""An asyncio wrapper over vLLM's `AsyncLLM` for rollouts: token ids in, token deltas out.

Why a wrapper: vLLM's abort returns no partial output, so every request is streamed token by
token (`RequestOutputKind.DELTA`, one log-prob per token) and the caller keeps what arrived.
Every chunk is stamped with the policy version the engine held when the request was submitted;
weights only change while the engine is idle, so one request never mixes versions.

The class holds no global state and exposes plain async methods, so it can be hosted inside a
Ray actor unchanged (`stream` is an async generator, which Ray actors support).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from rollover.rollout.weight_sync import NamedTensors, SharedMemoryTransport, WeightTransport

log = logging.getLogger(__name__)

_FINISH = {"stop": "stop", "length": "length", "abort": "aborted"}
CPU_BLOCK_SIZE = 32  # see EngineSettings.block_size


class EngineStartError(RuntimeError):
    """The engine could not be started (bad model path, no memory, broken install)."""


class EngineBusyError(RuntimeError):
    """Weights cannot be loaded while requests are still running."""


@dataclass(frozen=True)
class EngineSettings:
    """How to build the engine; `from_configs` maps the recipe's model and rollout sections."""

    model: str
    dtype: str = "float32"
    max_model_len: int = 512
    seed: int = 0
    kv_cache_gib: float = 1.0  # CPU build: VLLM_CPU_KVCACHE_SPACE (whole GiB, at least 1)
    gpu_memory_utilization: float = 0.5  # GPU build
    enforce_eager: bool = True
    enable_prefix_caching: bool | None = None  # None: vLLM's default (on)
    # KV block size. A resumed request re-uses its cached KV only for *full* blocks, so small
    # blocks matter to APRIL: vLLM's CPU default (128) is longer than most short responses and
    # made no-tail APRIL ~35% slower here; None picks 32 on CPU and vLLM's default elsewhere.
    block_size: int | None = None
    # Behaviour log-probs of the distribution actually sampled (temperature, top-p applied).
    logprobs_mode: str = "processed_logprobs"
    max_num_seqs: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # any other AsyncEngineArgs field

    @classmethod
    def from_configs(cls, model_cfg: Any, rollout_cfg: Any, *, has_cuda: bool | None = None,
                     **overrides: Any) -> "EngineSettings":
        """Settings from `trainer.config.ModelConfig` and `RolloutConfig` (builtin paths resolved).

        `has_cuda` (default: detected) decides the GPU-sane defaults: `dtype: auto` is bfloat16
        and `enforce_eager: null` turns CUDA graphs on with a GPU; float32 and eager on CPU.
        """
        from rollover.trainer.builtin_model import resolve_model_path
        from rollover.trainer.config import resolve_dtype

        if has_cuda is None:
            import torch

            has_cuda = torch.cuda.is_available()
        eager = rollout_cfg.enforce_eager
        values = dict(
            model=resolve_model_path(model_cfg.path),
            dtype=resolve_dtype(model_cfg.dtype, has_cuda),
            max_model_len=model_cfg.max_model_len,
            seed=rollout_cfg.seed,
            kv_cache_gib=rollout_cfg.kv_cache_gib,
            gpu_memory_utilization=rollout_cfg.gpu_memory_utilization,
            enforce_eager=(not has_cuda) if eager is None else eager,
        )
        values.update(overrides)
        return cls(**values)


@dataclass(frozen=True)
class SamplingSettings:
    """Per-request sampling knobs (the token budget is passed separately)."""

    temperature: float = 1.0
    top_p: float = 1.0
    ignore_eos: bool = False  # benchmarks: force exact lengths
    seed: int | None = None
    # Tokens per streamed chunk. >1 wakes the caller less often (less frontend CPU); an abort
    # still delivers every token the engine produced, in the final chunk.
    stream_interval: int = 1


@dataclass
class TokenChunk:
    """Tokens streamed for one request since the previous chunk."""

    token_ids: list[int]
    logprobs: list[float]
    version: int  # policy version that produced these tokens
    finish_reason: str | None = None  # stop | length | aborted, on the last chunk only


class RolloutEngine:
    """One vLLM engine: stream requests, abort them, load new weights between steps."""

    def __init__(
        self, settings: EngineSettings, weight_transport: WeightTransport | None = None
    ) -> None:
        self.settings = settings
        self.weight_transport = weight_transport or SharedMemoryTransport()
        self.policy_version = 0
        self._llm: Any = None
        self._active: set[str] = set()  # request ids whose stream has not ended
        self._abort_requested: set[str] = set()
        self._prefix_caching = False

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
                disable_log_stats=True,
                **s.extra,
            )
            started = time.perf_counter()
            self._llm = AsyncLLM.from_engine_args(args)
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

    async def stream(
        self,
        prompt_ids: list[int],
        max_tokens: int,
        sampling: SamplingSettings = SamplingSettings(),
        request_id: str | None = None,
    ) -> AsyncIterator[TokenChunk]:
        """Submit `prompt_ids` with a budget of `max_tokens`; yield tokens as they are sampled.

        The last chunk carries the finish reason (`aborted` after `abort`). Whatever was
        yielded before an abort is all there is: the caller must keep it.
        """
        from vllm.inputs import TokensPrompt

        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        rid = request_id or uuid.uuid4().hex
        version = self.policy_version
        params = self._params(max_tokens, sampling, final_only=False)
        self._active.add(rid)
        try:
            async for out in self.llm.generate(TokensPrompt(prompt_token_ids=prompt_ids), params, rid):
                if rid in self._abort_requested and not out.finished:
                    # The abort may have raced the request's registration: repeat it now.
                    self._abort_requested.discard(rid)
                    await self.llm.abort([rid])
                comp = out.outputs[0]
                ids = list(comp.token_ids)
                lps = _sampled_logprobs(ids, comp.logprobs)
                finish = _FINISH.get(comp.finish_reason, comp.finish_reason) if out.finished else None
                if ids or finish:
                    yield TokenChunk(ids, lps, version, finish)
        finally:
            self._active.discard(rid)
            self._abort_requested.discard(rid)

    async def generate(
        self,
        prompt_ids: list[int],
        max_tokens: int,
        sampling: SamplingSettings = SamplingSettings(),
        request_id: str | None = None,
    ) -> TokenChunk:
        """One request, no streaming: the whole response at once (the raw-throughput baseline)."""
        from vllm.inputs import TokensPrompt

        rid = request_id or uuid.uuid4().hex
        version = self.policy_version
        params = self._params(max_tokens, sampling, final_only=True)
        last = None
        self._active.add(rid)
        try:
            async for out in self.llm.generate(TokensPrompt(prompt_token_ids=prompt_ids), params, rid):
                last = out
        finally:
            self._active.discard(rid)
        comp = last.outputs[0]
        ids = list(comp.token_ids)
        return TokenChunk(ids, _sampled_logprobs(ids, comp.logprobs), version,
                          _FINISH.get(comp.finish_reason, comp.finish_reason))

    @property
    def active_requests(self) -> set[str]:
        """Request ids whose stream is still open."""
        return set(self._active)

    async def abort(self, request_ids: list[str] | set[str]) -> int:
        """Abort requests; their streams end with `aborted`. Returns how many were open.

        A request whose registration raced the abort is aborted again on its first output.
        """
        ids = [r for r in request_ids if r in self._active]
        if ids:
            self._abort_requested.update(ids)
            await self.llm.abort(ids)
        return len(ids)

    async def abort_all(self) -> int:
        """Abort every open request."""
        return await self.abort(self.active_requests)

    def num_unfinished(self) -> int:
        """Requests vLLM itself still tracks (the engine-side view, not ours)."""
        return int(self.llm.get_num_unfinished_requests())

    async def wait_idle(self, timeout: float = 10.0) -> None:
        """Return once no stream is open and vLLM tracks no request; else EngineBusyError.

        A request added while an abort was in flight can survive it, so open streams are
        re-aborted while waiting.
        """
        deadline = time.monotonic() + timeout
        while self._active or self.num_unfinished():
            if time.monotonic() > deadline:
                raise EngineBusyError(
                    f"engine not idle after {timeout:.0f} s: {len(self._active)} open streams, "
                    f"{self.num_unfinished()} unfinished requests"
                )
            if self._active:
                await self.abort(self.active_requests)
            await asyncio.sleep(0.01)

    # ---- weights ---------------------------------------------------------------------------

    async def update_weights(self, named_tensors: NamedTensors, version: int | None = None) -> int:
        """Load trainer weights (checkpoint names) into the idle engine; bump the policy version.

        `version` sets the version explicitly (e.g. after a checkpoint restore); by default it
        goes up by one. Raises EngineBusyError if requests are still running. Returns the new
        version. The prefix cache is reset so no KV computed by the old weights is reused.
        """
        if self._active or self.num_unfinished():
            raise EngineBusyError(
                f"update_weights needs an idle engine: {len(self._active)} open streams, "
                f"{self.num_unfinished()} unfinished requests (abort and wait_idle first)"
            )
        if hasattr(named_tensors, "items"):
            named_tensors = named_tensors.items()  # type: ignore[assignment]
        await self.weight_transport.push(self.llm, named_tensors)
        await self.reset_prefix_cache()
        self.policy_version = self.policy_version + 1 if version is None else int(version)
        return self.policy_version

    async def reset_prefix_cache(self) -> bool:
        """Drop cached KV blocks (after a weight load). True if reset or nothing to reset."""
        if not self._prefix_caching:
            return True
        ok = bool(await self.llm.reset_prefix_cache())
        if not ok:
            raise EngineBusyError("prefix cache reset refused: requests still hold KV blocks")
        return ok


def _sampled_logprobs(token_ids: list[int], logprobs: Any) -> list[float]:
    """The log-prob of each sampled token from vLLM's per-position dicts."""
    if logprobs is None:
        raise RuntimeError("engine returned no log-probs (logprobs=0 was requested)")
    return [float(pos[tok].logprob) for tok, pos in zip(token_ids, logprobs)]
