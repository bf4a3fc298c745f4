"""The engine's side of a hot swap: load a version beside the serving one, switch between two steps.

(`flywheel.policy.swap` decides *what* to load, from the updates topic; this decides *how*.)
The caller's thread loads the new version while the scheduler thread keeps decoding; the
scheduler then switches at the start of its next step (`switch_if_pending`), so each sequence
runs all its steps on one version. The answers in flight at the switch finish on the weights
they started with (swap_policy finish_on_old: two copies of the weights until they leave, in one
shared forward where the two versions allow it, `flywheel.policy.mixed`) or restart from their
prompt on the new ones (reprefill). A next load waits for that drain, so there are never more
than two copies.
"""

from __future__ import annotations

import atexit
import dataclasses
import gc
import logging
import threading
import time
from collections.abc import Callable

from flywheel.core import errors
from flywheel.policy.chores import BetweenSteps
from flywheel.policy.config import EngineConfig
from flywheel.policy.kvbatch import LoadedModel, load_model
from flywheel.policy.lora import AdapterMix, LoraAdapter
from flywheel.policy.metrics import METRICS
from flywheel.policy.mixed import DrainForward, MixedForward
from flywheel.policy.reload import MappedWeights, try_reload
from flywheel.policy.running import RunningBatches
from flywheel.policy.scheduler import Scheduler

log = logging.getLogger(__name__)

_startup_frozen = False


def _freeze_startup_objects() -> None:
    """Move what exists after the first load (torch, transformers, the model: ~500k objects) out of
    the garbage collector's reach. A full collection walks every tracked object with the GIL held,
    0.3-0.5 s on a small CPU, and the allocations of a hot swap were what triggered one. Frozen
    objects are still freed by reference counting (a swapped-out model is: see the tests).

    They are unfrozen again at exit: the interpreter's last collection skips frozen objects, so
    the cycles among them would outlive it, and triton's nanobind extension (imported by torch
    via transformers) would report hundreds of "leaked" objects at every exit."""
    global _startup_frozen
    if not _startup_frozen:
        _startup_frozen = True
        gc.collect()
        gc.freeze()
        atexit.register(gc.unfreeze)


class HotSwap:
    """Loads versions for the engine and switches its running batches to them.

    `lock`: the engine's condition, which also guards `scheduler` (a pending switch wakes the
    scheduler thread); `batches`: the engine's running batches, which the switch changes;
    `between_steps`: runs the Python-heavy parts of a load in the scheduler thread.
    """

    def __init__(
        self,
        config: EngineConfig,
        lock: threading.Condition,
        scheduler: Scheduler,
        batches: RunningBatches,
        between_steps: BetweenSteps,
    ) -> None:
        self.config = config
        self._lock = lock
        self._scheduler = scheduler
        self._batches = batches
        self._between_steps = between_steps
        # What the scheduler switches to at its next step; guarded by _lock.
        self._pending: LoadedModel | None = None
        self._pending_mix: DrainForward | None = None  # the old and pending versions' shared forward
        self._on_switch: Callable[[], None] | None = None
        self._switched = threading.Event()
        self._loading = threading.Lock()  # one load at a time
        self.last_error = ""

    @property
    def pending(self) -> bool:
        """A loaded version waits for the switch (read under the lock)."""
        return self._pending is not None

    # ------------------------------------------------------------------ the loader's thread
    def load(
        self,
        path: str,
        version: int,
        on_switch: Callable[[], None] | None = None,
        verify: Callable[[], object] | None = None,
        weights: MappedWeights | None = None,
    ) -> None:
        """`Engine.load_version` (which see): load in the caller's thread, return once switched."""
        with self._loading:
            cur = self._batches.serving
            if cur is not None and cur.version == version and cur.source == str(path):
                return
            self._wait_for_drain()  # at most two copies of the weights: old + new
            t0 = time.perf_counter()
            if cur is not None and cur.base is not None and cur.on_base(version, str(path)):
                if verify is not None:  # back from an adapter to its base, which is in memory
                    verify()
                mix = AdapterMix(cur, cur.base) if self.config.mixed_drain else None
                self._switch_to(cur, cur.base, mix, on_switch, t0)
                return
            loaded = cur and try_reload(
                cur.base or cur, str(path), version, between_steps=self._between_steps, weights=weights
            )  # None on any error; from an adapter version, a copy of its base's tree
            reloaded = loaded is not None
            if verify is not None:
                verify()  # what it raises goes to the caller (who reports it); nothing has switched
            try:
                loaded = loaded or load_model(str(path), version, self.config)
            except Exception as e:  # noqa: BLE001 - any failure to load is a refused checkpoint
                raise self._refused(path, version, cur, e) from e
            self._switch_to(cur, loaded, self._mixed_forward(cur, loaded, reloaded), on_switch, t0)

    def load_adapter(
        self,
        path: str,
        version: int,
        base: Callable[[], tuple[str, int]],
        on_switch: Callable[[], None] | None = None,
    ) -> None:
        """`Engine.load_adapter` (which see): the adapter's deltas on the serving module tree, switched
        to like any version; its drain shares one forward with the previous version (`lora.AdapterMix`)."""
        with self._loading:
            cur = self._batches.serving
            if cur is not None and cur.version == version and cur.source == str(path):
                return
            self._wait_for_drain()
            t0 = time.perf_counter()
            try:
                if cur is None:
                    base_path, base_version = base()
                    under = load_model(base_path, base_version, self.config)
                else:
                    under = cur.base or cur  # the whole weights in memory
                loaded = self._on_base(under, path, version)
            except Exception as e:  # noqa: BLE001 - any failure to load is a refused version
                raise self._refused(path, version, cur, e) from e
            mix = AdapterMix(cur, loaded) if cur is not None and self.config.mixed_drain else None
            self._switch_to(cur, loaded, mix, on_switch, t0)

    def variant(self, path: str, version: int) -> LoadedModel:
        """`Engine.adapter_variant` (which see)."""
        cur = self._batches.serving
        if cur is None:
            raise errors.Unavailable("the policy model is not loaded yet: retry shortly", retry_after_s=1.0)
        try:
            return self._on_base(cur.base or cur, path, version)
        except Exception as e:  # noqa: BLE001 - reported like a refused version, nothing switched
            raise errors.FailedPrecondition(
                f"could not load adapter version {version} from {path!r} ({type(e).__name__}: {e})"
            ) from e

    def _on_base(self, under: LoadedModel, path: str, version: int) -> LoadedModel:
        """The adapter at `path` on whole weights `under` (their module tree, shared); `LoraAdapter.load`
        checks that its matrices are finite."""
        adapter = LoraAdapter.load(path, under.model, under.device, under.dtype)
        return dataclasses.replace(under, source=str(path), version=version, adapter=adapter, base=under)

    def _refused(self, path: str, version: int, cur: LoadedModel | None, e: Exception) -> errors.FlywheelError:
        self.last_error = f"version {version} from {path}: {type(e).__name__}: {e}"
        METRICS.swaps.labels("failed").inc()  # after the error is readable: watchers poll the count
        log.error("hot swap refused: %s", self.last_error)
        return errors.FailedPrecondition(
            f"could not load policy version {version} from {path!r} ({type(e).__name__}: {e}); "
            f"still serving version {cur.version if cur else None}"
        )

    def _switch_to(
        self,
        cur: LoadedModel | None,
        loaded: LoadedModel,
        mix: DrainForward | None,
        on_switch: Callable[[], None] | None,
        t0: float,
    ) -> None:
        """Hand `loaded` to the scheduler thread and return once it switched."""
        self._switched.clear()
        with self._lock:
            self._pending, self._pending_mix, self._on_switch = loaded, mix, on_switch
            self._lock.notify_all()
        while not self._switched.wait(0.05):
            if not self._between_steps.scheduler_alive:
                self.switch_if_pending()  # no scheduler (not started or stopped): nothing runs, switch here
        if cur is None:
            _freeze_startup_objects()
        METRICS.swaps.labels("ok").inc()
        METRICS.swap_seconds.observe(time.perf_counter() - t0)
        METRICS.version.set(loaded.version)
        log.info("serving policy version %s from %s", loaded.version, loaded.source)

    def _mixed_forward(self, cur: LoadedModel | None, new: LoadedModel, reloaded: bool) -> MixedForward | None:
        """One forward for both versions during the drain, if they can share one (`flywheel.policy.mixed`).
        `reloaded`: new is a copy of cur's module tree with other weights (`flywheel.policy.reload`).
        Not from an adapter version: the twin modules would run its rows without its deltas."""
        if cur is None or not self.config.mixed_drain or cur.adapter is not None:
            return None
        mix = MixedForward.pair(cur, new, same_tree=reloaded)
        if mix is None:
            log.info(
                "version %s drains with one forward per version: it cannot share one with %s", new.version, cur.version
            )
        return mix

    def _wait_for_drain(self) -> None:
        deadline = time.monotonic() + self.config.swap_drain_timeout_s
        while self._batches.draining:
            if time.monotonic() > deadline:
                raise errors.Unavailable("the previous swap is still draining: announce the version again later")
            time.sleep(0.01)

    # ------------------------------------------------------------------ the scheduler's thread
    def switch_if_pending(self) -> None:
        """Switch to the loaded version, if one waits. Runs between steps, so each sequence has one
        version for all its steps."""
        with self._lock:
            new, self._pending = self._pending, None
            mix, self._pending_mix = self._pending_mix, None
            on_switch, self._on_switch = self._on_switch, None
        if new is None:
            return
        self.last_error = ""
        if on_switch is not None:
            on_switch()
        batches = self._batches
        old, batches.serving = batches.serving, new
        if old is not None and self.config.swap_policy == "reprefill" and id(old) in batches.by_model:
            # Restart every answer whose tokens no caller has seen from its prompt on the new
            # weights, so its result reports the new version for all its tokens. A stream that
            # already sent tokens cannot take them back: it finishes on the old weights.
            batch = batches.by_model[id(old)]
            restart = [s for s in batch.seqs if not (s.stream and s.generated)]
            batch.filter([s for s in batch.seqs if s not in restart])
            for s in restart:
                s.reset()
                s.model = None
            with self._lock:
                self._scheduler.requeue(restart)  # keep their place ahead of newer requests
        if mix is not None and id(old) in batches.by_model and batches.by_model[id(old)].seqs:
            batch = batches.by_model.pop(id(old))  # its answers finish on old's weights, in new's forwards
            batch.adopt(mix)
            batches.by_model[id(new)] = batch
        batches.drop_empty()
        self._switched.set()
