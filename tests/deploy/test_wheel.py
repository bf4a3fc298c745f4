"""The installed wheel, not the checkout: what the container image runs.

The wheel is built from exactly the files deploy/Dockerfile copies into its build stage, then
installed with `pip install --target` into a temp dir. Every process below runs from another
temp dir with that dir first on PYTHONPATH and a `sitecustomize` that takes the checkout off
sys.path (the editable install puts services/ there) and makes `grpc_tools`, `tools`, `tests`
and `bench` unimportable: a module of the package that needed any of them would fail here.
(grpc itself tries `import grpc_tools` for a compatibility alias and takes the ImportError.)
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flywheel.core.brokers import free_port
from flywheel.testing import wait_for

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"

pytestmark = pytest.mark.timeout(180)

# Loaded at start-up by every interpreter below (PYTHONPATH puts it first).
SITECUSTOMIZE = f"""
import sys

CHECKOUT = {str(ROOT)!r}
sys.path[:] = [p for p in sys.path if not (p == CHECKOUT or p.startswith(CHECKOUT + "/")) or "/.venv/" in p]


class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("grpc_tools", "tools", "tests", "bench"):
            raise ModuleNotFoundError(f"{{name}}: not available to the installed wheel", name=name)
        return None


sys.meta_path.insert(0, _Blocked())
"""


@dataclass
class Installed:
    wheel: Path
    site: Path
    run_dir: Path
    env: dict[str, str]

    @property
    def flywheel(self) -> str:
        """The `flywheel` console script pip wrote for the wheel's entry point."""
        return str(self.site / "bin" / "flywheel")

    def popen(self, *args: str, log: str, **env: str) -> subprocess.Popen[bytes]:
        out = open(self.run_dir / log, "wb")  # noqa: SIM115 - the child keeps it
        try:
            return subprocess.Popen(
                [self.flywheel, *args],
                cwd=self.run_dir,
                env={**self.env, **env},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        finally:
            out.close()

    def log(self, name: str) -> str:
        return (self.run_dir / name).read_text(errors="replace")


def build_context(dest: Path) -> None:
    """Copy what the Dockerfile's build stage COPYs from the build context into `dest`."""
    build_stage = DOCKERFILE.read_text().split("AS runtime", 1)[0]
    for line in build_stage.splitlines():
        if not line.startswith("COPY "):
            continue
        words = shlex.split(line)
        if any(w.startswith("--from") for w in words):
            continue
        *sources, target = [w for w in words[1:] if not w.startswith("--")]
        for source in sources:
            src = ROOT / source
            to = dest / target / src.name if target.endswith("/") else dest / target
            if src.is_dir():
                ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
                shutil.copytree(src, to, ignore=ignore)
            else:
                to.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, to)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    tmp = tmp_path_factory.mktemp("wheel")
    src, dist, site, block, run_dir = (tmp / d for d in ("src", "dist", "site", "block", "run"))
    for d in (src, block, run_dir):
        d.mkdir()
    build_context(src)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # --no-build-isolation: the venv's setuptools (a test extra) builds it; --no-index: nothing is fetched.
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist), str(src)]
    done = subprocess.run(build, cwd=src, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"building the wheel failed:\n{done.stdout}\n{done.stderr}"
    (wheel,) = dist.glob("rlhf_flywheel-*.whl")
    install = [*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)]
    done = subprocess.run(install, cwd=tmp, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"installing the wheel failed:\n{done.stdout}\n{done.stderr}"
    (block / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLYWHEEL_", "PYTHON"))}
    env |= {"PYTHONPATH": f"{block}{os.pathsep}{site}", "PYTHONNOUSERSITE": "1", "PYTHONUNBUFFERED": "1"}
    return Installed(wheel=wheel, site=site, run_dir=run_dir, env=env)


def test_the_wheel_holds_the_package_and_nothing_of_the_development_tree(installed: Installed) -> None:
    names = zipfile.ZipFile(installed.wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"flywheel", "rlhf_flywheel-0.1.0.dist-info"}, "no tools/, tests/, bench/ or protos/"
    assert "flywheel/py.typed" in names
    assert "flywheel/feedback/ui/app.js" in names  # the feedback page ships in the wheel
    for proto in sorted((ROOT / "protos" / "flywheel" / "v1").glob("*.proto")):
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            assert f"flywheel/v1/{proto.stem}{suffix}" in names
    with zipfile.ZipFile(installed.wheel) as z:
        entry_points = z.read("rlhf_flywheel-0.1.0.dist-info/entry_points.txt").decode()
    assert "flywheel = flywheel.cli:main" in entry_points


def test_every_module_imports_from_the_wheel_without_the_checkout_or_grpc_tools(installed: Installed) -> None:
    script = """
import importlib, json, pkgutil, sys
import flywheel
for m in pkgutil.walk_packages(flywheel.__path__, "flywheel."):
    importlib.import_module(m.name)
print(json.dumps({
    "file": flywheel.__file__,
    "modules": sorted(m for m in sys.modules if m.startswith("flywheel")),
    "foreign": sorted(m for m in sys.modules if m.split(".")[0] in ("grpc_tools", "tools", "tests", "bench")),
}))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=installed.run_dir, env=installed.env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.splitlines()[-1])
    assert Path(found["file"]).is_relative_to(installed.site), found["file"]
    assert "flywheel.v1.trainer_pb2" in found["modules"] and "flywheel.cli" in found["modules"]
    assert found["foreign"] == []

    done = subprocess.run(
        [installed.flywheel, "--help"], cwd=installed.run_dir, env=installed.env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "serve" in done.stdout and "broker" in done.stdout


def health(port: int) -> str:
    """The gRPC health status of the whole server at 127.0.0.1:`port` ("" while it does not answer)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
        except grpc.RpcError:
            return ""
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def stop(proc: subprocess.Popen[bytes], log: str) -> int:
    """SIGTERM, then the exit code; a process still running after 30 s fails the test."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"still running 30 s after SIGTERM; log:\n{log[-3000:]}")


def test_flywheel_serve_runs_from_the_wheel_and_stops_cleanly(installed: Installed, tansu_bootstrap: str) -> None:
    grpc_port, http_port = free_port(), free_port()
    proc = installed.popen(
        "serve",
        "feedback",
        "--grpc-port",
        str(grpc_port),
        "--http-port",
        str(http_port),
        log="feedback.log",
        FLYWHEEL_KAFKA_BOOTSTRAP=tansu_bootstrap,
        FLYWHEEL_FEEDBACK_STATE_DIR=str(installed.run_dir / "feedback-state"),
    )
    try:

        def serving() -> bool:
            assert proc.poll() is None, f"exited with {proc.returncode}:\n{installed.log('feedback.log')[-3000:]}"
            return health(grpc_port) == "SERVING"

        wait_for(serving, 60, "`flywheel serve feedback` from the wheel to report SERVING", poll_s=0.1)
    finally:
        code = stop(proc, installed.log("feedback.log"))
    log = installed.log("feedback.log")
    assert code == 0, log[-3000:]
    assert "feedback stopped" in log
    assert "Traceback" not in log and "nanobind" not in log, log[-3000:]


def test_flywheel_broker_runs_from_the_wheel_answers_kafka_and_stops(installed: Installed) -> None:
    from kafka import KafkaAdminClient

    port = free_port()
    proc = installed.popen("broker", "--port", str(port), log="broker.log")
    try:
        wait_for(lambda: f"127.0.0.1:{port}" in installed.log("broker.log"), 30, "the broker to print its address")

        def answers_metadata() -> bool:
            assert proc.poll() is None, f"exited with {proc.returncode}:\n{installed.log('broker.log')}"
            try:
                admin = KafkaAdminClient(
                    bootstrap_servers=f"127.0.0.1:{port}", request_timeout_ms=3000, client_id="wheel-test"
                )
            except Exception:  # noqa: BLE001 - not up yet
                return False
            try:
                admin.list_topics()  # a Metadata request
                return True
            finally:
                admin.close()

        wait_for(answers_metadata, 30, "the broker to answer a metadata request", poll_s=0.2)
    finally:
        code = stop(proc, installed.log("broker.log"))
    assert code == 0, installed.log("broker.log")
    # The Tansu child went with it: its port is free again.
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
