"""The trainer's single-active-replica rule on a coordination.k8s.io/v1 Lease.

Same algorithm as client-go's leaderelection (tools/leaderelection/leaderelection.go):
  * get the Lease; if it does not exist, create it naming ourselves (a 409 means another
    candidate created it first: we lost this round);
  * if another holder's record has not changed for leaseDurationSeconds *as measured by our
    own monotonic clock since we first saw that record*, it has expired and may be taken;
    we never compare our wall clock to the holder's renewTime, so clock skew cannot steal
    a live lease;
  * every write is a PUT carrying the resourceVersion we read: if anyone wrote in between,
    the API server answers 409 Conflict and we lost the round (optimistic concurrency);
  * a leader that has not renewed within renewDeadline stops leading; on a clean stop the
    leader releases (holder cleared, duration 1 s) so a standby takes over at once.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import ClassVar

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from flywheel.core.config import load_section, setting

log = logging.getLogger("flywheel.lease")


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def micro_time(t: dt.datetime | None) -> dt.datetime | None:
    """A timestamp the API server accepts as MicroTime.

    The client sends `datetime.isoformat()`, which drops the fraction when microseconds are
    0, and Go's time.Parse with RFC3339Micro refuses a MicroTime without its 6 digits; so
    such a value moves by 1 µs.
    """
    if t is None:
        return None
    t = t.astimezone(dt.UTC)
    return t.replace(microsecond=1) if t.microsecond == 0 else t


@dataclasses.dataclass(frozen=True)
class LeaseRecord:
    """The parts of a Lease that decide who leads (client-go's LeaderElectionRecord)."""

    holder: str | None
    duration_s: int
    acquire_time: dt.datetime | None
    renew_time: dt.datetime | None
    transitions: int


def _record(lease: client.V1Lease) -> LeaseRecord:
    spec = lease.spec or client.V1LeaseSpec()
    return LeaseRecord(
        holder=spec.holder_identity or None,
        duration_s=spec.lease_duration_seconds or 0,
        acquire_time=spec.acquire_time,
        renew_time=spec.renew_time,
        transitions=spec.lease_transitions or 0,
    )


class LeaseLock:
    """One candidate's view of one Lease: `try_acquire_or_renew()` once per retry period."""

    def __init__(
        self,
        api: client.CoordinationV1Api,
        namespace: str,
        name: str,
        identity: str,
        duration_s: int = 15,
        monotonic: Callable[[], float] = time.monotonic,
        now: Callable[[], dt.datetime] = _utcnow,
    ) -> None:
        if not identity:
            raise ValueError("a lease candidate needs a non-empty identity (the pod name)")
        self.api, self.namespace, self.name, self.identity = api, namespace, name, identity
        self.duration_s = duration_s
        self._monotonic, self._now = monotonic, now
        self._observed: LeaseRecord | None = None
        self._observed_at = 0.0

    def _observe(self, record: LeaseRecord) -> None:
        if record != self._observed:
            self._observed, self._observed_at = record, self._monotonic()

    @staticmethod
    def _replacement(lease: client.V1Lease) -> tuple[client.V1Lease, client.V1LeaseSpec]:
        """A copy of `lease` to PUT back, and its spec to change.

        Its metadata.resourceVersion is still the one we read: a PUT after someone else's
        write is refused with 409.
        """
        body = lease.model_copy(deep=True)
        body.spec = body.spec or client.V1LeaseSpec()
        return body, body.spec

    def get(self) -> client.V1Lease | None:
        """The Lease, or None when it does not exist."""
        try:
            return self.api.read_namespaced_lease(self.name, self.namespace, _request_timeout=10)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def try_acquire_or_renew(self) -> bool:
        """True when we hold the lease after this call; False when someone else does or we lost a race."""
        stamp = micro_time(self._now())
        lease = self.get()
        if lease is None:
            new = client.V1Lease(
                api_version="coordination.k8s.io/v1",
                kind="Lease",
                metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
                spec=client.V1LeaseSpec(
                    holder_identity=self.identity,
                    lease_duration_seconds=self.duration_s,
                    acquire_time=stamp,
                    renew_time=stamp,
                    lease_transitions=0,
                ),
            )
            try:
                created = self.api.create_namespaced_lease(self.namespace, new, _request_timeout=10)
            except ApiException as e:
                if e.status == 409:  # another candidate created it between our GET and POST
                    log.info("lease %s: created by another candidate first", self.name)
                    return False
                raise
            self._observe(_record(created))
            return True

        record = _record(lease)
        self._observe(record)
        mine = record.holder == self.identity
        expired = self._monotonic() >= self._observed_at + record.duration_s
        if record.holder and not mine and not expired:
            return False

        body, spec = self._replacement(lease)
        spec.holder_identity = self.identity
        spec.lease_duration_seconds = self.duration_s
        spec.renew_time = stamp
        spec.acquire_time = stamp if not mine else micro_time(record.acquire_time)
        spec.lease_transitions = record.transitions + (0 if mine else 1)
        try:
            updated = self.api.replace_namespaced_lease(self.name, self.namespace, body, _request_timeout=10)
        except ApiException as e:
            if e.status == 409:
                log.info("lease %s: changed since we read it (409); not leading this round", self.name)
                return False
            raise
        if not mine:
            log.info("lease %s: %s now holds it (previous: %s)", self.name, self.identity, record.holder)
        self._observe(_record(updated))
        return True

    def release(self) -> bool:
        """Give the lease up if we hold it, so a standby need not wait for it to expire."""
        lease = self.get()
        if lease is None or lease.spec is None or lease.spec.holder_identity != self.identity:
            return False
        stamp = micro_time(self._now())
        body, spec = self._replacement(lease)
        spec.holder_identity = None
        spec.lease_duration_seconds = 1
        spec.acquire_time = spec.renew_time = stamp
        try:
            self.api.replace_namespaced_lease(self.name, self.namespace, body, _request_timeout=10)
        except ApiException as e:
            if e.status == 409:
                return False
            raise
        return True


@dataclasses.dataclass
class LeaseConfig:
    """Leader election of trainer replicas on a Kubernetes Lease (the chart sets these)."""

    SECTION: ClassVar[str] = "trainer_lease"

    name: str = setting("", "Name of the Lease the trainer replicas compete for (empty: no election, always active).")
    namespace: str = setting("default", "Namespace of the Lease (the pod's own).", alias="FLYWHEEL_POD_NAMESPACE")
    identity: str = setting("", "This candidate's name in the Lease (empty: the host name).", alias="FLYWHEEL_POD_NAME")
    duration_s: int = setting(15, "A holder that has not renewed for this long may be replaced.")
    renew_deadline_s: float = setting(10.0, "A leader that could not renew for this long stops leading.")
    retry_period_s: float = setting(2.0, "Time between two tries to acquire or renew.")

    def election(self) -> ElectionConfig | None:
        """The elector's settings, or None when no Lease is named."""
        if not self.name:
            return None
        identity = self.identity or socket.gethostname()
        return ElectionConfig(
            self.name, self.namespace, identity, self.duration_s, self.renew_deadline_s, self.retry_period_s
        )


@dataclasses.dataclass
class ElectionConfig:
    """Timings as client-go names them; defaults match the chart's values."""

    lease_name: str
    namespace: str
    identity: str
    duration_s: int = 15
    renew_deadline_s: float = 10.0
    retry_period_s: float = 2.0

    def __post_init__(self) -> None:
        if not (self.duration_s > self.renew_deadline_s > self.retry_period_s > 0):
            raise ValueError(
                f"lease timings must satisfy duration ({self.duration_s}) > renew deadline "
                f"({self.renew_deadline_s}) > retry period ({self.retry_period_s}) > 0"
            )

    @classmethod
    def from_env(cls) -> ElectionConfig | None:
        """From LeaseConfig (the chart's FLYWHEEL_TRAINER_LEASE_* variables); None if no Lease is named."""
        return load_section(LeaseConfig).election()


class LeaderElector:
    """Runs the lease loop in a thread and calls `on_change(leading)` on every transition.

    The trainer trains only while leading and reports state "standby" otherwise.
    """

    def __init__(self, lock: LeaseLock, cfg: ElectionConfig, on_change: Callable[[bool], None]) -> None:
        self.lock, self.cfg, self.on_change = lock, cfg, on_change
        self.leading = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def step(self, last_renew: float) -> float:
        """One round; returns the monotonic time of the last successful renewal."""
        try:
            ok = self.lock.try_acquire_or_renew()
        except Exception as e:  # API unreachable: keep leading only until the renew deadline
            log.warning("lease %s: %s", self.cfg.lease_name, e)
            ok = False
        now = time.monotonic()
        if ok:
            last_renew = now
        held = ok or (self.leading and now - last_renew < self.cfg.renew_deadline_s)
        if held != self.leading:
            self.leading = held
            self.on_change(held)
        return last_renew

    def _run(self) -> None:
        last_renew = 0.0
        while not self._stop.is_set():
            last_renew = self.step(last_renew)
            self._stop.wait(self.cfg.retry_period_s)
        if self.leading:
            try:
                self.lock.release()
            except Exception as e:
                log.warning("lease %s: release failed: %s", self.cfg.lease_name, e)
            self.leading = False
            self.on_change(False)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="flywheel-lease", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop campaigning and release the lease if held."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)


def elector_from_env(on_change: Callable[[bool], None], api: client.ApiClient | None = None) -> LeaderElector | None:
    """The trainer's elector when the chart enabled the Lease (FLYWHEEL_TRAINER_LEASE_NAME), else None."""
    cfg = ElectionConfig.from_env()
    if cfg is None:
        return None
    from flywheel.ops.k8s import api_client

    coord = client.CoordinationV1Api(api or api_client())
    lock = LeaseLock(coord, cfg.namespace, cfg.lease_name, cfg.identity, cfg.duration_s)
    return LeaderElector(lock, cfg, on_change)
