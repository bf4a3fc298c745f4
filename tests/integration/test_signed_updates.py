"""Kafka and the model store are not the root of trust: real policy and reward services on a real
Apache Kafka broker refuse announcements that are unsigned, signed by an untrusted key, changed
after signing, pointing outside the store or at tampered files; each is counted by reason, and the
serving version goes on answering (services/flywheel/core/signing.py, policy/swap.py, reward/server.py).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import shutil
import uuid
from pathlib import Path

import grpc
import pytest

from flywheel.core import bus, errors, signing
from flywheel.core.config import KafkaConfig, TopicsConfig
from flywheel.core.modelstore import ModelStore, ModelStoreConfig
from flywheel.core.server import ServerConfig
from flywheel.reward.config import JoinConfig, RewardModelConfig, TrainConfig
from flywheel.reward.server import RewardService, RewardServiceConfig, build_server
from flywheel.testing import tiny_reward_model, wait_for
from flywheel.v1 import events_pb2, policy_pb2, reward_pb2, reward_pb2_grpc
from tests.integration.test_policy_service import Running, copy_of, counter, fresh_topics, gen, make_config, perturbed
from tests.unit.test_starter import tiny_starter

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]
ATTACKER_KEY = base64.b64encode(b"\x42" * 32).decode()  # a key pair no service trusts


def keys(tmp_path: Path) -> tuple[str, str]:
    """(the trainer's private key file, its public key in base64)."""
    pub = signing.keygen(tmp_path / "keys")
    return str(tmp_path / "keys" / signing.KEY_FILE), signing.public_b64(pub)


def forged(genuine: events_pb2.ModelUpdate, store: ModelStore, version: int) -> events_pb2.ModelUpdate:
    """A genuine signed announcement rewritten to name another version (its files' digests too)."""
    u = events_pb2.ModelUpdate()
    u.CopyFrom(genuine)
    bad = store.to_update(store.get(u.model, version), u.reason)
    u.version, u.uri = bad.version, bad.uri
    del u.files[:]
    u.files.extend(bad.files)
    return u


def outside_copy(u: events_pb2.ModelUpdate, src: Path, dst: Path) -> events_pb2.ModelUpdate:
    """`u` (still validly signed: the uri is not signed) pointing at a copy of its files outside the store."""
    shutil.copytree(src, dst)
    out = events_pb2.ModelUpdate()
    out.CopyFrom(u)
    out.uri = dst.as_uri()
    return out


@pytest.mark.parametrize("swap_worker", [True, False], ids=["worker-process", "threads"])
def test_policy_refuses_what_the_trainer_did_not_sign_and_keeps_serving(
    kafka_bootstrap: str, tmp_path: Path, swap_worker: bool
) -> None:
    private, public = keys(tmp_path)
    root = tmp_path / "store"
    trainer = ModelStoreConfig(root=str(root), signing_key=private).store()
    intruder = ModelStore(root)  # a pod that can write to the store, without the key
    attacker = ModelStoreConfig(root=str(root), signing_key=ATTACKER_KEY).store()
    trainer.publish("policy", copy_of(tiny_starter()), parent=None, version=0, extra={"starter": True})
    v1 = trainer.publish("policy", perturbed(tiny_starter(), 1), parent=0)
    topics = fresh_topics()
    config = make_config(kafka_bootstrap, topics, root, tmp_path / "state", swap_worker=swap_worker)
    config = dataclasses.replace(config, store=ModelStoreConfig(root=str(root), trusted_keys=[public]))
    running = Running(config)  # starts from the store: signed v0
    kafka = KafkaConfig(bootstrap=kafka_bootstrap)

    def announce(u: events_pb2.ModelUpdate) -> None:
        with bus.Producer(kafka) as prod:
            prod.send_sync(topics.policy_updates, "policy", u)

    def info() -> policy_pb2.PolicyInfo:
        return running.stub.GetInfo(policy_pb2.GetInfoRequest())

    try:
        assert info().policy_version == 0
        announce(trainer.to_update(v1, "gate"))
        wait_for(lambda: info().policy_version == 1, 60, "version 1 serving")
        planted = intruder.publish("policy", perturbed(tiny_starter(), 2), parent=1)  # v2: weights nobody signed
        genuine_v3 = trainer.publish("policy", perturbed(tiny_starter(), 3), parent=1)
        v3_update = trainer.to_update(genuine_v3, "gate")
        v4 = trainer.publish("policy", perturbed(tiny_starter(), 4), parent=1)
        weights = v4.path / "model.safetensors"  # type: ignore[operator]
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
        attacks = [
            ("unsigned", intruder.to_update(planted, "gate"), "is unsigned"),
            ("unknown_key", attacker.to_update(planted, "gate"), "which is not trusted here"),
            ("bad_signature", forged(v3_update, trainer, planted.version), "does not match its contents"),
            (
                "outside_store",
                outside_copy(v3_update, genuine_v3.path, tmp_path / "elsewhere"),
                "outside the model store",
            ),  # type: ignore[arg-type]
            ("tampered", trainer.to_update(v4, "gate"), "sha256"),
        ]
        for reason, update, message in attacks:
            before = counter("flywheel_policy_updates_refused_total", reason=reason)
            announce(update)
            wait_for(
                lambda r=reason, b=before: counter("flywheel_policy_updates_refused_total", reason=r) == b + 1,
                60,
                f"the refusal of the {reason} announcement",
            )
            now = info()
            assert now.policy_version == 1, reason
            assert f"version {update.version} refused" in now.last_swap_error and message in now.last_swap_error
            assert "still serving version 1" in now.last_swap_error
            answer = running.stub.Generate(gen("how do I bake bread?", n=4))  # a good request still succeeds
            assert answer.policy_version == 1 and answer.generated_tokens > 0
        announce(v3_update)  # the genuine announcement of the same version still applies
        wait_for(lambda: info().policy_version == 3, 60, "version 3 serving")
        assert info().last_swap_error == ""
    finally:
        running.close()


def test_a_policy_that_requires_signatures_refuses_to_start_from_an_unsigned_store(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    _, public = keys(tmp_path)
    ModelStore(tmp_path / "store").publish("policy", copy_of(tiny_starter()), parent=None, version=0)
    config = make_config(kafka_bootstrap, fresh_topics(), tmp_path / "store", tmp_path / "state")
    config = dataclasses.replace(config, store=ModelStoreConfig(root=str(tmp_path / "store"), trusted_keys=[public]))
    running = Running(config, load=False)
    try:
        with pytest.raises(errors.IntegrityError, match="policy version 0 in the model store is unsigned"):
            running.call(running.service.setup(running.server))
        with pytest.raises(grpc.RpcError) as e:
            running.stub.Generate(gen("hi"))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        running.close()


def test_reward_scorer_refuses_what_the_trainer_did_not_sign_and_keeps_scoring(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    private, public = keys(tmp_path)
    root = tmp_path / "store"
    trainer = ModelStoreConfig(root=str(root), signing_key=private).store()
    tiny = tiny_reward_model(tmp_path / "tiny")
    trainer.publish("reward", copy_of(tiny), parent=None, version=0)
    kafka = KafkaConfig(bootstrap=kafka_bootstrap, session_timeout_ms=3000, request_timeout_ms=10_000)
    topics: TopicsConfig = fresh_topics()
    cfg = RewardServiceConfig(
        join=JoinConfig(state_dir=str(tmp_path / "state"), group=f"rw-{uuid.uuid4().hex[:6]}"),
        model=RewardModelConfig(base_model=str(tiny), max_length=64, device="cpu"),
        train=TrainConfig(enabled=False),
        kafka=kafka,
        topics=topics,
        store=ModelStoreConfig(root=str(root), trusted_keys=[public]),
    )

    def announce(u: events_pb2.ModelUpdate) -> None:
        with bus.Producer(kafka) as prod:
            prod.send_sync(topics.reward_updates, "reward", u)

    async def run() -> None:
        service = RewardService(cfg)
        server = build_server(service, ServerConfig(host="127.0.0.1", grpc_port=0, http_port=0, grace_s=1))
        await server.start(handle_signals=False)
        try:
            await service.setup(server)
            v1 = trainer.publish("reward", copy_of(tiny_reward_model(tmp_path / "t1", seed=1)), parent=0)
            announce(trainer.to_update(v1, "trained"))
            await asyncio.to_thread(wait_for, lambda: service.scorer.version == 1, 60, "reward version 1")
            planted = ModelStore(root).publish("reward", copy_of(tiny_reward_model(tmp_path / "t2", seed=2)), parent=1)
            v3 = trainer.publish("reward", copy_of(tiny_reward_model(tmp_path / "t3", seed=3)), parent=1)
            v3_update = trainer.to_update(v3, "trained")
            attacks = [
                ("unsigned", ModelStore(root).to_update(planted, "trained")),
                ("bad_signature", forged(v3_update, trainer, planted.version)),
                ("outside_store", outside_copy(v3_update, v3.path, tmp_path / "elsewhere")),  # type: ignore[arg-type]
            ]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
                stub = reward_pb2_grpc.RewardStub(ch)
                for reason, update in attacks:
                    before = counter("flywheel_reward_updates_refused_total", reason=reason)
                    announce(update)
                    await asyncio.to_thread(
                        wait_for,
                        lambda r=reason, b=before: counter("flywheel_reward_updates_refused_total", reason=r) == b + 1,
                        60,
                        f"the refusal of the {reason} reward announcement",
                    )
                    assert service.scorer.version == 1 and "still scoring with version 1" in service.scorer.last_error
                    out = await stub.Score(reward_pb2.ScoreRequest(prompt="hi", response="hello there"))
                    assert out.reward_version == 1
                announce(v3_update)
                await asyncio.to_thread(wait_for, lambda: service.scorer.version == 3, 60, "reward version 3")
                out = await stub.Score(reward_pb2.ScoreRequest(prompt="hi", response="hello there"))
                assert out.reward_version == 3
        finally:
            await server.stop(grace=0)
            service.stop()

    asyncio.run(run())
