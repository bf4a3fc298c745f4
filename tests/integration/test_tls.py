"""TLS end to end, with certificates this module makes (a CA, a server, a client, and a rogue CA
whose certificates nobody trusts):

- a ServiceServer over TLS and mutual TLS: gRPC (health, reflection) and HTTP answer TLS clients
  only; under mutual TLS a client without a trusted certificate is refused (HTTP probes excepted);
  a rotated certificate is served without a restart;
- the clients the project ships: `flywheel ops` and `flywheel up`'s health probe over TLS;
- the real feedback service process over mutual TLS, writing to Kafka over SSL with a client
  certificate; the event read back over SASL_SSL (SCRAM-SHA-512);
- the bus (admin, producer, consumer) over SSL and SASL_SSL against a real Apache Kafka broker
  with both listeners, started once for this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import ipaddress
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from kafka import KafkaConsumer, TopicPartition

from flywheel.core import bus, errors
from flywheel.core.auth import AuthConfig
from flywheel.core.brokers import free_port
from flywheel.core.config import ConfigError, KafkaConfig, TopicsConfig
from flywheel.core.server import ServerConfig, ServiceServer
from flywheel.core.tls import RELOAD_CHECK_S, TlsConfig, channel
from flywheel.loop.supervisor import health_status
from flywheel.ops import __main__ as ops
from flywheel.testing import wait_for
from flywheel.v1 import events_pb2, feedback_pb2, feedback_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from tools.kafka import ApacheKafka, BrokerTls

pytestmark = pytest.mark.timeout(240)

SCRAM_USER, SCRAM_PASSWORD = "flywheel-svc", "scram-secret-0123"
HMAC_KEY = "tls-test-hmac-key-0123456789abcdef"
ADMIN = "tls-admin-token"


# ---------------------------------------------------------------- certificates


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class CA:
    """A certificate authority that writes its certificate and the pairs it issues under `dir`."""

    def __init__(self, dir: Path, name: str) -> None:
        self.dir, self.key = dir, ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.file = str(dir / f"{name}.pem")
        Path(self.file).write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, cn: str, *, client: bool = False, expired: bool = False, password: bytes | None = None):
        """(cert file, key file): a server certificate for localhost and 127.0.0.1, or a client one."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        end = now - datetime.timedelta(hours=1) if expired else now + datetime.timedelta(days=1)
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(end)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if not client:
            sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_file, key_file = self.dir / f"{cn}.crt", self.dir / f"{cn}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
        key_file.write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
        )
        return str(cert_file), str(key_file)


@dataclasses.dataclass
class Pki:
    dir: Path
    ca: CA
    rogue: CA  # nobody trusts it
    server: tuple[str, str]
    client: tuple[str, str]
    rogue_client: tuple[str, str]

    def server_tls(self, mutual: bool = False) -> TlsConfig:
        cert, key = self.server
        return TlsConfig(cert_file=cert, key_file=key, client_ca_file=self.ca.file if mutual else "")

    def client_tls(self, with_cert: bool = True, ca: CA | None = None, rogue_cert: bool = False) -> TlsConfig:
        cert, key = self.rogue_client if rogue_cert else self.client if with_cert else ("", "")
        return TlsConfig(ca_file=(ca or self.ca).file, client_cert_file=cert, client_key_file=key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, rogue = CA(d, "flywheel-test-ca"), CA(d, "rogue-ca")
    ca.issue("expired", expired=True)  # for the config errors
    ca.issue("locked", password=b"secret")
    return Pki(d, ca, rogue, ca.issue("server"), ca.issue("client", client=True), rogue.issue("rogue", client=True))


# ---------------------------------------------------------------- a ServiceServer on its own loop


class TrainerStub(trainer_pb2_grpc.TrainerServicer):
    """Answers what `flywheel ops` asks, checking the admin token as the trainer does."""

    def __init__(self) -> None:
        self.serving = 3

    async def _status(self, context: grpc.aio.ServicerContext) -> trainer_pb2.TrainerStatus:
        if dict(context.invocation_metadata()).get("authorization") != f"Bearer {ADMIN}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "admin token missing or wrong")
        return trainer_pb2.TrainerStatus(state="training", step=12, serving_version=self.serving)

    async def GetStatus(self, request: Any, context: grpc.aio.ServicerContext) -> trainer_pb2.TrainerStatus:
        return await self._status(context)

    async def Promote(self, request: Any, context: grpc.aio.ServicerContext) -> trainer_pb2.TrainerStatus:
        self.serving = request.version
        return await self._status(context)


@contextlib.contextmanager
def serving(tls: TlsConfig) -> Iterator[ServiceServer]:
    """A ServiceServer with the Trainer stub, SERVING, on an event loop in a thread of its own
    (so that this thread's blocking clients can call it)."""
    loop = asyncio.new_event_loop()
    started: list[ServiceServer | BaseException] = []
    ready = threading.Event()

    async def run() -> None:
        try:
            server = ServiceServer(ServerConfig(host="127.0.0.1", grpc_port=0, http_port=0, grace_s=0), "tls", tls=tls)
            server.add_servicer(trainer_pb2_grpc.add_TrainerServicer_to_server, TrainerStub())
            await server.start(handle_signals=False)
            await server.set_serving(True)
        except BaseException as e:
            started.append(e)
            ready.set()
            raise
        started.append(server)
        ready.set()
        await server.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    assert ready.wait(20), "the server did not start"
    server = started[0]
    if isinstance(server, BaseException):
        raise server
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop)  # run() returns once it stopped
        thread.join(20)
        assert not thread.is_alive(), "the server did not stop"
        loop.close()


def health(port: int, tls: TlsConfig) -> str:
    """grpc.health.v1 Check over a new channel (a new handshake): the status name or the error code."""
    with channel(f"127.0.0.1:{port}", tls) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as e:
            return e.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def https(port: int, path: str, tls: TlsConfig | None) -> tuple[int, str]:
    """GET over HTTPS (TLS client settings `tls`) or, with None, plain HTTP: (status, body)."""
    scheme, ctx = ("https", tls.client_ssl_context()) if tls is not None else ("http", None)
    try:
        with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}{path}", context=ctx, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


# ---------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"key_file": "server.key"}, "TlsConfig.key_file = '{server.key}': set cert_file too"),
        ({"cert_file": "server.crt"}, "TlsConfig.cert_file = '{server.crt}': set key_file too"),
        ({"cert_file": "missing.crt", "key_file": "server.key"}, "TlsConfig.cert_file = '{missing.crt}': no such file"),
        (
            {"cert_file": "server.crt", "key_file": "client.key"},
            "TlsConfig.key_file = '{client.key}': this key does not belong to the certificate in cert_file",
        ),
        (
            {"cert_file": "expired.crt", "key_file": "expired.key"},
            "TlsConfig.cert_file = '{expired.crt}': the certificate expired at",
        ),
        (
            {"cert_file": "locked.crt", "key_file": "locked.key"},
            "TlsConfig.key_file = '{locked.key}': the key is encrypted",
        ),
        ({"client_ca_file": "flywheel-test-ca.pem"}, "mutual TLS needs the server's own certificate"),
        ({"ca_file": "server.key"}, "TlsConfig.ca_file = '{server.key}': holds no PEM certificate"),
        (
            {"client_cert_file": "client.crt", "client_key_file": "client.key"},
            "TlsConfig.client_cert_file = '{client.crt}': clients use TLS only when ca_file is set",
        ),
        (
            {"ca_file": "flywheel-test-ca.pem", "client_key_file": "client.key"},
            "TlsConfig.client_key_file = '{client.key}': set client_cert_file too",
        ),
    ],
)
def test_tls_config_names_the_field_and_the_fix(pki: Pki, fields: dict[str, str], message: str) -> None:
    paths = {k: str(pki.dir / v) for k, v in fields.items()}
    with pytest.raises(ConfigError) as e:
        TlsConfig(**paths)
    expected = message
    for name in fields.values():
        expected = expected.replace("{" + name + "}", str(pki.dir / name))
    assert expected in str(e.value)


def test_kafka_ssl_settings_are_checked(pki: Pki) -> None:
    cert, key = pki.client
    cases = [
        ({"ssl_cafile": pki.ca.file}, "security_protocol is PLAINTEXT, which does not use TLS: use SSL or SASL_SSL"),
        ({"security_protocol": "SSL", "ssl_keyfile": key}, f"KafkaConfig.ssl_keyfile = {key!r}: set ssl_certfile"),
        (
            {"security_protocol": "SSL", "ssl_certfile": cert, "ssl_keyfile": pki.server[1]},
            "this key does not belong to the certificate in ssl_certfile",
        ),
        (
            {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "u"},
            "KafkaConfig.sasl_password = '': SCRAM-SHA-512 needs the user name and password",
        ),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError) as e:
            KafkaConfig(bootstrap="127.0.0.1:1", **kwargs)
        assert message in str(e.value), kwargs
    ok = KafkaConfig(
        bootstrap="127.0.0.1:1", security_protocol="SSL", ssl_cafile=pki.ca.file, ssl_certfile=cert, ssl_keyfile=key
    )
    opts = ok.client_options()
    assert (opts["ssl_cafile"], opts["ssl_certfile"], opts["ssl_keyfile"], opts["ssl_check_hostname"]) == (
        pki.ca.file,
        cert,
        key,
        True,
    )


# ---------------------------------------------------------------- gRPC and HTTP servers


def test_a_tls_server_answers_tls_clients_only(pki: Pki) -> None:
    with serving(pki.server_tls()) as server:
        assert health(server.grpc_port, pki.client_tls(with_cert=False)) == "SERVING"
        assert health(server.grpc_port, TlsConfig()) == "UNAVAILABLE"  # plaintext
        assert health(server.grpc_port, pki.client_tls(with_cert=False, ca=pki.rogue)) == "UNAVAILABLE"
        with channel(f"127.0.0.1:{server.grpc_port}", pki.client_tls(with_cert=False)) as ch:
            services = set(ProtoReflectionDescriptorDatabase(ch).get_services())
        assert {"flywheel.v1.Trainer", "grpc.health.v1.Health"} <= services
        assert https(server.http_port, "/health", pki.client_tls(with_cert=False)) == (200, "")
        assert https(server.http_port, "/metrics", pki.client_tls(with_cert=False))[0] == 200
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            https(server.http_port, "/health", pki.client_tls(with_cert=False, ca=pki.rogue))
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            https(server.http_port, "/health", None)  # plain HTTP to the TLS port: the handshake fails


def test_mutual_tls_refuses_clients_without_a_trusted_certificate(pki: Pki) -> None:
    with serving(pki.server_tls(mutual=True)) as server:
        assert health(server.grpc_port, pki.client_tls()) == "SERVING"
        assert health(server.grpc_port, pki.client_tls(with_cert=False)) == "UNAVAILABLE"
        assert health(server.grpc_port, pki.client_tls(rogue_cert=True)) == "UNAVAILABLE"
        assert health(server.grpc_port, TlsConfig()) == "UNAVAILABLE"
        assert https(server.http_port, "/metrics", pki.client_tls())[0] == 200
        # The kubelet's probes present no certificate: /health and /live answer, nothing else.
        assert https(server.http_port, "/health", pki.client_tls(with_cert=False)) == (200, "")
        assert https(server.http_port, "/live", pki.client_tls(with_cert=False)) == (200, "")
        status, body = https(server.http_port, "/metrics", pki.client_tls(with_cert=False))
        assert status == 401
        assert '"error_type": "unauthenticated"' in body
        assert "this server requires a client certificate (mutual TLS)" in body
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            https(server.http_port, "/metrics", pki.client_tls(rogue_cert=True))


def test_a_rotated_certificate_is_served_without_a_restart(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(pki.server[0], cert)
    shutil.copy(pki.server[1], key)
    with serving(TlsConfig(cert_file=str(cert), key_file=str(key))) as server:
        old, new = pki.client_tls(with_cert=False), pki.client_tls(with_cert=False, ca=pki.rogue)
        assert (health(server.grpc_port, old), health(server.grpc_port, new)) == ("SERVING", "UNAVAILABLE")
        rogue_cert, rogue_key = pki.rogue.issue("rotated")
        shutil.copy(rogue_cert, cert)  # half-written: the key does not match yet, the old pair stays
        time.sleep(RELOAD_CHECK_S + 0.2)  # past the interval between looks at the files
        assert health(server.grpc_port, old) == "SERVING"
        assert "TLS files changed but do not load" in caplog.text
        assert https(server.http_port, "/health", old) == (200, "")
        assert server.certificates is not None and server.certificates.reloads == 0
        shutil.copy(rogue_key, key)
        wait_for(lambda: health(server.grpc_port, new) == "SERVING", 10, "gRPC to serve the new certificate")
        assert health(server.grpc_port, old) == "UNAVAILABLE"
        assert https(server.http_port, "/health", new) == (200, "")
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            https(server.http_port, "/health", old)
        assert server.certificates.reloads == 1


# ---------------------------------------------------------------- the clients the project ships


def test_flywheel_ops_over_mutual_tls(pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    cert, key = pki.client
    with serving(pki.server_tls(mutual=True)) as server:
        addr = ["--trainer-addr", f"127.0.0.1:{server.grpc_port}", "--token", ADMIN]
        flags = ["--tls-ca-file", pki.ca.file, "--tls-cert-file", cert, "--tls-key-file", key]
        assert ops.main(["promote", "7", *addr, *flags]) == 0
        assert "promote v7: serving v7 (trainer training, step 12)" in capsys.readouterr().out
        assert ops.main(["promote", "8", *addr, "--tls-ca-file", pki.ca.file]) == 1  # no client certificate
        assert "flywheel ops promote v8: UNAVAILABLE" in capsys.readouterr().err
        assert ops.main(["promote", "8", *addr]) == 1  # plaintext
        assert "flywheel ops promote v8: UNAVAILABLE" in capsys.readouterr().err
        assert ops.main(["promote", "8", *addr, "--tls-ca-file", pki.ca.file, "--tls-cert-file", cert]) == 2
        assert f"TlsConfig.client_cert_file = {cert!r}: set client_key_file too" in capsys.readouterr().err
        no_cluster = ["--api-server", "http://127.0.0.1:9", "--json"]
        assert ops.main(["status", *addr, *flags, *no_cluster]) == 1  # no Kubernetes here: exit 1
        assert '"serving_version": 7' in capsys.readouterr().out


def test_the_supervisors_health_probe_uses_the_tls_settings(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = pki.client
    with serving(pki.server_tls(mutual=True)) as server:
        addr = f"127.0.0.1:{server.grpc_port}"
        assert health_status(addr) == "UNAVAILABLE"
        monkeypatch.setenv("FLYWHEEL_TLS_CA_FILE", pki.ca.file)
        monkeypatch.setenv("FLYWHEEL_TLS_CLIENT_CERT_FILE", cert)
        monkeypatch.setenv("FLYWHEEL_TLS_CLIENT_KEY_FILE", key)
        assert health_status(addr) == "SERVING"


# ---------------------------------------------------------------- Kafka over SSL and SASL_SSL


@pytest.fixture(scope="module")
def secure_kafka(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApacheKafka]:
    """One Apache Kafka for the module: SSL (client certificates required) and SASL_SSL (SCRAM)."""
    cert, key = pki.server
    tls = BrokerTls(pki.ca.file, cert, key, scram_users=((SCRAM_USER, SCRAM_PASSWORD),))
    broker = ApacheKafka(data_dir=tmp_path_factory.mktemp("secure-kafka"), tls=tls)
    broker.start(timeout_s=120)
    try:
        yield broker
    finally:
        broker.stop()


def kafka_ssl(pki: Pki, broker: ApacheKafka, with_cert: bool = True) -> KafkaConfig:
    cert, key = pki.client if with_cert else ("", "")
    return KafkaConfig(
        bootstrap=broker.ssl_bootstrap,
        security_protocol="SSL",
        ssl_cafile=pki.ca.file,
        ssl_certfile=cert,
        ssl_keyfile=key,
        session_timeout_ms=6000,
        request_timeout_ms=8000,
    )


def kafka_scram(pki: Pki, broker: ApacheKafka, password: str = SCRAM_PASSWORD) -> KafkaConfig:
    return KafkaConfig(
        bootstrap=broker.sasl_ssl_bootstrap,
        security_protocol="SASL_SSL",
        ssl_cafile=pki.ca.file,
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username=SCRAM_USER,
        sasl_password=password,
        session_timeout_ms=6000,
        request_timeout_ms=8000,
    )


def new_topics() -> TopicsConfig:
    prefix = f"t{uuid.uuid4().hex[:10]}."
    d = TopicsConfig()
    fields = ("interactions", "feedback", "preferences", "policy_updates", "reward_updates", "dlq")
    return TopicsConfig(**{f: prefix + getattr(d, f) for f in fields}, partitions=1)


@pytest.mark.kafka
@pytest.mark.parametrize("listener", ["SSL", "SASL_SSL"])
def test_the_bus_produces_and_consumes_over_tls(pki: Pki, secure_kafka: ApacheKafka, listener: str) -> None:
    kafka = kafka_ssl(pki, secure_kafka) if listener == "SSL" else kafka_scram(pki, secure_kafka)
    topics = new_topics()
    assert set(bus.ensure_topics(kafka, topics)) == set(topics.all())
    with bus.Producer(kafka) as producer:
        for i in range(3):
            producer.send(topics.interactions, f"k{i}", events_pb2.Interaction(interaction_id=f"{listener}-{i}"))
        producer.flush(20)
    got: list[bus.Record] = []
    consumer = bus.Consumer(kafka, f"g-{listener}", {topics.interactions: events_pb2.Interaction}, got.append)
    consumer.start()
    try:
        wait_for(lambda: len(got) >= 3 or consumer.error is not None, 60, f"3 records over {listener}")
    finally:
        consumer.stop()
    assert consumer.error is None
    assert [r.value.interaction_id for r in got] == [f"{listener}-{i}" for i in range(3)]


@pytest.mark.kafka
def test_kafka_refuses_clients_without_their_credentials(pki: Pki, secure_kafka: ApacheKafka) -> None:
    topics = new_topics()
    with pytest.raises(errors.Unavailable, match=f"cannot reach Kafka at '{secure_kafka.ssl_bootstrap}'"):
        bus.ensure_topics(kafka_ssl(pki, secure_kafka, with_cert=False), topics, timeout_s=5)
    with pytest.raises(errors.Unavailable, match=f"cannot reach Kafka at '{secure_kafka.sasl_ssl_bootstrap}'"):
        bus.ensure_topics(kafka_scram(pki, secure_kafka, password="wrong-password"), topics, timeout_s=5)
    # Nothing was created by the refused clients; with the credentials the same call works.
    assert set(bus.ensure_topics(kafka_ssl(pki, secure_kafka), topics)) == set(topics.all())


# ---------------------------------------------------------------- a real service, end to end


@pytest.mark.kafka
def test_the_feedback_service_over_mutual_tls_writes_to_kafka_over_ssl(
    pki: Pki, secure_kafka: ApacheKafka, tmp_path: Path
) -> None:
    kafka, topics = kafka_ssl(pki, secure_kafka), new_topics()
    bus.ensure_topics(kafka, topics)
    cert, key = pki.server
    ccert, ckey = pki.client
    grpc_port, http_port = free_port(), free_port()
    env = {
        **os.environ,
        "FLYWHEEL_TLS_CERT_FILE": cert,
        "FLYWHEEL_TLS_KEY_FILE": key,
        "FLYWHEEL_TLS_CLIENT_CA_FILE": pki.ca.file,
        "FLYWHEEL_KAFKA_BOOTSTRAP": kafka.bootstrap,
        "FLYWHEEL_KAFKA_SECURITY_PROTOCOL": "SSL",
        "FLYWHEEL_KAFKA_SSL_CAFILE": pki.ca.file,
        "FLYWHEEL_KAFKA_SSL_CERTFILE": ccert,
        "FLYWHEEL_KAFKA_SSL_KEYFILE": ckey,
        "FLYWHEEL_AUTH_HMAC_KEY": HMAC_KEY,
        "FLYWHEEL_TOPICS_FEEDBACK": topics.feedback,
        "FLYWHEEL_TOPICS_DLQ": topics.dlq,
        "FLYWHEEL_TOPICS_PARTITIONS": "1",
        "FLYWHEEL_SERVER_GRACE_S": "1",
    }
    ports = ["--grpc-port", str(grpc_port), "--http-port", str(http_port), "--host", "127.0.0.1"]
    log = tmp_path / "feedback.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flywheel.feedback", *ports, "--state-dir", str(tmp_path / "state")],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def up() -> bool:
            assert proc.poll() is None, f"the service exited: {log.read_text()[-3000:]}"
            return health(grpc_port, pki.client_tls()) == "SERVING"

        wait_for(up, 60, "the feedback service to serve over mutual TLS", poll_s=0.2)
        assert health(grpc_port, TlsConfig()) == "UNAVAILABLE"
        assert health(grpc_port, pki.client_tls(with_cert=False)) == "UNAVAILABLE"
        assert https(http_port, "/health", pki.client_tls(with_cert=False)) == (200, "")
        token = AuthConfig(hmac_key=HMAC_KEY).signer().issue("i-1", 5, "alice", kind="answer")
        request = feedback_pb2.FeedbackRequest(
            feedback_id="tls-1", interaction_id="i-1", user_id="alice", thumbs=1, feedback_token=token
        )
        with channel(f"127.0.0.1:{grpc_port}", pki.client_tls()) as ch:
            reply = feedback_pb2_grpc.FeedbackStub(ch).Submit(request, timeout=30)
        assert (reply.feedback_id, reply.status) == ("tls-1", feedback_pb2.SUBMIT_STATUS_ACCEPTED)
        events = read_topic(kafka_scram(pki, secure_kafka), topics.feedback)  # read back over SASL_SSL
        assert [(e.feedback_id, e.interaction_id, e.user_id) for e in events] == [("tls-1", "i-1", "alice")]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(30) == 0, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()


def read_topic(kafka: KafkaConfig, topic: str, timeout_s: float = 30.0) -> list[events_pb2.FeedbackEvent]:
    """Every record of partition 0 of `topic`, once one arrived and a poll came back empty."""
    consumer = KafkaConsumer(**kafka.client_options(), enable_auto_commit=False)
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    out: list[events_pb2.FeedbackEvent] = []
    try:

        def poll() -> bool:
            batch = consumer.poll(timeout_ms=500)
            new = [events_pb2.FeedbackEvent.FromString(m.value) for msgs in batch.values() for m in msgs]
            out.extend(new)
            return bool(out) and not new

        wait_for(poll, timeout_s, f"records on {topic}")
    finally:
        consumer.close()
    return out
