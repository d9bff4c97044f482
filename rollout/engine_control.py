"""Weight loads and sleep for `RolloutEngine` (`EngineControl`, held as `engine.control`): the
moments the engine stops serving.

Both close the engine's admission gate (rollout/admission.py: new requests wait, so each is
stamped with the version that really serves it). A weight load pauses vLLM's scheduler around
push, prefix-cache reset and version bump; sleep (CUDA only) frees the engine's GPU memory for a
colocated trainer until `wake_up`. Sleep and the default weight load need an idle engine.

In-flight loads (`update_weights(..., keep_requests=True)`, PipelineRL-style): vLLM freezes the
running requests with their KV cache (`pause_generation(mode="keep")`), the weights change, the
requests continue under the new weights. One request then spans versions, so each keep load also
sets vLLM's engine-side weight label (`AsyncLLM.update_weight_version`) to a label unique to that
load; vLLM attaches the label to every output batch and reports, on a request's final output,
which output tokens were computed under which label (`CompletionOutput.weight_versions`). The
label changes only while the engine is paused, so the spans are exact; `token_versions` turns
them into one policy version per token. Idle loads leave the label alone (no request can span
them): a label set before a request was admitted means "the version at admission".
"""

from __future__ import annotations

import logging
import os
import re
import socket
import uuid
from typing import TYPE_CHECKING, Any

from rollover.rollout.weights.weight_check import EngineReading, prompt_token_logprobs
from rollover.rollout.weights.weight_sync import NamedTensors, WeightsUntouched, pairs
from rollover.tasks.errors import RolloverError

if TYPE_CHECKING:
    from rollover.rollout.admission import AdmissionGate
    from rollover.rollout.engine import RolloutEngine

log = logging.getLogger(__name__)

# vLLM's engine-side weight label set by keep load number k (1, 2, ...) to policy version v.
_KEEP_LABEL = re.compile(r"rollover-keep-(\d+)-v(-?\d+)")


def keep_label(load: int, version: int) -> str:
    """The label keep load number `load` gives vLLM: unique per load, so every load starts a span."""
    return f"rollover-keep-{load}-v{version}"


def label_version(label: str, admitted_version: int, admitted_loads: int) -> int:
    """Policy version of tokens vLLM labelled `label`, for a request admitted at `admitted_version`
    when `admitted_loads` keep loads had started.

    A label set by a keep load that started after the admission names its own version; any other
    label (vLLM's initial one, or an older keep load's) was in force at admission: no weight load
    can happen between then and a later keep load while the request runs (idle loads need an
    idle engine), so those tokens are of the admission version.
    """
    m = _KEEP_LABEL.fullmatch(label)
    if m is not None and int(m.group(1)) > admitted_loads:
        return int(m.group(2))
    return admitted_version


def token_versions(spans: Any, n_tokens: int, admitted_version: int, admitted_loads: int,
                   loads_now: int) -> list[int]:
    """One policy version per output token of a finished request, from vLLM's weight spans.

    `spans` is the final `CompletionOutput.weight_versions` (None when vLLM reported no label).
    Without spans the admission version is exact only if no keep load started meanwhile; else,
    as for spans that do not tile the output, this raises rather than guess.
    """
    if spans is None:
        if loads_now == admitted_loads:
            return [admitted_version] * n_tokens
        raise RuntimeError("vLLM reported no weight-version spans for a request that ran across "
                           "an in-flight weight load: its per-token versions are unknown")
    versions: list[int] = []
    for span in spans:
        if span.start != len(versions) or span.end < span.start:
            raise RuntimeError(f"vLLM's weight-version spans do not tile the output: {spans}")
        version = label_version(span.version, admitted_version, admitted_loads)
        versions += [version] * (span.end - span.start)
    if len(versions) != n_tokens:
        raise RuntimeError(f"vLLM's weight-version spans cover {len(versions)} tokens, "
                           f"the request has {n_tokens}: {spans}")
    return versions


class EngineBusyError(RolloverError, RuntimeError):
    """Weights cannot be loaded (or the engine put to sleep) while requests are still running."""


class WeightLoadError(RolloverError, RuntimeError):
    """A weight load failed midway: the engine's weights are mixed until the next full load."""


class EngineControl:
    """The moments one `RolloutEngine` stops serving: weight loads, the weight probe, sleep.

    Held by the engine (`engine.control`), whose public methods call it. It works through the
    engine's public surface (`llm`, `settings`, `weight_transport`, `abort`, ...) and its
    admission gate (`engine.gate`, rollout/admission.py), which holds the version it bumps.
    """

    def __init__(self, engine: RolloutEngine) -> None:
        self.engine = engine
        self.gate: AdmissionGate = engine.gate
        self.asleep = False

    @property
    def llm(self) -> Any:
        return self.engine.llm

    def _check_idle(self, what: str) -> None:
        if self.gate.active or self.engine.num_unfinished():
            raise EngineBusyError(
                f"{what} needs an idle engine: {len(self.gate.active)} open streams, "
                f"{self.engine.num_unfinished()} unfinished requests (abort and wait_idle first)"
            )

    async def update_weights(self, named_tensors: NamedTensors, version: int | None = None,
                             keep_requests: bool = False, recompute_kv: bool = False) -> int:
        """Load trainer weights (checkpoint names); bump the policy version; return it.

        `version` sets the version explicitly (e.g. after a checkpoint restore); by default it
        goes up by one. Raises EngineBusyError if the engine is asleep (`wake_up` first) or, by
        default, if requests are still running. Atomic: new requests wait, vLLM's scheduler is
        paused around push, prefix-cache reset and version bump. A transport that fails midway
        leaves the engine refusing requests (WeightLoadError) until a full load.

        `keep_requests=True` loads under running requests: they freeze, keep their KV cache and
        continue under the new weights (no abort); their tokens get exact per-token versions
        (`TokenChunk.versions` on the last chunk). The KV they hold was computed by the old
        weights, and so was every other cached block: vLLM refuses a prefix-cache reset while
        requests hold blocks, so the old blocks stay cached (new requests may hit them) until a
        reset succeeds (every load tries). `recompute_kv=True` drops every KV block instead: the
        frozen requests are preempted and recompute their prompt and tokens under the new weights
        (a prefill of each), so no later token attends to old-weight KV. A keep load that fails
        midway aborts the frozen requests (their tokens so far keep the old version).
        """
        if self.asleep:
            raise EngineBusyError("engine is asleep: await wake_up() before update_weights")
        if recompute_kv and not keep_requests:
            raise ValueError("recompute_kv applies to keep_requests=True loads only")
        self.gate.close("load weights")
        try:
            if not keep_requests:
                self._check_idle("update_weights")
            named_tensors = pairs(named_tensors)
            await self._pause_scheduler(idle=not keep_requests)
            try:
                if keep_requests:
                    await self._load_keeping_requests(named_tensors, version, recompute_kv)
                else:
                    await self._load_idle(named_tensors, version)
            finally:
                await self.llm.resume_generation()
        finally:
            self.gate.open()
        return self.gate.version

    async def _pause_scheduler(self, idle: bool) -> None:
        """vLLM's scheduler paused, running requests frozen (`mode="keep"`), caches kept.

        `AsyncLLM.pause_generation` ends with a fixed 20 ms sleep so that outputs computed before
        the pause reach their streams first (vLLM notes it is not needed for correctness). An
        idle load has no such outputs (`_check_idle` ran), so it asks the engine core directly
        and saves those 20 ms per load (a third of a small model's whole load here).
        """
        core = getattr(self.llm, "engine_core", None)
        pause = getattr(core, "pause_scheduler_async", None)
        if idle and pause is not None:
            await pause(mode="keep", clear_cache=False)
        else:
            await self.llm.pause_generation(mode="keep", clear_cache=False)

    async def _load_idle(self, named_tensors: NamedTensors, version: int | None) -> None:
        """Push, reset the prefix cache, bump the version (paused, no request running)."""
        await self._push(named_tensors)
        await self.reset_prefix_cache()
        self.gate.version = self.gate.version + 1 if version is None else int(version)
        self.gate.broken = None

    async def _load_keeping_requests(self, named_tensors: NamedTensors, version: int | None,
                                     recompute_kv: bool) -> None:
        """Push under frozen requests, label the new weights in vLLM, bump the version (paused).

        The keep-load count goes up first, so a request admitted later never takes this load's
        label for its admission version, even if the load fails after setting it. Any failure
        after the weights may have changed aborts the frozen requests before the resume: they
        must not go on under weights whose version is unknown.
        """
        gate = self.gate
        new_version = gate.version + 1 if version is None else int(version)
        gate.keep_loads += 1
        label = keep_label(gate.keep_loads, new_version)
        try:
            await self._push(named_tensors)
            await self._drop_old_kv(recompute_kv)
            await self.llm.update_weight_version(label)
        except WeightsUntouched:
            raise
        except BaseException as exc:
            gate.broken = gate.broken or (
                f"the in-flight weight load to version {new_version} failed "
                f"({type(exc).__name__}: {exc}); load a full set of weights again")
            await self.engine.abort(self.engine.active_requests)
            raise
        gate.version = new_version
        gate.broken = None

    async def _push(self, named_tensors: NamedTensors) -> None:
        """The transport's push; a failure that may have touched weights marks them broken."""
        try:
            await self.engine.weight_transport.push(self.llm, named_tensors)
        except WeightsUntouched:
            raise
        except BaseException as exc:
            self.gate.broken = (
                f"the weight load to version {self.gate.version + 1} failed midway "
                f"({type(exc).__name__}: {exc}); load a full set of weights again")
            raise

    async def _drop_old_kv(self, recompute_kv: bool) -> None:
        """Keep load: reset the prefix cache, preempting the frozen requests if asked to."""
        if not self.engine.prefix_caching and not recompute_kv:
            return
        if recompute_kv:
            if not await self.llm.reset_prefix_cache(reset_running_requests=True):
                raise RuntimeError("vLLM refused to drop the KV cache of the frozen requests")
        elif not await self.llm.reset_prefix_cache():
            log.debug("prefix cache kept across an in-flight weight load: requests hold KV blocks")

    async def weight_probe(self, token_ids: list[int]) -> list[EngineReading]:
        """What this engine serves now, for `rollout/weights/weight_check.py`: its version and the log-prob
        of each of `token_ids` after its prefix (vLLM's prompt log-probs: raw, temperature 1).

        One request through the admission gate (it waits out a load, and fails on broken weights);
        prompt log-probs never read the prefix cache, so the weights compute every position.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        rid = f"rollover-weight-probe-{uuid.uuid4().hex}"
        version = await self.gate.admit(rid)
        last = None
        try:
            async for out in self.llm.generate(TokensPrompt(prompt_token_ids=list(token_ids)), params, rid):
                last = out
        finally:
            self.gate.release(rid)
        if last is None or last.prompt_logprobs is None:
            raise WeightLoadError("the engine returned no prompt log-probs for the weight probe")
        name = f"pid {os.getpid()} on {socket.gethostname()} (#{id(self.engine) & 0xffff:04x})"
        return [EngineReading(name, version, prompt_token_logprobs(list(token_ids), last.prompt_logprobs))]

    async def reset_prefix_cache(self) -> bool:
        """Drop cached KV blocks. True if reset or nothing to reset; EngineBusyError if vLLM
        refuses (requests still hold blocks)."""
        if not self.engine.prefix_caching:
            return True
        ok = bool(await self.llm.reset_prefix_cache())
        if not ok:
            raise EngineBusyError("prefix cache reset refused: requests still hold KV blocks")
        return ok

    async def sleep(self, level: int = 1) -> None:
        """Free the engine's GPU memory for a colocated trainer (no-op without sleep mode).

        Level 1 offloads the weights to CPU memory and drops the KV cache; level 2 drops the
        weights too (only when a full weight load follows the wake-up). Needs an idle engine;
        new requests wait until `wake_up()`.
        """
        if not self.engine.settings.sleep_mode or self.asleep:
            return
        self.gate.close("sleep")
        try:
            self._check_idle("sleep")
            await self.llm.sleep(level)
        except BaseException:
            self.gate.open()
            raise
        self.asleep = True

    async def wake_up(self) -> None:
        """Take the GPU memory back and serve again (no-op without sleep mode or when awake)."""
        if not self.asleep:
            return
        await self.llm.wake_up()
        self.asleep = False
        self.gate.open()
