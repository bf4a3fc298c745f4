"""flywheel.client over mutual TLS: the policy service (in process) and the feedback service
(its own process), both configured by the FLYWHEEL_TLS_* variables with certificates this module
makes, on the real Kafka broker. A client with the CA and a client certificate gets answers and
gives feedback (sync and asyncio); one without the certificate, or without TLS, is refused.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flywheel.client import NO_RETRY, AsyncClient, Client, Unavailable
from flywheel.core import bus
from flywheel.core.auth import AuthConfig
from flywheel.core.config import ConfigError, KafkaConfig
from flywheel.v1 import events_pb2
from tests.integration import test_feedback_service as fs
from tests.integration.test_policy_service import Running, fresh_topics, make_config, make_store, one_torch_thread
from tests.integration.test_tls import CA, Pki, health

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(240)]
_ = one_torch_thread


class TlsFeedback(fs.Service):
    """The feedback service process over mutual TLS (healthy: grpc.health over TLS with a client certificate)."""

    def __init__(self, pki: Pki, *args: Any, **env: str) -> None:
        self.pki = pki
        super().__init__(*args, **env)

    def healthy(self) -> bool:
        assert self.proc.poll() is None, f"service exited: {Path(self.log.name).read_text()[-2000:]}"
        return health(self.grpc_port, self.pki.client_tls()) == "SERVING"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, rogue = CA(d, "client-test-ca"), CA(d, "rogue-ca")
    return Pki(d, ca, rogue, ca.issue("server"), ca.issue("client", client=True), rogue.issue("rogue", client=True))


@pytest.fixture(scope="module")
def services(kafka_bootstrap: str, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, ...]]:
    tmp = tmp_path_factory.mktemp("client-tls")
    topics = fresh_topics()
    bus.ensure_topics(KafkaConfig(bootstrap=kafka_bootstrap), topics)
    make_store(tmp / "store")
    config = make_config(kafka_bootstrap, topics, tmp / "store", tmp / "state")
    config.auth = AuthConfig(hmac_key=fs.KEY)
    cert, key = pki.server
    env = {"FLYWHEEL_TLS_CERT_FILE": cert, "FLYWHEEL_TLS_KEY_FILE": key, "FLYWHEEL_TLS_CLIENT_CA_FILE": pki.ca.file}
    with pytest.MonkeyPatch.context() as mp:  # the policy's ServiceServer reads the tls section as it is built
        for name, value in env.items():
            mp.setenv(name, value)
        policy = Running(config)
    feedback = TlsFeedback(pki, kafka_bootstrap, topics.feedback, tmp, **env)
    yield policy.grpc_addr, f"127.0.0.1:{feedback.grpc_port}", topics
    feedback.stop(signal.SIGTERM)
    policy.close()


def test_mutual_tls(services: tuple[Any, ...], pki: Pki, kafka_bootstrap: str) -> None:
    policy, feedback, topics = services
    cert, key = pki.client
    with Client(policy, feedback, ca_file=pki.ca.file, client_cert_file=cert, client_key_file=key) as c:
        a = c.generate("hi", "alice", max_new_tokens=4)
        receipt = c.thumbs(a, up=True)
    assert a.text and receipt.status == "accepted"

    async def aio() -> str:
        async with AsyncClient(policy, feedback, tls=pki.client_tls()) as c:
            answer = await c.generate("hi", "alice", max_new_tokens=4)
            return (await c.rate(answer, 2)).status

    assert asyncio.run(aio()) == "accepted"
    records = fs.read_topic(kafka_bootstrap, topics.feedback, 2)
    got = {e.feedback_id: e for _, e, _ in records}
    assert got[receipt.feedback_id].kind == events_pb2.FEEDBACK_KIND_THUMBS and len(got) == 2

    for refused in (  # no client certificate; no TLS at all: the handshake fails
        Client(policy, feedback, ca_file=pki.ca.file, retry=NO_RETRY),
        Client(policy, feedback, retry=NO_RETRY),
        Client(policy, feedback, tls=pki.client_tls(rogue_cert=True), retry=NO_RETRY),
    ):
        with refused, pytest.raises(Unavailable):
            refused.generate("hi", "alice", max_new_tokens=4)


def test_tls_arguments_are_checked(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"TlsConfig.ca_file = .*no such file"):
        Client(ca_file=str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="clients use TLS only when ca_file is set"):
        Client(client_cert_file=pki.client[0], client_key_file=pki.client[1])
    with pytest.raises(ValueError, match="either tls="):
        Client(tls=pki.client_tls(), ca_file=pki.ca.file)
