"""The reading half of a hot swap, in a process of its own (`python -m flywheel.policy.swap_worker`).

Why a process: the scheduler thread shares the interpreter lock with every thread of the service.
The updates consumer (kafka-python's polls and heartbeats), the sha256 threads and the loader's
reads were such threads, and on a machine whose cores are busy a thread at a lower CPU priority
is preempted while it holds the lock: the decode step then waits for a thread the kernel has put
last (priority inversion; niceness and one interpreter lock do not mix). In their own process the
lock is theirs and the niceness works: the kernel runs the decode thread first.

The worker consumes flywheel.policy.updates. For each announcement of our model it checks the
signature and the uri (`ModelStore.locate`, with the service's trusted keys), then hashes every
file of the checkpoint while it copies the safetensors files into anonymous shared memory (memfd),
so the bytes the service serves are the bytes that were verified. It hands the memfds to the
service over a Unix socket (SCM_RIGHTS) and waits for its answer before the record's offset is
committed: an announcement is applied at least once, even if either process dies. The service
maps the memfds (`flywheel.policy.reload.map_safetensors`): on the CPU the new parameters are
those pages, with no further copy.

Its consumer's counters and lag (flywheel_bus_*) reach the service's /metrics: the worker sends
them every second and the service exports them as its own (`bus.mirror_consumer_samples`).

Imports stay light (no torch): the process starts in well under a second and holds ~50 MB.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle
from pathlib import Path

from flywheel.core import bus, errors, modelstore
from flywheel.core.config import KafkaConfig
from flywheel.core.logs import configure_logging
from flywheel.core.modelstore import ModelStore
from flywheel.core.signing import Verifier
from flywheel.v1 import events_pb2

log = logging.getLogger(__name__)

Snapshot = list[tuple[str, int, int]]  # (file name, memfd, size) of each safetensors file
METRICS_INTERVAL_S = 1.0  # how often the worker sends its consumer's counters and lag to the service


@dataclass
class WorkerSettings:
    """What the worker needs; sent to it as its first message."""

    kafka: dict
    topic: str
    model: str
    group: str
    store_root: str
    start_offsets: dict[int, int]  # records before these were read by the service at start-up
    fetch_wait_ms: int
    nice: int
    trust: dict = field(default_factory=dict)  # the service's Verifier.settings(): keys and whether required


# ---------------------------------------------------------------------------- worker side
def copy_and_hash(root: Path, rels: Iterable[str], fds: dict[str, int]) -> dict[str, str]:
    """`modelstore.verify_dir`'s hashing step: sha256 of each file under root, each safetensors file
    also copied, in the same read, into a new memfd (recorded in `fds`)."""
    rels = list(rels)
    for rel in rels:
        if rel.endswith(".safetensors"):
            fds[rel] = os.memfd_create(f"flywheel-{Path(rel).name}", os.MFD_CLOEXEC)
    return modelstore.sha256_files(root, rels, copy_to=fds)


def prepare(store: ModelStore, u: events_pb2.ModelUpdate) -> tuple[Path, Snapshot]:
    """Check `u`'s signature and uri, and verify its checkpoint, its weights copied into memfds
    (closed here on failure)."""
    fds: dict[str, int] = {}
    try:
        path = store.locate(u)
        modelstore.verify_digests(path, u.files, digests=lambda root, rels: copy_and_hash(root, rels, fds))
        return path, [(rel, fd, os.fstat(fd).st_size) for rel, fd in sorted(fds.items())]
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise


def refusal_reason(e: errors.FlywheelError) -> str:
    """The label of a refused announcement: the error's own reason (unsigned, bad_signature,
    unknown_key, outside_store, bad_uri, tampered, missing), else what its class says."""
    return e.reason or ("missing" if isinstance(e, errors.NotFound) else "invalid")


def _serve(conn: Connection, s: WorkerSettings) -> None:
    store = ModelStore(s.store_root, verifier=Verifier.from_settings(s.trust))
    sending = threading.Lock()  # the consumer's thread and the metrics thread share the socket

    def send(msg: tuple) -> None:
        with sending:
            conn.send(msg)

    def on_record(record: bus.Record) -> None:
        u: events_pb2.ModelUpdate = record.value
        if record.offset < s.start_offsets.get(record.partition, 0) or u.model != s.model:
            return
        try:
            path, snap = prepare(store, u)
        except errors.FlywheelError as e:  # IntegrityError, or the store has no such version
            why = f"checkpoint failed verification: {e.message}"
            send(("refused", u.SerializeToString(), why, refusal_reason(e)))
        except OSError as e:  # an unreadable store is a refusal too, never a crash
            why = f"checkpoint unreadable: {type(e).__name__}: {e}"
            send(("refused", u.SerializeToString(), why, "unreadable"))
        else:
            try:
                with sending:
                    msg = (
                        "prepared",
                        u.SerializeToString(),
                        str(path),
                        record.timestamp_s,
                        [(n, z) for n, _, z in snap],
                    )
                    conn.send(msg)
                    for _, fd, _ in snap:
                        send_handle(conn, fd, os.getppid())
            finally:
                for _, fd, _ in snap:
                    os.close(fd)
        conn.recv()  # the service's answer: only then may the offset be committed

    consumer = bus.Consumer(
        KafkaConfig(**s.kafka),
        s.group,
        {s.topic: events_pb2.ModelUpdate},
        on_record,
        dlq_topic=None,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=s.fetch_wait_ms,
    )
    parent = os.getppid()

    def watch_parent() -> None:  # the service died without stopping us
        while os.getppid() == parent:
            time.sleep(0.5)
        consumer.stop()

    def report_metrics() -> None:  # the service exports them as its own (flywheel_bus_consumed_total, ...)
        try:
            while True:
                time.sleep(METRICS_INTERVAL_S)
                send(("metrics", bus.consumer_samples()))
        except OSError:  # the service went away: the consumer's next send or recv ends us
            pass

    threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()
    threading.Thread(target=report_metrics, name="metrics", daemon=True).start()
    consumer.run()


def main() -> None:
    configure_logging("policy-swap-worker", os.environ.get("FLYWHEEL_LOG_LEVEL", "INFO"))  # the env its service had
    conn = Connection(int(sys.argv[1]))
    s = WorkerSettings(**conn.recv())
    if s.nice > 0:
        os.nice(s.nice)
    try:
        _serve(conn, s)
    except (EOFError, BrokenPipeError, ConnectionResetError):  # the service went away
        pass


# ---------------------------------------------------------------------------- service side
Prepared = Callable[[events_pb2.ModelUpdate, Path, float | None, Snapshot], bool]
Refused = Callable[[events_pb2.ModelUpdate, str, str], object]  # (update, why, reason); returns ignored


class SwapWorker:
    """Runs the worker process and hands what it prepares to `on_prepared` (in this object's thread,
    which owns the memfds until then). A worker that dies is started again; the announcement it was
    handling is redelivered, since its offset was not committed."""

    def __init__(self, settings: WorkerSettings, on_prepared: Prepared, on_refused: Refused) -> None:
        self.settings, self.on_prepared, self.on_refused = settings, on_prepared, on_refused
        self.restarts = 0
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._mirrored: dict[tuple, float] = {}  # the worker's counters as last exported
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, thread_init: Callable[[], None] = lambda: None) -> None:
        self._spawn()
        self._thread = threading.Thread(target=self._run, args=(thread_init,), name="policy-swap", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._kill()
        if self._thread is not None:
            self._thread.join(5)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _spawn(self) -> None:
        ours, theirs = socket.socketpair()
        with theirs:
            cmd = [sys.executable, "-m", "flywheel.policy.swap_worker", str(theirs.fileno())]
            self._proc = subprocess.Popen(cmd, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        self._conn = Connection(ours.detach())
        self._conn.send(asdict(self.settings))
        self._mirrored = {}  # a new worker's counters start from 0

    def _kill(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def _run(self, thread_init: Callable[[], None]) -> None:
        thread_init()
        while not self._stopping.is_set():
            conn, proc = self._conn, self._proc
            assert conn is not None and proc is not None  # spawned before this thread started
            try:
                msg = conn.recv()
                if msg[0] == "metrics":
                    bus.mirror_consumer_samples(msg[1], self._mirrored)
                else:
                    conn.send(self._handle(conn, msg))
                continue
            except (EOFError, OSError) as e:
                if self._stopping.is_set():
                    return
                log.error("the swap worker stopped (%s, exit code %s): starting it again", e, proc.poll())
            self._kill()
            if self._stopping.wait(1.0):
                return
            self.restarts += 1
            try:
                self._spawn()
            except OSError as e:  # tried again: the closed connection fails the next recv
                log.error("could not start the swap worker: %s", e)

    def _handle(self, conn: Connection, msg: tuple) -> bool:
        snap = [(name, recv_handle(conn), size) for name, size in msg[4]] if msg[0] == "prepared" else []
        try:
            u = events_pb2.ModelUpdate.FromString(msg[1])
            if msg[0] == "refused":
                self.on_refused(u, msg[2], msg[3])
                return False
            return self.on_prepared(u, Path(msg[2]), msg[3], snap)
        except Exception:  # noqa: BLE001 - the callbacks report their own errors; this thread must live on
            log.exception("applying what the swap worker prepared failed")
            return False
        finally:
            for _, fd, _ in snap:
                os.close(fd)


if __name__ == "__main__":
    main()
