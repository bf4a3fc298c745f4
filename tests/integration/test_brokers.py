"""The brokers' lifecycle: the CLI the test script uses, persistence across restarts, clear errors."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from kafka import KafkaAdminClient

from flywheel.core import brokers
from flywheel.testing import wait_for
from tools import kafka

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]
CLI = [sys.executable, "-m", "tools.kafka"]
TANSU = [sys.executable, "-m", "flywheel.core.brokers", "tansu"]
ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def test_kafka_cli_start_stop_keeps_topics_across_restarts(tmp_path: Path) -> None:
    port = str(brokers.free_port())
    started = cli("start", "--port", port, "--dir", str(tmp_path))
    assert started.returncode == 0, started.stderr
    assert started.stdout.strip() == f"127.0.0.1:{port}"
    pid = int((tmp_path / "kafka.pid").read_text().split()[0])
    try:
        admin = KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}")
        admin.create_topics({"kept": {"num_partitions": 2, "replication_factor": 1}})
        admin.close()
        assert cli("start", "--port", port, "--dir", str(tmp_path)).returncode == 0  # already up: no-op
        assert int((tmp_path / "kafka.pid").read_text().split()[0]) == pid
        assert cli("stop", "--dir", str(tmp_path)).returncode == 0
        assert not brokers.pid_alive(pid) and not (tmp_path / "kafka.pid").exists()
        assert cli("start", "--port", port, "--dir", str(tmp_path)).returncode == 0
        admin = KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}")
        assert "kept" in admin.list_topics()
        admin.close()
    finally:
        assert cli("stop", "--dir", str(tmp_path)).returncode == 0
    assert "shut down completed" in (tmp_path / "broker.log").read_text()


def test_kafka_start_failure_reports_the_broker_log(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        broker = kafka.ApacheKafka(taken.getsockname()[1], tmp_path)
        with pytest.raises(brokers.BrokerError, match="(?s)exited during start-up.*Address already in use"):
            broker.start(timeout_s=60)
    assert broker.proc is None


def test_tansu_runs_in_the_foreground_until_sigterm() -> None:
    port = brokers.free_port()
    proc = subprocess.Popen([*TANSU, "run", "--port", str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == f"127.0.0.1:{port}"
        admin = KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}")
        admin.create_topics({"t": {"num_partitions": 1, "replication_factor": 1}})
        assert admin.list_topics() == ["t"]
        admin.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    wait_for(lambda: not listening(port), 5, f"the broker to stop listening on {port}")


def test_tansu_dies_with_its_owner_even_when_that_is_sigkilled() -> None:
    port = brokers.free_port()
    proc = subprocess.Popen([*TANSU, "run", "--port", str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == f"127.0.0.1:{port}"
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        proc.kill()  # no chance to stop its broker
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    # The kernel's SIGTERM (the broker's parent-death signal) stops it.
    wait_for(lambda: not listening(port), 10, f"the broker on {port} to stop after its owner was SIGKILLed", poll_s=0.1)
