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
import os
import threading
import time
from collections.abc import Callable

from kubernetes import client
from kubernetes.client.exceptions import ApiException

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

    def _body(self, lease: client.V1Lease) -> dict:
        """The Lease as a JSON dict, its own timestamps in MicroTime form."""
        body = self.api.api_client.sanitize_for_serialization(lease)
        spec = body.setdefault("spec", {})
        for key, value in (
            ("acquireTime", lease.spec and lease.spec.acquire_time),
            ("renewTime", lease.spec and lease.spec.renew_time),
        ):
            if value:
                spec[key] = micro_time(value)
        return body

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
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {
                    "holderIdentity": self.identity,
                    "leaseDurationSeconds": self.duration_s,
                    "acquireTime": stamp,
                    "renewTime": stamp,
                    "leaseTransitions": 0,
                },
            }
            try:
                created = self.api.create_namespaced_lease(self.namespace, body, _request_timeout=10)
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

        body = self._body(lease)
        body["spec"].update(
            holderIdentity=self.identity,
            leaseDurationSeconds=self.duration_s,
            renewTime=stamp,
            acquireTime=stamp if not mine else micro_time(record.acquire_time),
            leaseTransitions=record.transitions + (0 if mine else 1),
        )
        # metadata.resourceVersion is still the one we read: a PUT after someone else's
        # write is refused with 409.
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
        body = self._body(lease)
        body["spec"].pop("holderIdentity", None)
        body["spec"].update(leaseDurationSeconds=1, acquireTime=stamp, renewTime=stamp)
        try:
            self.api.replace_namespaced_lease(self.name, self.namespace, body, _request_timeout=10)
        except ApiException as e:
            if e.status == 409:
                return False
            raise
        return True


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
        """From the chart's FLYWHEEL_TRAINER_LEASE_* and FLYWHEEL_POD_* variables; None if unset."""
        name = os.environ.get("FLYWHEEL_TRAINER_LEASE_NAME")
        if not name:
            return None
        return cls(
            lease_name=name,
            namespace=os.environ.get("FLYWHEEL_POD_NAMESPACE", "default"),
            identity=os.environ.get("FLYWHEEL_POD_NAME") or os.environ.get("HOSTNAME", ""),
            duration_s=int(os.environ.get("FLYWHEEL_TRAINER_LEASE_DURATION_S", 15)),
            renew_deadline_s=float(os.environ.get("FLYWHEEL_TRAINER_LEASE_RENEW_DEADLINE_S", 10)),
            retry_period_s=float(os.environ.get("FLYWHEEL_TRAINER_LEASE_RETRY_PERIOD_S", 2)),
        )


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
