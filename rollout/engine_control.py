"""Weight loads and sleep for `RolloutEngine`: the moments the engine stops serving.

Both close the engine's admission gate (new requests wait, so each is stamped with the version
that really serves it) and need an idle engine. A weight load pauses vLLM's scheduler around
push, prefix-cache reset and version bump; sleep (CUDA only) frees the engine's GPU memory for
a colocated trainer until `wake_up`.
"""

from __future__ import annotations

from rollover.rollout.weight_sync import NamedTensors, WeightsUntouched


class EngineBusyError(RuntimeError):
    """Weights cannot be loaded (or the engine put to sleep) while requests are still running."""


class WeightLoadError(RuntimeError):
    """A weight load failed midway: the engine's weights are mixed until the next full load."""


class EngineControl:
    """Mixin of RolloutEngine (uses its llm, settings, gate, request and version state)."""

    def _close_gate(self, why: str) -> None:
        if not self._serving.is_set():
            raise EngineBusyError(f"engine is not serving ({self._why_closed}): cannot {why}")
        self._serving.clear()
        self._why_closed = why

    def _open_gate(self) -> None:
        self._why_closed = ""
        self._serving.set()

    def _check_idle(self, what: str) -> None:
        if self._active or self.num_unfinished():
            raise EngineBusyError(
                f"{what} needs an idle engine: {len(self._active)} open streams, "
                f"{self.num_unfinished()} unfinished requests (abort and wait_idle first)"
            )

    async def update_weights(self, named_tensors: NamedTensors, version: int | None = None) -> int:
        """Load trainer weights (checkpoint names) into the idle engine; bump the policy version.

        `version` sets the version explicitly (e.g. after a checkpoint restore); by default it
        goes up by one. Raises EngineBusyError if requests are still running or the engine is
        asleep (`wake_up` first). Returns the new version. Atomic: new requests wait, vLLM's
        scheduler is paused around push, prefix-cache reset and version bump. A transport that
        fails midway leaves the engine refusing requests (WeightLoadError) until a full load.
        """
        if self._asleep:
            raise EngineBusyError("engine is asleep: await wake_up() before update_weights")
        self._close_gate("load weights")
        try:
            self._check_idle("update_weights")
            if hasattr(named_tensors, "items"):
                named_tensors = named_tensors.items()  # type: ignore[assignment]
            await self.llm.pause_generation(mode="keep", clear_cache=False)
            try:
                try:
                    await self.weight_transport.push(self.llm, named_tensors)
                except WeightsUntouched:
                    raise
                except BaseException as exc:
                    self._weights_broken = (
                        f"the weight load to version {self.policy_version + 1} failed midway "
                        f"({type(exc).__name__}: {exc}); load a full set of weights again")
                    raise
                await self._reset_prefix_cache()
                self.policy_version = self.policy_version + 1 if version is None else int(version)
                self._weights_broken = None
            finally:
                await self.llm.resume_generation()
        finally:
            self._open_gate()
        return self.policy_version

    async def reset_prefix_cache(self) -> bool:
        """Drop cached KV blocks. True if reset or nothing to reset."""
        return await self._reset_prefix_cache()

    async def _reset_prefix_cache(self) -> bool:
        if not self._prefix_caching:
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
        if not self.settings.sleep_mode or self._asleep:
            return
        self._close_gate("sleep")
        try:
            self._check_idle("sleep")
            await self.llm.sleep(level)
        except BaseException:
            self._open_gate()
            raise
        self._asleep = True

    async def wake_up(self) -> None:
        """Take the GPU memory back and serve again (no-op without sleep mode or when awake)."""
        if not self._asleep:
            return
        await self.llm.wake_up()
        self._asleep = False
        self._open_gate()
