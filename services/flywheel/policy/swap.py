"""Hot swap: flywheel.policy.updates -> verify (signature, uri, sha256 per file) -> Engine.load_version.

Never on the serving path: hashing and loading take as long as they take while the engine keeps
decoding on the current weights; the engine then switches between two decode steps, and only if
every file's sha256 matched. By default the consumer, the hashing and the reading run in the swap
worker's process (`flywheel.policy.swap_worker`: it hashes the weights while it copies them into
shared memory, which becomes the new parameters); with `swap_worker` off, or where there is no
memfd, they run in threads of this process (the hashing, in a thread of its own and one more per
big shard, overlapping the reading of new weights into a copy). A checkpoint that fails verification or loading is refused
and reported (log, the counter flywheel_policy_swaps_total{outcome="refused"|"failed"},
`last_error` -> GetInfo.last_swap_error and /health/details) while the current version keeps
serving. An announcement that is unsigned or signed by a key not trusted here (where signatures
are required, `ModelStoreConfig.require_signed`), whose signature does not match, or whose
`file://` uri leads outside the store's root is refused the same way before a byte is read, and
counted by reason (flywheel_policy_updates_refused_total{reason}, with the checkpoints that fail
their sha256 or do not load). An adapter version (ModelUpdate.adapter) is applied only onto the
base this replica serves (else refused, reason wrong_base), unmerged on the weights already in
memory (`Engine.load_adapter`, `flywheel.policy.lora`): only its own files are read and hashed.
The announced version is applied whatever its number: an older one is a rollback. Each
live switch observes its lag from the announcement record's timestamp
(flywheel_policy_swap_lag_seconds: delivery, verify, load).

The worker process, or the verifying and loading threads, run at a lower CPU priority
(`EngineConfig.swap_nice`; RocksDB lowers its compaction threads' priority the same way): on a
busy machine a swap's sha256 and copies took the core from the decode thread, and the answers in
flight then ran 1.2-1.6x slower.

Start-up: the updates topic is compacted with one partition, so its last record for our
model names the version to serve. `initial_target` reads up to the end offset once, and the
consumer then starts from that offset, so history is never replayed version by version.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kafka import KafkaConsumer, TopicPartition
from prometheus_client import Counter

from flywheel.core import bus, errors, modelstore
from flywheel.core.config import KafkaConfig
from flywheel.core.modelstore import BaseRef, ModelStore
from flywheel.policy.engine import Engine
from flywheel.policy.kvbatch import LoadedModel
from flywheel.policy.metrics import METRICS
from flywheel.policy.reload import MappedWeights, map_safetensors
from flywheel.policy.swap_worker import Snapshot, SwapWorker, WorkerSettings, refusal_reason
from flywheel.v1 import events_pb2

log = logging.getLogger(__name__)
UPDATES_REFUSED = Counter(
    "flywheel_policy_updates_refused",
    "Model announcements refused while the serving version went on, by reason: unsigned, unknown_key, "
    "bad_signature, outside_store, bad_uri, tampered (files), missing, unreadable, load_failed, invalid, "
    "wrong_base (an adapter for another base than the one served).",
    ["reason"],
)


def lower_cpu_priority(nice: int) -> None:
    """Add `nice` to the calling thread's niceness (Linux, where it is per thread and the threads it
    starts inherit it; elsewhere setpriority would lower the whole process, so nothing happens)."""
    if nice <= 0 or sys.platform != "linux":
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError as e:  # e.g. a sandbox that forbids it: swaps still work, at equal priority
        log.warning("could not lower the swap threads' CPU priority: %s", e)


class Swapper:
    """Applies ModelUpdate announcements of `model` to `engine`."""

    def __init__(self, engine: Engine, store: ModelStore, kafka: KafkaConfig, topic: str, model: str, group: str):
        self.engine, self.store, self.kafka, self.topic, self.model = engine, store, kafka, topic, model
        self.group = f"{group}-{uuid.uuid4().hex[:8]}"  # every replica sees every announcement
        self.last_error = ""
        self.last_swap_s: float | None = None
        self._start_offsets: dict[int, int] = {}
        self._consumer: bus.Consumer | None = None
        self._worker: SwapWorker | None = None
        self._nice = engine.config.swap_nice
        self._verifier = ThreadPoolExecutor(1, "swap-verify", initializer=lower_cpu_priority, initargs=(self._nice,))
        self._loader_niced = False

    # ------------------------------------------------------------------ start-up
    def initial_target(self, timeout_s: float = 10.0) -> events_pb2.ModelUpdate | None:
        """The last announcement of our model on the topic (None if there is none); remembers the end offsets."""
        c = KafkaConsumer(**self.kafka.client_options(), group_id=None, enable_auto_commit=False)
        try:
            parts = c.partitions_for_topic(self.topic) or set()
            tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
            if not tps:
                return None
            c.assign(tps)
            ends = c.end_offsets(tps)
            self._start_offsets = {tp.partition: ends[tp] for tp in tps}
            c.seek_to_beginning(*tps)
            last: events_pb2.ModelUpdate | None = None
            deadline = time.monotonic() + timeout_s
            while any(c.position(tp) < ends[tp] for tp in tps) and time.monotonic() < deadline:
                for recs in c.poll(timeout_ms=200).values():
                    for r in recs:
                        if r.offset >= ends[TopicPartition(r.topic, r.partition)] or r.value is None:
                            continue
                        try:
                            u = events_pb2.ModelUpdate.FromString(r.value)
                        except Exception:  # noqa: BLE001 - garbage on the topic is not an announcement
                            continue
                        if u.model == self.model:
                            last = u
            return last
        finally:
            c.close()

    def start(self) -> None:
        """Consume announcements made after `initial_target` looked (call that first): in the swap
        worker's process (`flywheel.policy.swap_worker`), or in a thread of this one."""
        cfg = self.engine.config
        if cfg.swap_worker and hasattr(os, "memfd_create"):
            settings = WorkerSettings(
                dataclasses.asdict(self.kafka),
                self.topic,
                self.model,
                self.group,
                str(self.store.root),
                self._start_offsets,
                cfg.update_fetch_wait_ms,
                self._nice,
                self.store.verifier.settings(),
            )
            self._worker = SwapWorker(
                settings, self._apply_snapshot, lambda u, why, reason: self._refuse(u, why, "refused", reason)
            )
            self._worker.start(thread_init=lambda: lower_cpu_priority(self._nice))  # its thread loads
            return
        self._consumer = bus.Consumer(
            self.kafka,
            self.group,
            {self.topic: events_pb2.ModelUpdate},
            self._on_record,
            dlq_topic=None,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=self.engine.config.update_fetch_wait_ms,
        )
        self._consumer.start()

    @property
    def worker(self) -> SwapWorker | None:
        """The swap worker, where announcements are consumed in its process (after `start`)."""
        return self._worker

    @property
    def consumer(self) -> bus.Consumer | None:
        """The consumer of announcements, where it runs in a thread of this process (after `start`)."""
        return self._consumer

    @property
    def error(self) -> BaseException | None:
        """What ended the in-thread consumer's loop (the worker process is restarted when it dies)."""
        return self._consumer.error if self._consumer is not None else None

    def stop(self) -> None:
        if self._worker is not None:
            self._worker.stop()
        if self._consumer is not None:
            self._consumer.stop()
        self._verifier.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ one announcement
    def _on_record(self, record: bus.Record) -> None:
        if record.offset < self._start_offsets.get(record.partition, 0):
            return  # seen by initial_target
        if not self._loader_niced:  # the consumer's own thread loads; it does nothing else
            lower_cpu_priority(self._nice)
            self._loader_niced = True
        self.apply(record.value, announced_at=record.timestamp_s)

    def _apply_snapshot(
        self, u: events_pb2.ModelUpdate, path: Path, announced_at: float | None, snap: Snapshot
    ) -> bool:
        """Load what the swap worker verified and read: its memfds, mapped without a copy."""
        try:
            weights = map_safetensors(snap)
        except Exception as e:  # noqa: BLE001 - verified, yet not a safetensors file we can read
            return self._refuse(u, f"checkpoint unreadable: {type(e).__name__}: {e}", "refused", "unreadable")
        return self.apply(u, announced_at, verified=(path, weights))

    def apply(
        self,
        u: events_pb2.ModelUpdate,
        announced_at: float | None = None,
        verified: tuple[Path, MappedWeights] | None = None,
    ) -> bool:
        """Verify and load one announcement (blocking). True if the engine now serves it.
        `announced_at` (epoch seconds, the record's timestamp): the switch observes the swap lag.
        `verified`: the checkpoint's path and weights, as the swap worker verified and read them."""
        if u.model != self.model:
            return False
        current = self.engine.info().version
        if current == u.version and not self.last_error:
            return True  # at-least-once delivery: the same announcement again changes nothing
        kind = "rollback" if current is not None and u.version < current else "update"
        t0 = time.perf_counter()
        try:  # the signature and the uri (the worker checked them already)
            path: Path = verified[0] if verified else self.store.locate(u)
        except errors.FlywheelError as e:  # e.g. unsigned, or the store has no such version
            return self._refuse(u, f"checkpoint failed verification: {e.message}", "refused", refusal_reason(e))
        on_switch = lambda: self._switched(announced_at)  # noqa: E731
        hashing = None
        if u.adapter:  # onto the base this replica serves, or refused (it keeps serving)
            base = modelstore.update_base(u)
            assert base is not None
            try:
                self._check_base(u.version, base)
                if verified is None:  # its few files, before anything loads
                    modelstore.verify_digests(path, u.files)
            except errors.FlywheelError as e:
                why = e.message if e.reason == "wrong_base" else f"checkpoint failed verification: {e.message}"
                return self._refuse(u, why, "refused", refusal_reason(e))

            def load() -> None:
                self.engine.load_adapter(str(path), u.version, lambda: self._base_path(base), on_switch)

        else:
            # sha256 of every file against the announcement, in other threads while the engine reads
            # the new weights into a copy; nothing switches unless it passes. Back from an adapter to its
            # base, nothing is read: the weights in memory were verified when they were loaded.
            cur = self.engine.serving_model
            in_memory = cur is not None and cur.on_base(u.version, str(path))
            if verified is None and not in_memory:
                hashing = self._verifier.submit(modelstore.verify_digests, path, u.files)

            def load() -> None:
                self.engine.load_version(
                    str(path),
                    u.version,
                    on_switch=on_switch,
                    verify=hashing.result if hashing else None,
                    weights=verified[1] if verified else None,
                )

        try:  # the error clears at the switch itself, so no answer of the new version sees it
            load()
            if hashing:
                hashing.result()  # also when the engine had nothing to load (it serves this version already)
        except errors.IntegrityError as e:
            return self._refuse(u, f"checkpoint failed verification: {e.message}", "refused", refusal_reason(e))
        except errors.FlywheelError as e:  # the engine counted it (outcome="failed"), or it is still draining
            return self._refuse(u, e.message, None, "load_failed" if isinstance(e, errors.FailedPrecondition) else None)
        except Exception as e:  # noqa: BLE001 - an unreadable store is a refusal too, never a crash
            return self._refuse(u, f"checkpoint unreadable: {type(e).__name__}: {e}", "refused", "unreadable")
        self.last_error = ""  # also when it was already serving this version (no switch)
        self.last_swap_s = time.perf_counter() - t0
        log.info("policy %s to version %d (%s) in %.2fs", kind, u.version, u.reason or "-", self.last_swap_s)
        return True

    # ------------------------------------------------------------------ adapter versions
    def serving_base(self) -> BaseRef | None:
        """The whole-weights version under what the engine serves: that version itself, or the base of
        the adapter version it serves; None when it came from outside the store (e.g. a hub name)."""
        cur = self.engine.serving_model
        if cur is None:
            return None
        try:
            m = self.store.get(self.model, cur.version)
        except errors.FlywheelError:
            return None
        here = Path(cur.source).resolve() == self.store.version_path(self.model, cur.version).resolve()
        if not here:
            return None
        return m.base if cur.adapter is not None else BaseRef.of(m) if m.base is None else None

    def _check_base(self, version: int, want: BaseRef) -> None:
        have = self.serving_base()
        if self.engine.serving_model is not None and want != have:
            raise errors.FailedPrecondition(
                f"adapter version {version} applies to base {want}, but this replica serves "
                f"{have if have is not None else 'weights from outside the model store'}: announce a full version "
                "or an adapter trained on the serving base",
                reason="wrong_base",
            )

    def _base_path(self, base: BaseRef) -> tuple[str, int]:
        """Where the store holds `base`, verified to be those very weights: for an engine that serves
        nothing yet (start-up, a GeneratePair candidate), which loads the base before the adapter."""
        path = self.store.verify(base.model, base.version)
        if BaseRef.of(self.store.get(base.model, base.version)) != base:
            raise errors.IntegrityError(
                f"the store's {base.model} v{base.version} holds other weights than base {base}", reason="tampered"
            )
        return str(path), base.version

    def load_into(self, engine: Engine, version: int) -> None:
        """Load store `version` of our model into `engine` (this replica's, or a GeneratePair candidate's),
        verified against its (signed) manifest: whole weights, or an adapter version on its base, which must
        be the base this replica serves (else FailedPrecondition, reason wrong_base, naming both; any base of
        the store while nothing serves yet). Raises what the load raises."""
        m = self.store.get(self.model, version)
        if m.base is not None:  # before any file is hashed: the precise refusal comes first
            self._check_base(version, m.base)
        path = self.store.verify(self.model, version)
        if m.base is None:
            engine.load_version(str(path), version)
        else:
            base = m.base
            engine.load_adapter(str(path), version, lambda: self._base_path(base))

    def variant(self, version: int) -> LoadedModel | None:
        """Adapter `version` of the store on the weights this replica serves, for requests pinned to it
        (`Engine.adapter_variant`: a GeneratePair candidate without a second engine), verified and under
        the rule of `load_into`; None for a whole-weights version."""
        m = self.store.get(self.model, version)
        if m.base is None:
            return None
        self._check_base(version, m.base)
        return self.engine.adapter_variant(str(self.store.verify(self.model, version)), version)

    def load_from_store(self, version: int) -> None:
        """Serve store `version` (start-up without an announcement): `load_into` this replica's engine."""
        self.load_into(self.engine, version)

    def _switched(self, announced_at: float | None) -> None:
        self.last_error = ""
        if announced_at is not None:  # a live announcement, not the start-up's catch-up
            METRICS.swap_lag.observe(max(0.0, time.time() - announced_at))

    def _refuse(self, u: events_pb2.ModelUpdate, why: str, outcome: str | None, reason: str | None = None) -> bool:
        serving = self.engine.info().version
        self.last_error = f"version {u.version} refused: {why}; still serving version {serving}"
        if outcome:  # counted once the error is readable: a watcher that sees the count reads the error
            METRICS.swaps.labels(outcome).inc()
        if reason:
            UPDATES_REFUSED.labels(reason).inc()
        log.error("hot swap %s", self.last_error)
        return False
