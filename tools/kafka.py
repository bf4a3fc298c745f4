"""A real single-node Apache Kafka 4.x broker in KRaft mode, run from its Maven Central jars
(fetched once into a cache by `mvn` with deploy/kafka/pom.xml), so the tests and benchmarks
exercise the broker production runs. Development tooling: it needs the source checkout.

CLI (the test script calls `start` before pytest and `stop` afterwards):

    python -m tools.kafka start --port 9092 --dir D   # background, pid file in D
    python -m tools.kafka stop --dir D
    python -m tools.kafka run --port 9092 --dir D     # foreground until a signal

With `--tls-ca/--tls-cert/--tls-key` (PEM files; Kafka reads them as PEM key and trust stores)
the broker also listens on `--ssl-port` (TLS, client certificates signed by the CA required) and
on `--sasl-ssl-port` (TLS + SASL SCRAM-SHA-512, users from `--scram-user NAME=PASSWORD`, created
when the storage is formatted). PLAINTEXT stays on `--port`: the broker's own replication and
the readiness probe use it.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from flywheel.core.brokers import (
    BrokerError,
    BrokerProcess,
    free_port,
    pid_alive,
    run_foreground,
    stop_group,
    wait_until_ready,
)

KAFKA_VERSION = "4.1.1"
ROOT = Path(__file__).resolve().parents[1]
POM = ROOT / "deploy" / "kafka" / "pom.xml"

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


SCRAM_MECHANISM = "SCRAM-SHA-512"


@dataclasses.dataclass(frozen=True)
class BrokerTls:
    """The broker's TLS listeners: PEM files, and the SCRAM users of the SASL_SSL listener."""

    ca_file: str  # trusted for client certificates (SSL listener)
    cert_file: str  # the broker's certificate chain; must name the host clients dial
    key_file: str  # its private key, unencrypted PKCS#8 PEM
    ssl_port: int = 0  # 0: a free port
    sasl_ssl_port: int = 0
    scram_users: tuple[tuple[str, str], ...] = ()  # (name, password)

    def __post_init__(self) -> None:
        for name in ("ca_file", "cert_file", "key_file"):
            if not Path(getattr(self, name)).is_file():
                raise BrokerError(f"BrokerTls.{name} = {getattr(self, name)!r}: no such file")
        for user, password in self.scram_users:
            if not user or not password or any(c in user + password for c in ",=[]"):
                raise BrokerError(f"SCRAM user {user!r}: give NAME=PASSWORD, neither empty nor with , = [ ]")


class ApacheKafka(BrokerProcess):
    """A single-node KRaft Apache Kafka 4.x (broker and controller in one JVM) for tests and CI.

    With `tls`, also an SSL listener (client certificates required) at `ssl_bootstrap` and a
    SASL_SSL listener (SCRAM-SHA-512) at `sasl_ssl_bootstrap`."""

    def __init__(
        self,
        port: int | None = None,
        data_dir: str | os.PathLike | None = None,
        *,
        host: str = "127.0.0.1",
        version: str = KAFKA_VERSION,
        heap: str = "512m",
        jars_dir: str | os.PathLike | None = None,
        tls: BrokerTls | None = None,
    ) -> None:
        self.host, self.port, self.version, self.heap = host, port or free_port(host), version, heap
        self.tls = tls
        if tls is not None:
            self.ssl_port = tls.ssl_port or free_port(host)
            self.sasl_ssl_port = tls.sasl_ssl_port or free_port(host)
            self.ssl_bootstrap = f"{host}:{self.ssl_port}"
            self.sasl_ssl_bootstrap = f"{host}:{self.sasl_ssl_port}"
        self._tmp: str | None = None  # a data dir of our own, removed on stop
        if not data_dir:
            data_dir = self._tmp = tempfile.mkdtemp(prefix="flywheel-kafka-")
        self.data_dir = Path(data_dir).resolve()
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
        if self.tls is not None:
            props.update(self._tls_props(cport))
        path = self.data_dir / "server.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        (self.data_dir / "log4j2.properties").write_text(LOG4J2)
        return path

    def _tls_props(self, cport: int) -> dict[str, str]:
        """The SSL and SASL_SSL listeners: PEM stores, client certificates required on SSL, SCRAM on SASL_SSL."""
        assert self.tls is not None
        keystore = self.data_dir / "broker-keystore.pem"  # Kafka's PEM keystore: the key, then the chain
        keystore.write_bytes(Path(self.tls.key_file).read_bytes() + b"\n" + Path(self.tls.cert_file).read_bytes())
        keystore.chmod(0o600)
        h = self.host
        scram = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        return {
            "listeners": f"PLAINTEXT://{h}:{self.port},SSL://{h}:{self.ssl_port},"
            f"SASL_SSL://{h}:{self.sasl_ssl_port},CONTROLLER://{h}:{cport}",
            "advertised.listeners": f"PLAINTEXT://{h}:{self.port},SSL://{h}:{self.ssl_port},"
            f"SASL_SSL://{h}:{self.sasl_ssl_port}",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,SSL:SSL,SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT",
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(keystore),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(Path(self.tls.ca_file).resolve()),
            "listener.name.ssl.ssl.client.auth": "required",
            "listener.name.sasl_ssl.ssl.client.auth": "none",
            "sasl.enabled.mechanisms": SCRAM_MECHANISM,
            f"listener.name.sasl_ssl.{SCRAM_MECHANISM.lower()}.sasl.jaas.config": scram,
        }

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
        args = ["format", "--standalone", "-t", new_cluster_id(), "-c", str(config)]
        for user, password in self.tls.scram_users if self.tls is not None else ():
            args += ["--add-scram", f"{SCRAM_MECHANISM}=[name={user},password={password}]"]
        cmd = self._java("kafka.tools.StorageTool", *args)
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
        self.spawn(self._java("kafka.Kafka", str(config)), self.data_dir / "broker.log", cwd=self.data_dir)
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


def _kafka_start(port: int, data_dir: Path, timeout_s: float, tls: BrokerTls | None = None) -> int:
    pid_file = data_dir / "kafka.pid"
    if pid_file.is_file():
        pid, _, bootstrap = pid_file.read_text().partition(" ")
        if pid_alive(int(pid)):
            print(bootstrap.strip(), flush=True)
            return 0
    broker = ApacheKafka(port, data_dir, tls=tls)
    broker.start(timeout_s)
    assert broker.proc is not None
    pid_file.write_text(f"{broker.proc.pid} {broker.bootstrap}\n")
    broker.proc = None  # detach: it lives on in its own session after we exit
    _print_listeners(broker)
    return 0


def _print_listeners(broker: ApacheKafka) -> None:
    print(broker.bootstrap, flush=True)  # the first line: what scripts read
    if broker.tls is not None:
        print(f"SSL {broker.ssl_bootstrap}\nSASL_SSL {broker.sasl_ssl_bootstrap}", flush=True)


def _broker_tls(a: argparse.Namespace) -> BrokerTls | None:
    files = (a.tls_ca, a.tls_cert, a.tls_key)
    if not any(files):
        return None
    if not all(files):
        raise BrokerError("--tls-ca, --tls-cert and --tls-key go together: give all three PEM files")
    users = []
    for item in a.scram_user:
        name, sep, password = item.partition("=")
        if not sep:
            raise BrokerError(f"--scram-user {name!r}: give NAME=PASSWORD")
        users.append((name, password))
    return BrokerTls(a.tls_ca, a.tls_cert, a.tls_key, a.ssl_port, a.sasl_ssl_port, tuple(users))


def _kafka_stop(data_dir: Path, timeout_s: float) -> int:
    pid_file = data_dir / "kafka.pid"
    if not pid_file.is_file():
        print(f"no broker pid file in {data_dir}; nothing to stop", file=sys.stderr)
        return 0
    pid = int(pid_file.read_text().split()[0])
    stop_group(pid, timeout_s, lambda: pid_alive(pid))
    pid_file.unlink(missing_ok=True)
    return 0 if not pid_alive(pid) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.kafka", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["start", "stop", "run"])
    p.add_argument("--port", type=int, default=9092)
    p.add_argument("--dir", type=Path, required=True, help="data dir (log dir, config, pid file, broker.log)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the broker to answer")
    p.add_argument("--tls-ca", help="PEM CA that signs client certificates (turns on the SSL and SASL_SSL listeners)")
    p.add_argument("--tls-cert", help="PEM certificate chain of the broker")
    p.add_argument("--tls-key", help="PEM private key (unencrypted) of the broker")
    p.add_argument("--ssl-port", type=int, default=0, help="SSL listener port (client certificates required)")
    p.add_argument("--sasl-ssl-port", type=int, default=0, help="SASL_SSL listener port (SCRAM-SHA-512)")
    p.add_argument(
        "--scram-user", action="append", default=[], metavar="NAME=PASSWORD", help="a SCRAM user (repeatable)"
    )
    a = p.parse_args(argv)
    try:
        a.dir.mkdir(parents=True, exist_ok=True)
        if a.action == "stop":
            return _kafka_stop(a.dir.resolve(), 30.0)
        tls = _broker_tls(a)
        if a.action == "start":
            return _kafka_start(a.port, a.dir.resolve(), a.timeout, tls)
        broker = ApacheKafka(a.port, a.dir, tls=tls)
        broker.start(a.timeout)
        if tls is not None:
            print(f"SSL {broker.ssl_bootstrap}\nSASL_SSL {broker.sasl_ssl_bootstrap}", flush=True)
        return run_foreground(broker)
    except BrokerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
