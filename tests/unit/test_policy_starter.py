"""The policy's starter at start-up where it cannot write the model store (the chart mounts it
read-only): it waits for the trainer's signed version 0 instead of building one."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from flywheel.core import errors
from flywheel.core.modelstore import ModelStore

pytestmark = pytest.mark.timeout(120)

WAITING = "waiting for the starter policy (version 0) in {root}: this replica cannot write the model store"


def publish_v0(root: Path) -> None:
    ModelStore(root).publish("policy", lambda d: (d / "weights.bin").write_bytes(b"w"), parent=None, version=0)


def test_wait_for_starter_returns_once_v0_is_published(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from flywheel.policy.service import wait_for_starter

    store = ModelStore(tmp_path)
    timer = threading.Timer(0.3, publish_v0, [tmp_path])
    timer.start()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="flywheel.policy.service"):
        wait_for_starter(store, threading.Event(), poll_s=0.02)
    timer.join()
    assert time.monotonic() - started >= 0.3
    waiting = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for the starter")]
    assert len(waiting) == 1, waiting  # said once, not once per poll
    assert waiting[0].startswith(WAITING.format(root=tmp_path))
    assert store.get("policy", 0).version == 0


def test_wait_for_starter_ends_when_the_service_stops(tmp_path: Path) -> None:
    from flywheel.policy.service import wait_for_starter

    stopped = threading.Event()
    threading.Timer(0.1, stopped.set).start()
    with pytest.raises(errors.Unavailable) as e:
        wait_for_starter(ModelStore(tmp_path), stopped, poll_s=0.02)
    assert e.value.message == f"stopped while waiting for the starter policy (version 0) in {tmp_path}"


CHILD = """
import logging, sys, threading
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(message)s")
from flywheel.core.modelstore import ModelStore
from flywheel.policy.service import starter_ready
store = ModelStore(sys.argv[1])
starter_ready(store, 1, threading.Event(), poll_s=0.05)
print("ready", store.get("policy", 0).version, flush=True)
"""


def test_a_read_only_store_is_waited_for_not_written(tmp_path: Path) -> None:
    """A real read-only mount (a bind mount in a private mount namespace, as a pod's readOnly volume):
    the replica neither builds nor locks anything, and loads v0 once the writer has published it."""
    root = tmp_path / "models"
    root.mkdir()
    ro = f"mount --bind {root} {root} && mount -o remount,ro,bind {root}"
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"{ro} && ! touch {root}/x"], capture_output=True)
    if shutil.which("unshare") is None or probe.returncode != 0:
        pytest.skip(f"no read-only bind mount here (unshare -rm): {probe.stderr.decode().strip()}")
    cmd = ["unshare", "-rm", "sh", "-c", f'{ro} && exec "$0" -c "$1" "$2"', sys.executable, CHILD, str(root)]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert child.stdout is not None
        lines = []
        for line in child.stdout:  # until the child says it waits (it imports torch first)
            lines.append(line)
            if line.startswith("waiting for the starter"):
                break
        assert lines and lines[-1].startswith(WAITING.format(root=root)), "".join(lines)
        assert list(root.iterdir()) == [], "a read-only replica wrote to the store"
        publish_v0(root)  # the trainer's init container, outside the read-only mount
        assert child.wait(60) == 0
        assert child.stdout.read().splitlines()[-1] == "ready 0"
    finally:
        child.kill()
        child.wait()
