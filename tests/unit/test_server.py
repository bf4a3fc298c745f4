"""ServiceServer: real gRPC and HTTP servers on 127.0.0.1, real clients, exact codes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from flywheel.core import errors
from flywheel.core.config import ConfigError
from flywheel.core.server import ServerConfig, ServiceServer, run_blocking, server_config
from flywheel.v1 import policy_pb2, policy_pb2_grpc, reward_pb2, reward_pb2_grpc

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parents[2]
# What an exception that escapes a handler may hold, and what must never reach a caller.
SECRET = "token sk-live-0123456789 in /etc/flywheel/secrets.yaml"
INTERNAL = re.compile(r"internal error \(reference ([0-9a-f]{12})\): the service log has the details")


def assert_internal(details: str, caplog: pytest.LogCaptureFixture, cause: str) -> None:
    """`details` is the fixed internal-error text, without `SECRET`; the log has its reference,
    the cause and the traceback."""
    assert "sk-live" not in details and "/etc/" not in details and ".py" not in details, details
    m = INTERNAL.fullmatch(details)
    assert m, details
    logged = [r for r in caplog.records if m.group(1) in r.getMessage()]
    assert len(logged) == 1, [r.getMessage() for r in caplog.records]
    assert cause in logged[0].getMessage() and logged[0].levelno == logging.ERROR
    assert logged[0].exc_info is not None and "Traceback" in caplog.text


class RewardServicer(reward_pb2_grpc.RewardServicer):
    def __init__(self) -> None:
        self.slow_started = asyncio.Event()

    async def Score(self, request, context):
        if not request.prompt:
            raise errors.InvalidArgument("prompt is empty: send the text the response answers")
        if request.prompt == "busy":
            raise errors.ResourceExhausted("queue full: retry later", retry_after_s=1.5)
        if request.prompt == "bug":
            raise RuntimeError(SECRET)
        if request.prompt == "corrupt":  # a FlywheelError whose status is internal: its text may hold paths
            raise errors.IntegrityError(
                "checkpoint /var/lib/flywheel/store/reward/v3: file 'model.safetensors' is missing"
            )
        if request.prompt == "abort":
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        if request.prompt == "slow":
            self.slow_started.set()
            await asyncio.sleep(0.8)
        return reward_pb2.ScoreResponse(score=len(request.response))


class PolicyServicer(policy_pb2_grpc.PolicyServicer):
    async def GenerateStream(self, request, context):
        for i, word in enumerate(request.prompt.split()):
            if word == "fail":
                raise errors.Unavailable("engine restarting: retry", retry_after_s=2)
            if word == "crash":
                raise KeyError(SECRET)
            yield policy_pb2.GenerateStreamResponse(text=f"{i}:{word}")


def run(coro_fn: Callable[[ServiceServer], Awaitable[None]], reward: RewardServicer | None = None, **cfg: Any) -> None:
    """Start a server on free ports, run the test body against it, always stop it."""

    async def main() -> None:
        server = ServiceServer(ServerConfig(host="127.0.0.1", grpc_port=0, http_port=0, grace_s=5, **cfg), name="test")
        server.add_servicer(reward_pb2_grpc.add_RewardServicer_to_server, reward or RewardServicer())
        server.add_servicer(policy_pb2_grpc.add_PolicyServicer_to_server, PolicyServicer())
        await server.start(handle_signals=False)
        try:
            await coro_fn(server)
        finally:
            await server.stop(grace=0)

    asyncio.run(main())


def channel(server: ServiceServer) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}")


async def http_get(server: ServiceServer, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{server.http_port}{path}") as r:
        return r.status, await r.text()


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match=r"ServerConfig.grpc_port = 70000: use a port in 0..65535"):
        ServerConfig(grpc_port=70000)
    with pytest.raises(ConfigError, match=r"ServerConfig.http_port = 9000: gRPC already uses port 9000"):
        ServerConfig(grpc_port=9000, http_port=9000)
    with pytest.raises(ConfigError, match=r"ServerConfig.max_concurrent_rpcs = 0"):
        ServerConfig(max_concurrent_rpcs=0)
    with pytest.raises(ConfigError, match=r"ServerConfig.max_concurrent_http = 0: use 1..100000"):
        ServerConfig(max_concurrent_http=0)
    with pytest.raises(ConfigError, match=r"ServerConfig.overload_retry_after_s = nan"):
        ServerConfig(overload_retry_after_s=float("nan"))
    with pytest.raises(ConfigError, match=r"ServerConfig.max_http_body_mb = 0"):
        ServerConfig(max_http_body_mb=0)
    with pytest.raises(ConfigError, match=r"ServerConfig.grace_s = -1"):
        ServerConfig(grace_s=-1)
    bounded = ServerConfig()  # every service is bounded by default
    assert bounded.max_concurrent_rpcs >= 1 and bounded.max_concurrent_http >= 1
    assert ServerConfig(grpc_port=0, http_port=0).grpc_port == 0
    cfg = server_config("reward")
    assert (cfg.grpc_port, cfg.http_port) == (50053, 8083)
    assert server_config("reward", grpc_port=1234).grpc_port == 1234


def test_unary_error_mapping_and_metrics(caplog: pytest.LogCaptureFixture) -> None:
    async def body(server: ServiceServer) -> None:
        assert server.grpc_port and server.http_port and server.grpc_port != server.http_port
        async with channel(server) as ch:
            score = reward_pb2_grpc.RewardStub(ch).Score
            ok = await score(reward_pb2.ScoreRequest(prompt="hi", response="abc"))
            assert ok.score == 3

            with pytest.raises(grpc.aio.AioRpcError) as e:
                await score(reward_pb2.ScoreRequest(prompt=""))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert e.value.details() == "prompt is empty: send the text the response answers"

            with pytest.raises(grpc.aio.AioRpcError) as e:
                await score(reward_pb2.ScoreRequest(prompt="busy"))
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert e.value.details() == "queue full: retry later"
            assert ("retry-after", "2") in tuple(e.value.trailing_metadata())

            with pytest.raises(grpc.aio.AioRpcError) as e:
                await score(reward_pb2.ScoreRequest(prompt="bug"))
            assert e.value.code() == grpc.StatusCode.INTERNAL
            assert_internal(e.value.details(), caplog, f"RuntimeError: {SECRET}")

            with pytest.raises(grpc.aio.AioRpcError) as e:
                await score(reward_pb2.ScoreRequest(prompt="corrupt"))
            assert e.value.code() == grpc.StatusCode.DATA_LOSS
            assert_internal(e.value.details(), caplog, "/var/lib/flywheel/store/reward/v3")

            with pytest.raises(grpc.aio.AioRpcError) as e:  # the handler's own abort passes through
                await score(reward_pb2.ScoreRequest(prompt="abort"))
            assert (e.value.code(), e.value.details()) == (grpc.StatusCode.NOT_FOUND, "no such thing")

            assert (await score(reward_pb2.ScoreRequest(prompt="still", response="up"))).score == 2

        status, text = await http_get(server, "/metrics")
        assert status == 200
        for code in ("OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "INTERNAL", "NOT_FOUND"):
            line = f'flywheel_grpc_requests_total{{code="{code}",method="Score",service="flywheel.v1.Reward"}}'
            assert line in text, code
        assert 'flywheel_grpc_latency_seconds_count{method="Score",service="flywheel.v1.Reward"}' in text

    run(body)


def test_bytes_that_are_not_a_message_are_invalid_argument_without_the_parsers_text() -> None:
    async def body(server: ServiceServer) -> None:
        async with channel(server) as ch:
            raw = ch.unary_unary("/flywheel.v1.Reward/Score")  # no serializer: the bytes go as they are
            # Field 1 (prompt, a string) holding two bytes that are not UTF-8.
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await raw(b"\x0a\x02\xff\xfe")
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert e.value.details().startswith("the request is not a valid flywheel.v1.ScoreRequest message")
            assert "Error parsing" not in e.value.details()
            ok = await reward_pb2_grpc.RewardStub(ch).Score(reward_pb2.ScoreRequest(prompt="hi", response="ab"))
            assert ok.score == 2

    run(body)


def test_server_streaming_errors(caplog: pytest.LogCaptureFixture) -> None:
    async def body(server: ServiceServer) -> None:
        async with channel(server) as ch:
            stream = policy_pb2_grpc.PolicyStub(ch).GenerateStream
            got = [m.text async for m in stream(policy_pb2.GenerateRequest(prompt="a b c"))]
            assert got == ["0:a", "1:b", "2:c"]

            call = stream(policy_pb2.GenerateRequest(prompt="a b fail c"))
            got = []
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for m in call:
                    got.append(m.text)
            assert got == ["0:a", "1:b"]
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert e.value.details() == "engine restarting: retry"
            assert ("retry-after", "2") in tuple(e.value.trailing_metadata())

            with pytest.raises(grpc.aio.AioRpcError) as e:
                _ = [m async for m in stream(policy_pb2.GenerateRequest(prompt="x crash"))]
            assert e.value.code() == grpc.StatusCode.INTERNAL
            assert_internal(e.value.details(), caplog, SECRET)

            with pytest.raises(grpc.aio.AioRpcError) as e:  # not implemented by the test servicer
                await policy_pb2_grpc.PolicyStub(ch).Generate(policy_pb2.GenerateRequest(prompt="x"))
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED

        _, text = await http_get(server, "/metrics")
        assert 'code="UNAVAILABLE",method="GenerateStream",service="flywheel.v1.Policy"' in text

    run(body)


def test_health_and_reflection() -> None:
    async def body(server: ServiceServer) -> None:
        async with channel(server) as ch:
            check = health_pb2_grpc.HealthStub(ch).Check
            for name in ("", "flywheel.v1.Reward", "flywheel.v1.Policy"):
                r = await check(health_pb2.HealthCheckRequest(service=name))
                assert r.status == health_pb2.HealthCheckResponse.NOT_SERVING, name
            assert await http_get(server, "/health") == (503, '{"error": "not serving", "error_type": "unavailable"}')
            assert (await http_get(server, "/live"))[0] == 200

            await server.set_serving(True)
            for name in ("", "flywheel.v1.Reward", "flywheel.v1.Policy"):
                r = await check(health_pb2.HealthCheckRequest(service=name))
                assert r.status == health_pb2.HealthCheckResponse.SERVING, name
            assert await http_get(server, "/health") == (200, "")

            with pytest.raises(grpc.aio.AioRpcError) as e:
                await check(health_pb2.HealthCheckRequest(service="nope"))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            assert e.value.details() == (
                "unknown service 'nope': the services are '', 'flywheel.v1.Policy', 'flywheel.v1.Reward'"
            )
            with pytest.raises(grpc.aio.AioRpcError) as e:  # a huge name is not echoed back whole
                await check(health_pb2.HealthCheckRequest(service="x" * 1_000_000))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND and len(e.value.details()) < 300

            info = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo
            responses = [r async for r in info(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))]
            names = {s.name for s in responses[0].list_services_response.service}
            assert {"flywheel.v1.Reward", "flywheel.v1.Policy", "grpc.health.v1.Health"} <= names
            assert "grpc.reflection.v1alpha.ServerReflection" in names

    run(body)


def test_http_routes_and_error_middleware(caplog: pytest.LogCaptureFixture) -> None:
    from aiohttp import web

    async def boom(request: web.Request) -> web.Response:
        kind = request.match_info["kind"]
        if kind == "busy":
            raise errors.ResourceExhausted("too many requests", retry_after_s=3)
        if kind == "bad":
            raise errors.InvalidArgument("`inputs` must not be empty")
        if kind == "engine":  # as the policy engine fails the answers of a step that raised
            raise errors.FlywheelError(f"generation failed: OSError: {SECRET}")
        raise ValueError(SECRET)

    async def main() -> None:
        server = ServiceServer(ServerConfig(host="127.0.0.1", grpc_port=0, http_port=0), name="http")
        server.http_app.router.add_get("/boom/{kind}", boom)
        await server.start(handle_signals=False)
        base = f"http://127.0.0.1:{server.http_port}"
        try:
            async with aiohttp.ClientSession() as s:
                async with s.get(f"{base}/boom/busy") as r:
                    assert r.status == 429 and r.headers["Retry-After"] == "3"
                    assert await r.json() == {"error": "too many requests", "error_type": "overloaded"}
                async with s.get(f"{base}/boom/bad") as r:
                    assert r.status == 422
                    assert await r.json() == {"error": "`inputs` must not be empty", "error_type": "validation"}
                for kind, cause in (("other", SECRET), ("engine", "generation failed")):
                    async with s.get(f"{base}/boom/{kind}") as r:
                        assert r.status == 500
                        body = await r.json()
                        assert body["error_type"] == "internal" and set(body) == {"error", "error_type"}
                        assert_internal(body["error"], caplog, cause)
                async with s.get(f"{base}/nope") as r:
                    assert r.status == 404
                async with s.get(f"{base}/metrics") as r:
                    assert (
                        'flywheel_http_requests_total{method="GET",route="/boom/{kind}",status="429"}' in await r.text()
                    )
        finally:
            await server.stop()

    asyncio.run(main())


def test_graceful_stop_finishes_inflight_rpc() -> None:
    servicer = RewardServicer()

    async def body(server: ServiceServer) -> None:
        await server.set_serving(True)
        async with channel(server) as ch:
            slow = asyncio.ensure_future(
                reward_pb2_grpc.RewardStub(ch).Score(reward_pb2.ScoreRequest(prompt="slow", response="xy"))
            )
            await servicer.slow_started.wait()
            watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service="flywheel.v1.Reward"))
            watched = [(await watch.read()).status]
            started = time.monotonic()
            stopping = asyncio.ensure_future(server.stop(grace=5))
            watched.append((await watch.read()).status)  # the stop began: inside the drain window now
            r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
            assert r.status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert (await http_get(server, "/health"))[0] == 503
            await server.set_serving(True)  # ignored once shutdown began
            assert not server.serving
            assert (await slow).score == 2  # the in-flight RPC completed
            await stopping
            with pytest.raises(grpc.aio.AioRpcError) as e:  # an open Watch does not hold the stop for grace_s
                while (r := await watch.read()) is not grpc.aio.EOF:
                    watched.append(r.status)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert watched == [health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING]
            assert time.monotonic() - started < 3
            await asyncio.wait_for(server.wait(), 1)
        async with channel(server) as ch:  # new RPCs are refused now
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await reward_pb2_grpc.RewardStub(ch).Score(reward_pb2.ScoreRequest(prompt="x"), timeout=2)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE

    run(body, servicer, drain_s=0.4)


def test_run_blocking_runs_off_the_loop() -> None:
    import threading

    async def main() -> None:
        loop_thread = threading.get_ident()
        ident = await run_blocking(lambda x: (threading.get_ident(), x * 2), 21)
        assert ident[0] != loop_thread and ident[1] == 42

    asyncio.run(main())


SERVER_SCRIPT = textwrap.dedent(
    """
    import sys
    from flywheel.core.server import ServerConfig, ServiceServer, serve
    from flywheel.v1 import reward_pb2_grpc

    async def setup(server):
        await server.set_serving(True)
        print(f"READY {server.grpc_port} {server.http_port}", flush=True)

    server = ServiceServer(ServerConfig(host="127.0.0.1", grpc_port=0, http_port=0, grace_s=2), name="sub")
    server.add_servicer(reward_pb2_grpc.add_RewardServicer_to_server, reward_pb2_grpc.RewardServicer())
    serve(server, setup)
    print("EXITED", flush=True)
    """
)


@contextlib.contextmanager
def spawned(args: list[str]) -> Iterator[subprocess.Popen]:
    """A child process with text pipes, killed on the way out if it is still running."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_exits_cleanly() -> None:
    with spawned([sys.executable, "-c", SERVER_SCRIPT]) as proc:
        line = proc.stdout.readline()
        assert line.startswith("READY"), line + proc.stderr.read()
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert "EXITED" in out
        assert time.monotonic() - started < 5


WATCHED_SCRIPT = textwrap.dedent(
    """
    import sys, threading, time
    from flywheel.core.server import ServerConfig, ServiceServer, run_blocking, serve
    from flywheel.v1 import reward_pb2_grpc

    died = []

    def loop():  # a background loop that dies after a while, as a Kafka consumer's might
        time.sleep(1.0)
        died.append(RuntimeError("commit refused"))

    async def setup(server):
        threading.Thread(target=loop, daemon=True).start()
        server.watch("the test loop", lambda: died[0] if died else None)
        await server.set_serving(True)
        print("READY", flush=True)
        await run_blocking(time.sleep, 600)  # a blocking call that hangs (a connect to a broker that is gone)

    server = ServiceServer(ServerConfig(host="127.0.0.1", grpc_port=0, http_port=0, grace_s=2), name="sub")
    server.add_servicer(reward_pb2_grpc.add_RewardServicer_to_server, reward_pb2_grpc.RewardServicer())
    sys.exit(serve(server, setup, cleanup=lambda: print("CLEANED UP", flush=True)))
    """
)


def test_a_watched_part_that_dies_stops_the_service_with_exit_code_1() -> None:
    with spawned([sys.executable, "-c", WATCHED_SCRIPT]) as proc:
        out, err = proc.communicate(timeout=20)
    assert "READY" in out and "CLEANED UP" in out and proc.returncode == 1, err
    assert "sub: the test loop died (RuntimeError('commit refused')); stopping with exit code 1" in err


def test_a_service_stops_when_the_process_that_started_it_dies() -> None:
    """`flywheel up` sets FLYWHEEL_PARENT_PID: SIGKILLed, it cannot stop its services, so they stop themselves."""
    # sh starts the service and waits for it; the service's stdout is our pipe.
    script = 'FLYWHEEL_PARENT_PID=$$ "$0" -c "$1"; echo "sh: service exited"'
    with spawned(["sh", "-c", script, sys.executable, SERVER_SCRIPT]) as sh:
        line = sh.stdout.readline()
        assert line.startswith("READY"), line
        sh.kill()  # the service is orphaned now
        out, err = sh.communicate(timeout=15)  # EOF: every holder of the pipes (the service) has exited
    assert "sh: service exited" not in out  # sh itself was gone before the service exited
    assert "the process that started it (pid" in err and "stopping with exit code 1" in err


def test_port_in_use_is_a_clear_error() -> None:
    async def body(server: ServiceServer) -> None:
        for grpc_port, http_port, what in ((server.grpc_port, 0, "gRPC"), (0, server.http_port, "HTTP")):
            other = ServiceServer(ServerConfig(host="127.0.0.1", grpc_port=grpc_port, http_port=http_port))
            with pytest.raises(OSError, match=f"cannot bind {what} to 127.0.0.1:"):
                await other.start(handle_signals=False)
            await other.stop(grace=0)

    run(body)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_metrics_port_config_validation() -> None:
    assert ServerConfig().metrics_port == 0  # /metrics on the HTTP port unless asked
    with pytest.raises(ConfigError) as e:
        ServerConfig(grpc_port=9000, http_port=9001, metrics_port=9001)
    assert str(e.value) == (
        "ServerConfig.metrics_port = 9001: gRPC or HTTP already uses this port; give /metrics its own port "
        "(0: /metrics on the HTTP port)"
    )
    with pytest.raises(ConfigError, match=r"ServerConfig.metrics_port = 9000: gRPC or HTTP already uses"):
        ServerConfig(grpc_port=9000, http_port=9001, metrics_port=9000)
    with pytest.raises(ConfigError, match=r"ServerConfig.metrics_port = 70000: use a port in 0..65535"):
        ServerConfig(metrics_port=70000)


def test_metrics_on_their_own_port_and_not_on_the_api_port() -> None:
    async def body(server: ServiceServer) -> None:
        assert server.metrics_port == server.config.metrics_port != server.http_port
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{server.metrics_port}/metrics") as r:
                assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
                assert "flywheel_serving " in await r.text()
            for path in ("/health", "/live", "/nope"):  # the metrics port serves /metrics alone
                async with s.get(f"http://127.0.0.1:{server.metrics_port}{path}") as r:
                    assert r.status == 404, path
        assert (await http_get(server, "/metrics"))[0] == 404  # gone from the API port
        assert (await http_get(server, "/live")) == (200, "")  # the API port keeps its probes
        assert (await http_get(server, "/health"))[0] == 503  # not serving yet

    run(body, metrics_port=free_port())

    async def shared(server: ServiceServer) -> None:  # metrics_port 0: as before, on the HTTP port
        assert server.metrics_port == server.http_port
        status, text = await http_get(server, "/metrics")
        assert status == 200 and "flywheel_serving " in text

    run(shared)


def test_metrics_port_in_use_is_a_clear_error() -> None:
    async def body(server: ServiceServer) -> None:
        taken = server.metrics_port
        other = ServiceServer(ServerConfig(host="127.0.0.1", grpc_port=0, http_port=0, metrics_port=taken))
        with pytest.raises(OSError, match=f"cannot bind /metrics to 127.0.0.1:{taken} .*FLYWHEEL_SERVER_METRICS_PORT"):
            await other.start(handle_signals=False)
        await other.stop(grace=0)

    run(body, metrics_port=free_port())


def _issue(tmp: Path, ca: tuple[Any, Any] | None, cn: str, *, server: bool) -> tuple[Any, Any, str, str]:
    """(cert, key, cert file, key file); `ca` None: a self-signed CA."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    issuer_cert, issuer_key = ca if ca is not None else (None, key)
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_cert.subject if issuer_cert is not None else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if ca is None:
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    elif server:
        sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    cert = b.sign(issuer_key, hashes.SHA256())
    cert_file, key_file = tmp / f"{cn}.crt", tmp / f"{cn}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert, key, str(cert_file), str(key_file)


def test_the_metrics_port_serves_tls_and_needs_a_client_certificate_under_mutual_tls(tmp_path: Path) -> None:
    """Prometheus scrapes the metrics port like any client: TLS with the service's certificate and,
    under mutual TLS, a client certificate (ServiceMonitor tlsConfig); no probe is exempt there."""
    import ssl

    from flywheel.core.tls import TlsConfig

    ca_cert, ca_key, ca_file, _ = _issue(tmp_path, None, "ca", server=False)
    _, _, server_crt, server_key = _issue(tmp_path, (ca_cert, ca_key), "server", server=True)
    _, _, client_crt, client_key = _issue(tmp_path, (ca_cert, ca_key), "prometheus", server=False)
    tls = TlsConfig(cert_file=server_crt, key_file=server_key, client_ca_file=ca_file)

    def context(with_cert: bool) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=ca_file)
        if with_cert:
            ctx.load_cert_chain(client_crt, client_key)
        return ctx

    async def main() -> None:
        cfg = ServerConfig(host="127.0.0.1", grpc_port=0, http_port=0, metrics_port=free_port())
        server = ServiceServer(cfg, name="tls", tls=tls)
        await server.start(handle_signals=False)
        url = f"https://127.0.0.1:{server.metrics_port}/metrics"
        try:
            async with aiohttp.ClientSession() as s:
                async with s.get(url, ssl=context(True)) as r:
                    assert r.status == 200 and "flywheel_serving " in await r.text()
                async with s.get(url, ssl=context(False)) as r:
                    assert r.status == 401
                    assert "requires a client certificate (mutual TLS)" in (await r.json())["error"]
                with pytest.raises(aiohttp.ClientError):  # no plaintext on a TLS service's metrics port
                    async with s.get(f"http://127.0.0.1:{server.metrics_port}/metrics") as r:
                        await r.read()
                async with s.get(f"https://127.0.0.1:{server.http_port}/health", ssl=context(False)) as r:
                    assert r.status == 503  # the API port's probes stay exempt
        finally:
            await server.stop(grace=0)

    asyncio.run(main())
