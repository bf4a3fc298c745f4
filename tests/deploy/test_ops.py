"""`flywheel ops` and the trainer's Lease rule against a local fake Kubernetes API.

No API server can run on these machines, so `FakeKube` (aiohttp on 127.0.0.1) answers
exactly the calls flywheel.ops.k8s documents, with the API server's semantics that matter
here: resourceVersion bumps on every write, 409 on a stale PUT or a duplicate POST, 404 with
a Status body. The Trainer and Policy are real gRPC servicers on a free port.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from aiohttp import web
from kubernetes import client

from flywheel.ops import __main__ as ops
from flywheel.ops.lease import ElectionConfig, LeaderElector, LeaseLock
from flywheel.v1 import policy_pb2, policy_pb2_grpc, trainer_pb2, trainer_pb2_grpc

NS = "flywheel"
LEASES = f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases"
# MicroTime as Go's RFC3339Micro parses it: exactly 6 fraction digits, then Z or an offset.
MICRO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|[+-]\d\d:\d\d)$")
TOKEN = "s3cret-admin"


def _status(code: int, reason: str, message: str) -> web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code}
    return web.json_response({**body, "message": message}, status=code)


class FakeKube:
    """The four Kubernetes API calls flywheel.ops makes, with optimistic concurrency."""

    def __init__(self) -> None:
        self.leases: dict[str, dict[str, Any]] = {}
        self.pods: list[dict[str, Any]] = []
        self.calls: list[tuple[str, str, dict[str, str]]] = []
        self.bodies: list[dict[str, Any]] = []
        self.before: Callable[[str, str], None] | None = None  # runs before a request is handled
        self._rv = 100
        app = web.Application()
        app.router.add_get(f"/api/v1/namespaces/{NS}/pods", self.list_pods)
        app.router.add_get(LEASES + "/{name}", self.get_lease)
        app.router.add_post(LEASES, self.create_lease)
        app.router.add_put(LEASES + "/{name}", self.replace_lease)
        self.app = app

    def bump(self, lease: dict[str, Any]) -> None:
        self._rv += 1
        lease["metadata"]["resourceVersion"] = str(self._rv)

    def _log(self, request: web.Request) -> None:
        self.calls.append((request.method, request.path, dict(request.query)))
        if self.before:
            self.before(request.method, request.path)

    async def list_pods(self, request: web.Request) -> web.Response:
        self._log(request)
        return web.json_response({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": self.pods})

    async def get_lease(self, request: web.Request) -> web.Response:
        self._log(request)
        lease = self.leases.get(request.match_info["name"])
        if lease is None:
            return _status(404, "NotFound", f'leases.coordination.k8s.io "{request.match_info["name"]}" not found')
        return web.json_response(lease)

    async def create_lease(self, request: web.Request) -> web.Response:
        self._log(request)
        body = await request.json()
        self.bodies.append(copy.deepcopy(body))
        name = body["metadata"]["name"]
        if name in self.leases:
            return _status(409, "AlreadyExists", f'leases.coordination.k8s.io "{name}" already exists')
        lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", **body}
        lease["metadata"] = {**body["metadata"], "namespace": NS, "uid": "u-1"}
        self.bump(lease)
        self.leases[name] = lease
        return web.json_response(lease, status=201)

    async def replace_lease(self, request: web.Request) -> web.Response:
        self._log(request)
        body = await request.json()
        self.bodies.append(copy.deepcopy(body))
        name = request.match_info["name"]
        current = self.leases.get(name)
        if current is None:
            return _status(404, "NotFound", f'leases.coordination.k8s.io "{name}" not found')
        if body["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
            msg = f'Operation cannot be fulfilled on leases.coordination.k8s.io "{name}": the object has been modified'
            return _status(409, "Conflict", msg)
        lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", **body}
        self.bump(lease)
        self.leases[name] = lease
        return web.json_response(lease)


@pytest.fixture
def kube() -> Iterator[tuple[FakeKube, str]]:
    """A FakeKube served on 127.0.0.1 from a thread (the kubernetes client is synchronous)."""
    fake = FakeKube()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict[str, Any] = {}

    async def start() -> None:
        runner = web.AppRunner(fake.app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        box["runner"], box["port"] = runner, runner.addresses[0][1]
        started.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True)
    thread.start()
    assert started.wait(10)
    yield fake, f"http://127.0.0.1:{box['port']}"
    asyncio.run_coroutine_threadsafe(box["runner"].cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def lock_for(url: str, identity: str, clock: Clock | None = None, duration_s: int = 15) -> LeaseLock:
    cfg = client.Configuration()
    cfg.host = url
    api = client.CoordinationV1Api(client.ApiClient(cfg))
    return LeaseLock(api, NS, "flywheel-trainer", identity, duration_s, monotonic=clock or Clock())


def test_acquire_creates_the_lease(kube: tuple[FakeKube, str]) -> None:
    fake, url = kube
    assert lock_for(url, "trainer-a").try_acquire_or_renew()
    assert [(m, p) for m, p, _ in fake.calls] == [("GET", LEASES + "/flywheel-trainer"), ("POST", LEASES)]
    spec = fake.leases["flywheel-trainer"]["spec"]
    assert spec["holderIdentity"] == "trainer-a" and spec["leaseDurationSeconds"] == 15
    assert spec["leaseTransitions"] == 0
    assert MICRO.match(spec["acquireTime"]) and MICRO.match(spec["renewTime"]), spec


def test_renew_puts_with_the_resource_version_read(kube: tuple[FakeKube, str]) -> None:
    fake, url = kube
    a = lock_for(url, "trainer-a")
    assert a.try_acquire_or_renew()
    first = copy.deepcopy(fake.leases["flywheel-trainer"])
    assert a.try_acquire_or_renew()
    assert fake.calls[-1][0] == "PUT"
    put = fake.bodies[-1]
    assert put["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
    spec = fake.leases["flywheel-trainer"]["spec"]
    assert spec["holderIdentity"] == "trainer-a" and spec["leaseTransitions"] == 0
    assert spec["acquireTime"] == first["spec"]["acquireTime"], "a renewal keeps acquireTime"
    assert MICRO.match(spec["renewTime"])


def test_standby_waits_while_the_holder_renews_and_steals_once_expired(kube: tuple[FakeKube, str]) -> None:
    fake, url = kube
    clock = Clock()
    a, b = lock_for(url, "trainer-a", clock), lock_for(url, "trainer-b", clock)
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    clock.t += 10
    assert a.try_acquire_or_renew()  # a renews: the record changes, b's expiry timer restarts
    clock.t += 10
    puts_before = sum(1 for m, _, _ in fake.calls if m == "PUT")
    assert not b.try_acquire_or_renew(), "20 s after b first looked, but only 10 s since a's last renewal"
    assert sum(1 for m, _, _ in fake.calls if m == "PUT") == puts_before, "a standby writes nothing"
    clock.t += 16  # a stopped renewing (crashed): the record is unchanged for > 15 s
    assert b.try_acquire_or_renew()
    spec = fake.leases["flywheel-trainer"]["spec"]
    assert spec["holderIdentity"] == "trainer-b" and spec["leaseTransitions"] == 1
    assert spec["acquireTime"] == spec["renewTime"]
    assert not a.try_acquire_or_renew(), "the old holder sees b's fresh record and stands by"


def test_conflict_on_a_concurrent_write_loses_the_round(kube: tuple[FakeKube, str]) -> None:
    fake, url = kube
    clock = Clock()
    a, b = lock_for(url, "trainer-a", clock), lock_for(url, "trainer-b", clock)
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    clock.t += 16

    def a_renews_first(method: str, path: str) -> None:  # a's renewal lands between b's GET and PUT
        if method == "PUT":
            fake.before = None
            lease = fake.leases["flywheel-trainer"]
            lease["spec"]["renewTime"] = "2030-01-01T00:00:00.000001Z"
            fake.bump(lease)

    fake.before = a_renews_first
    assert not b.try_acquire_or_renew()
    assert fake.calls[-1][0] == "PUT"
    assert fake.leases["flywheel-trainer"]["spec"]["holderIdentity"] == "trainer-a"


def test_create_race_is_a_lost_round(kube: tuple[FakeKube, str]) -> None:
    fake, url = kube

    def b_creates_first(method: str, path: str) -> None:
        if method == "POST":
            fake.before = None
            fake.leases["flywheel-trainer"] = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": "flywheel-trainer", "namespace": NS, "resourceVersion": "1"},
                "spec": {"holderIdentity": "trainer-b", "leaseDurationSeconds": 15},
            }

    fake.before = b_creates_first
    assert not lock_for(url, "trainer-a").try_acquire_or_renew()
    assert [m for m, _, _ in fake.calls] == ["GET", "POST"]
    assert fake.leases["flywheel-trainer"]["spec"]["holderIdentity"] == "trainer-b"


def test_release_hands_over_at_once(kube: tuple[FakeKube, str]) -> None:
    fake, url = kube
    clock = Clock()
    a, b = lock_for(url, "trainer-a", clock), lock_for(url, "trainer-b", clock)
    assert a.try_acquire_or_renew()
    assert not b.release(), "only the holder releases"
    assert a.release()
    spec = fake.leases["flywheel-trainer"]["spec"]
    assert "holderIdentity" not in spec or spec["holderIdentity"] is None
    assert spec["leaseDurationSeconds"] == 1
    assert b.try_acquire_or_renew(), "a released lease is free without waiting"


def test_elector_leads_then_releases_on_stop(kube: tuple[FakeKube, str]) -> None:
    fake, url = kube
    changes: list[bool] = []
    cfg = ElectionConfig("flywheel-trainer", NS, "trainer-a", duration_s=3, renew_deadline_s=2, retry_period_s=0.05)
    elector = LeaderElector(lock_for(url, "trainer-a", duration_s=3), cfg, changes.append)
    elector.start()
    for _ in range(200):
        if changes:
            break
        threading.Event().wait(0.02)
    elector.stop()
    assert changes == [True, False]
    assert fake.leases["flywheel-trainer"]["spec"].get("holderIdentity") is None


def test_micro_time_always_has_six_fraction_digits() -> None:
    import datetime as dt

    from flywheel.ops.lease import micro_time

    whole = dt.datetime(2030, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
    assert MICRO.match(client.ApiClient().sanitize_for_serialization(micro_time(whole)))
    assert micro_time(None) is None


def test_election_config_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLYWHEEL_TRAINER_LEASE_NAME", raising=False)
    assert ElectionConfig.from_env() is None
    monkeypatch.setenv("FLYWHEEL_TRAINER_LEASE_NAME", "flywheel-trainer")
    monkeypatch.setenv("FLYWHEEL_POD_NAME", "flywheel-trainer-abc")
    monkeypatch.setenv("FLYWHEEL_POD_NAMESPACE", NS)
    cfg = ElectionConfig.from_env()
    assert cfg is not None and (cfg.identity, cfg.namespace, cfg.duration_s) == ("flywheel-trainer-abc", NS, 15)
    with pytest.raises(ValueError, match="renew deadline"):
        ElectionConfig("x", NS, "me", duration_s=5, renew_deadline_s=10)


# ---------------------------------------------------------------- ops CLI against real gRPC stubs


class FakeTrainer(trainer_pb2_grpc.TrainerServicer):
    """Checks the admin token exactly as the trainer must."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, str]] = []
        self.serving = 3

    def _auth(self, context: grpc.ServicerContext) -> None:
        md = dict(context.invocation_metadata())
        if md.get("authorization") != f"Bearer {TOKEN}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "admin token missing or wrong")

    def _status(self) -> trainer_pb2.TrainerStatus:
        return trainer_pb2.TrainerStatus(
            state="training", step=412, serving_version=self.serving, training_version=5, consumer_lag=17,
            metrics={"kl": 0.031, "reward_mean": 0.42}, failing_steps=2, last_error="Unavailable: reward away",
        )  # fmt: skip

    def GetStatus(self, request: Any, context: grpc.ServicerContext) -> trainer_pb2.TrainerStatus:
        self._auth(context)
        return self._status()

    def Promote(self, request: Any, context: grpc.ServicerContext) -> trainer_pb2.TrainerStatus:
        self._auth(context)
        self.calls.append(("Promote", request.version, request.reason))
        self.serving = request.version
        return self._status()

    def Rollback(self, request: Any, context: grpc.ServicerContext) -> trainer_pb2.TrainerStatus:
        self._auth(context)
        if request.version >= self.serving:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"v{request.version} is not an earlier version")
        self.calls.append(("Rollback", request.version, request.reason))
        self.serving = request.version
        return self._status()


class FakePolicy(policy_pb2_grpc.PolicyServicer):
    def GetInfo(self, request: Any, context: grpc.ServicerContext) -> policy_pb2.PolicyInfo:
        return policy_pb2.PolicyInfo(model="starter", policy_version=3, device="cuda:0", running_sequences=2)


@pytest.fixture
def grpc_stubs() -> Iterator[tuple[FakeTrainer, int]]:
    server = grpc.server(futures.ThreadPoolExecutor(4))
    trainer = FakeTrainer()
    trainer_pb2_grpc.add_TrainerServicer_to_server(trainer, server)
    policy_pb2_grpc.add_PolicyServicer_to_server(FakePolicy(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield trainer, port
    server.stop(0)


def pod(name: str, component: str, grpc_port: int, ready: bool = True, ip: str | None = "127.0.0.1") -> dict:
    return {
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": {"app.kubernetes.io/component": component, "app.kubernetes.io/instance": "flywheel"},
        },
        "spec": {
            "nodeName": "gpu-1",
            "containers": [
                {"name": component, "ports": [{"name": "grpc", "containerPort": grpc_port}, {"name": "http", "containerPort": 1}]}
            ],
        },
        "status": {
            "phase": "Running" if ip else "Pending",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            "containerStatuses": [{"name": component, "restartCount": 1, "ready": ready, "image": "x", "imageID": "", "image_id": ""}],
        },
    }  # fmt: skip


def test_status_reports_pods_versions_trainer_and_lease(
    kube: tuple[FakeKube, str], grpc_stubs: tuple[FakeTrainer, int], capsys: pytest.CaptureFixture[str]
) -> None:
    fake, url = kube
    _, port = grpc_stubs
    fake.pods = [
        pod("flywheel-policy-1", "policy", port),
        pod("flywheel-policy-2", "policy", port, ready=False, ip=None),
        pod("flywheel-feedback-1", "feedback", 1),
        pod("flywheel-trainer-1", "trainer", port),
    ]
    assert lock_for(url, "flywheel-trainer-1").try_acquire_or_renew()
    fake.calls.clear()
    addr = f"127.0.0.1:{port}"
    argv = ["status", "-n", NS, "--api-server", url, "--trainer-addr", addr, "--token", TOKEN]
    assert ops.main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert fake.calls[0] == (
        "GET",
        f"/api/v1/namespaces/{NS}/pods",
        {"labelSelector": "app.kubernetes.io/name=flywheel,app.kubernetes.io/instance=flywheel"},
    )
    assert fake.calls[1][:2] == ("GET", LEASES + "/flywheel-trainer")
    pods = {p["name"]: p for p in out["pods"]}
    assert pods["flywheel-policy-1"]["info"]["policy_version"] == 3
    assert "info" not in pods["flywheel-policy-2"] and pods["flywheel-policy-2"]["ready"] is False
    assert out["lease"]["holder"] == "flywheel-trainer-1"
    assert out["trainer"]["step"] == 412 and out["trainer"]["consumer_lag"] == 17
    assert ops.main(argv) == 0
    text = capsys.readouterr().out
    assert "trainer: training step=412 serving=v3" in text and "lag=17" in text and "v3" in text
    assert "2 steps failed in a row; last: Unavailable: reward away" in text


def test_status_without_a_cluster_still_asks_the_trainer(
    grpc_stubs: tuple[FakeTrainer, int], capsys: pytest.CaptureFixture[str]
) -> None:
    _, port = grpc_stubs
    argv = ["status", "--api-server", "http://127.0.0.1:9", "--trainer-addr", f"127.0.0.1:{port}", "--token", TOKEN]
    assert ops.main([*argv, "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert "kubernetes_error" in out and out["trainer"]["step"] == 412


def test_promote_and_rollback_carry_the_admin_token(
    grpc_stubs: tuple[FakeTrainer, int], capsys: pytest.CaptureFixture[str]
) -> None:
    trainer, port = grpc_stubs
    addr = ["--trainer-addr", f"127.0.0.1:{port}"]
    assert ops.main(["promote", "7", *addr, "--token", TOKEN, "--reason", "canary looked good"]) == 0
    assert "serving v7" in capsys.readouterr().out
    assert ops.main(["rollback", "4", *addr, "--token", TOKEN, "--reason", "bad answers"]) == 0
    assert trainer.calls == [("Promote", 7, "canary looked good"), ("Rollback", 4, "bad answers")]
    assert ops.main(["rollback", "9", *addr, "--token", TOKEN]) == 1
    assert "FAILED_PRECONDITION: v9 is not an earlier version" in capsys.readouterr().err
    assert ops.main(["promote", "8", *addr, "--token", "wrong"]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert ops.main(["promote", "8", *addr, "--token", ""]) == 2
    assert "FLYWHEEL_ADMIN_TOKEN" in capsys.readouterr().err
    assert len(trainer.calls) == 2


def test_add_parser_plugs_into_the_flywheel_cli(grpc_stubs: tuple[FakeTrainer, int]) -> None:
    """services/flywheel/cli.py registers `ops` with add_parser(sub); the parsed args carry `run`."""
    import argparse

    trainer, port = grpc_stubs
    root = argparse.ArgumentParser(prog="flywheel")
    ops.add_parser(root.add_subparsers(dest="command", required=True))
    args = root.parse_args(["ops", "promote", "5", "--trainer-addr", f"127.0.0.1:{port}", "--token", TOKEN])
    assert args.run(args) == 0 and trainer.calls == [("Promote", 5, "")]
    with pytest.raises(SystemExit) as exc:
        root.parse_args(["ops", "status", "--help"])
    assert exc.value.code == 0
