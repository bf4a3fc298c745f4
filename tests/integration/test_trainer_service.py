"""The Trainer gRPC service: admin-only control with precise errors, and the real process on Kafka."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import torch
from kafka import KafkaConsumer, TopicPartition

from flywheel.core import bus, errors
from flywheel.core.auth import AuthConfig, Authenticator
from flywheel.core.config import KafkaConfig, TopicsConfig
from flywheel.core.modelstore import ModelStore
from flywheel.core.server import ServerConfig, ServiceServer
from flywheel.testing import tiny_policy
from flywheel.trainer.config import TrainerConfig
from flywheel.trainer.loop import Trainer, build_trainer
from flywheel.trainer.prompt_sources import FALLBACK_PROMPTS, KafkaPrompts, PoolPrompts
from flywheel.trainer.server import TrainerServicer
from flywheel.v1 import events_pb2, reward_pb2, reward_pb2_grpc, trainer_pb2, trainer_pb2_grpc

pytestmark = pytest.mark.timeout(120)
ADMIN, KEY = "admin-token-0123456789", "key-alice-0123456789"


class WordReward:
    def __init__(self) -> None:
        self.prompts: list[str] = []

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        self.prompts += prompts
        return [sum(w == "help" for w in r.split()) / max(1, len(r.split())) for r in responses]


@pytest.fixture(scope="module")
def init_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_policy(tmp_path_factory.mktemp("tiny") / "init")


def _trainer(tmp_path: Path, init_path: Path) -> Trainer:
    torch.set_num_threads(1)
    cfg = TrainerConfig(
        init_path=str(init_path), batch_size=4, max_new_tokens=6, prompt_source="pool", gate_prompts=2, gate_margin=1e9
    )
    t = build_trainer(
        cfg, ModelStore(tmp_path / "store"), WordReward(), PoolPrompts(FALLBACK_PROMPTS), FALLBACK_PROMPTS
    )
    t.setup()
    t.train_step()
    t.checkpoint()  # v1, refused by the gate (margin 1e9)
    t.status = "training"
    return t


RPCS = {
    "GetStatus": trainer_pb2.GetStatusRequest(),
    "Pause": trainer_pb2.PauseRequest(reason="x"),
    "Resume": trainer_pb2.ResumeRequest(),
    "Promote": trainer_pb2.PromoteRequest(version=1),
    "Rollback": trainer_pb2.RollbackRequest(version=0),
    "ListVersions": trainer_pb2.ListVersionsRequest(),
}


def test_control_rpcs(tmp_path: Path, init_path: Path) -> None:
    trainer = _trainer(tmp_path, init_path)
    auth = Authenticator(AuthConfig(admin_token=ADMIN, api_keys=[f"alice:{KEY}"]))

    async def scenario() -> None:
        server = ServiceServer(ServerConfig(host="127.0.0.1", grpc_port=0, http_port=0), name="trainer")
        server.add_servicer(trainer_pb2_grpc.add_TrainerServicer_to_server, TrainerServicer(trainer, auth))
        await server.start(handle_signals=False)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
                stub = trainer_pb2_grpc.TrainerStub(ch)

                async def call(name: str, req, token: str | None = ADMIN):
                    md = (("authorization", f"Bearer {token}"),) if token else None
                    return await getattr(stub, name)(req, metadata=md)

                async def code(name: str, req, token: str | None = ADMIN) -> tuple[grpc.StatusCode, str]:
                    try:
                        await call(name, req, token)
                    except grpc.aio.AioRpcError as e:
                        return e.code(), e.details()
                    return grpc.StatusCode.OK, ""

                for name, req in RPCS.items():  # every RPC is admin-only
                    assert (await code(name, req, None))[0] == grpc.StatusCode.UNAUTHENTICATED, name
                    assert (await code(name, req, KEY))[0] == grpc.StatusCode.PERMISSION_DENIED, name
                    assert (await code(name, req, "wrong-token-000000000"))[0] == grpc.StatusCode.UNAUTHENTICATED
                assert trainer.serving_version == 0 and not trainer.paused  # nothing happened

                st = await call("GetStatus", RPCS["GetStatus"])
                assert (st.state, st.step, st.serving_version, st.training_version) == ("training", 1, 0, 1)
                assert "reward_mean" in st.metrics and "kl" in st.metrics
                vs = (await call("ListVersions", RPCS["ListVersions"])).versions
                assert [v.version for v in vs] == [0, 1] and vs[1].parent == 0 and vs[1].gate.startswith("failed:")
                assert "gate.reward_mean" in vs[1].metrics and vs[1].created_at.seconds > 0

                c, msg = await code("Promote", trainer_pb2.PromoteRequest(version=7))
                assert c == grpc.StatusCode.NOT_FOUND and "version 7 is not in the model store" in msg
                c, msg = await code("Rollback", trainer_pb2.RollbackRequest(version=1))
                assert c == grpc.StatusCode.FAILED_PRECONDITION and "never promoted" in msg
                c, msg = await code("Rollback", trainer_pb2.RollbackRequest(version=0))
                assert c == grpc.StatusCode.FAILED_PRECONDITION and "already the serving version" in msg
                c, msg = await code("Promote", trainer_pb2.PromoteRequest(version=-3))
                assert c == grpc.StatusCode.INVALID_ARGUMENT and ">= 0" in msg

                assert (await call("Pause", trainer_pb2.PauseRequest(reason="incident"))).state == "paused"
                c, msg = await code("Promote", trainer_pb2.PromoteRequest(version=1))
                assert c == grpc.StatusCode.FAILED_PRECONDITION and "paused: Resume first" in msg
                assert (await call("Resume", RPCS["Resume"])).state == "training"

                st = await call("Promote", trainer_pb2.PromoteRequest(version=1, reason="on purpose"))
                assert st.serving_version == 1  # the gate was bypassed
                vs = (await call("ListVersions", RPCS["ListVersions"])).versions
                assert vs[1].promoted and vs[1].gate.startswith("manual_promote")
                st = await call("Rollback", trainer_pb2.RollbackRequest(version=0))
                assert st.serving_version == 0
                trainer.status = "standby"
                c, msg = await code("Pause", RPCS["Pause"])
                assert c == grpc.StatusCode.FAILED_PRECONDITION and "standby" in msg
        finally:
            await server.stop(grace=0)

    asyncio.run(scenario())


# --------------------------------------------------------------------------- the real process


class FakeReward(reward_pb2_grpc.RewardServicer):
    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.trained = False  # GetInfo says: an untrained reward model (the trainer must wait), then a good one

    def ScoreBatch(self, request, context):  # noqa: N802
        self.prompts += [i.prompt for i in request.items]
        scores = [sum(w == "help" for w in i.response.split()) / max(1, len(i.response.split())) for i in request.items]
        return reward_pb2.ScoreBatchResponse(scores=scores, reward_version=3)

    def GetInfo(self, request, context):  # noqa: N802
        if not self.trained:
            return reward_pb2.RewardInfo(reward_version=0, heldout_accuracy=-1, score_mean=0.0, score_std=1.0)
        return reward_pb2.RewardInfo(
            reward_version=3, heldout_accuracy=0.9, pairs_trained=500, pairs_heldout=50, score_mean=0.05, score_std=0.1
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.kafka
def test_trainer_process_trains_on_live_prompts_and_announces(
    tmp_path: Path, init_path: Path, kafka_bootstrap: str, topics_config: TopicsConfig
) -> None:
    t = topics_config
    kafka = KafkaConfig(bootstrap=kafka_bootstrap)
    bus.ensure_topics(kafka, t)
    live = "hello where is my order"
    with bus.Producer(kafka) as p:
        for i in range(3):
            p.send_sync(t.interactions, f"i{i}", events_pb2.Interaction(interaction_id=f"i{i}", prompt=live))
    fake = FakeReward()
    rserver = grpc.server(futures.ThreadPoolExecutor(4))
    reward_pb2_grpc.add_RewardServicer_to_server(fake, rserver)
    rport = rserver.add_insecure_port("127.0.0.1:0")
    rserver.start()
    gport, hport = _free_port(), _free_port()
    env = {
        **os.environ,
        "FLYWHEEL_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "FLYWHEEL_TOPIC_INTERACTIONS": t.interactions,
        "FLYWHEEL_TOPIC_FEEDBACK": t.feedback,
        "FLYWHEEL_TOPIC_PREFERENCES": t.preferences,
        "FLYWHEEL_TOPIC_POLICY_UPDATES": t.policy_updates,
        "FLYWHEEL_TOPIC_REWARD_UPDATES": t.reward_updates,
        "FLYWHEEL_TOPIC_DLQ": t.dlq,
        "FLYWHEEL_MODEL_STORE": str(tmp_path / "store"),
        "FLYWHEEL_ADMIN_TOKEN": ADMIN,
        "FLYWHEEL_REWARD_ADDR": f"127.0.0.1:{rport}",
        "FLYWHEEL_TRAINER_INIT_PATH": str(init_path),
        "FLYWHEEL_TRAINER_ALGO": "ppo",  # one sample a prompt: each live prompt is scored once
        "FLYWHEEL_TRAINER_GROUP_SIZE": "1",
        "FLYWHEEL_TRAINER_BATCH_SIZE": "4",
        "FLYWHEEL_TRAINER_MAX_NEW_TOKENS": "6",
        "FLYWHEEL_TRAINER_CHECKPOINT_EVERY": "2",
        "FLYWHEEL_TRAINER_GATE_PROMPTS": "2",
        "FLYWHEEL_TRAINER_GATE_MARGIN": "-10",
        "FLYWHEEL_TRAINER_GATE_KL_BUDGET": "1e9",
        "FLYWHEEL_TRAINER_GATE_MAX_REPEAT": "1",
        "FLYWHEEL_TRAINER_GATE_MIN_DISTINCT2": "0",
        "FLYWHEEL_TRAINER_GATE_MAX_TOKENS": "100",
        "FLYWHEEL_TRAINER_TORCH_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "flywheel.trainer", "--grpc-port", str(gport), "--http-port", str(hport)]

    waited: list[str] = []

    def run_until(steps: int, serving: int) -> None:
        """Start the service, wait until it reports `steps` and `serving`, then stop it with SIGTERM.
        While it waits for a reward model worth training against, the reward model "learns"."""
        proc = subprocess.Popen(
            cmd,
            env={**env, "FLYWHEEL_TRAINER_MAX_STEPS": str(steps)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            with grpc.insecure_channel(f"127.0.0.1:{gport}") as ch:
                stub = trainer_pb2_grpc.TrainerStub(ch)
                md = (("authorization", f"Bearer {ADMIN}"),)
                deadline, st = time.monotonic() + 90, None
                while time.monotonic() < deadline:
                    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
                    try:
                        st = stub.GetStatus(trainer_pb2.GetStatusRequest(), metadata=md, timeout=5)
                        if st.state == "waiting":
                            waited.append(st.waiting_for)
                            assert st.step == 0 and not fake.prompts  # nothing scored, nothing trained
                            fake.trained = True
                        if st.step >= steps and st.serving_version >= serving:
                            break
                    except grpc.RpcError:
                        pass
                    time.sleep(0.5)
                assert st is not None and st.step == steps and st.serving_version == serving, st
                assert st.consumer_lag == 0
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    try:
        run_until(2, 1)
        assert waited and "reward v0 was trained on 0 pairs; training starts at 50" in waited[0], waited
        assert fake.prompts.count(live) == 3  # live traffic first (each record once), then the pool
        c = KafkaConsumer(bootstrap_servers=kafka_bootstrap, enable_auto_commit=False)
        tp = TopicPartition(t.policy_updates, 0)
        c.assign([tp])
        c.seek_to_beginning(tp)
        got = [r for recs in c.poll(timeout_ms=5000).values() for r in recs]
        c.close()
        upd = events_pb2.ModelUpdate.FromString(got[0].value)
        assert (upd.model, upd.version, upd.parent, upd.reason) == ("policy", 1, 0, "gate")
        assert ModelStore(tmp_path / "store").from_update(upd).is_dir()  # the pointer verifies

        # Restart: it resumes from its checkpoint's offsets: new traffic is read, old is not re-read.
        later = "hello yes thanks"
        with bus.Producer(kafka) as p:
            for i in range(2):
                p.send_sync(t.interactions, f"j{i}", events_pb2.Interaction(interaction_id=f"j{i}", prompt=later))
        fake.prompts.clear()
        run_until(4, 2)
        assert fake.prompts.count(later) == 2 and fake.prompts.count(live) == 0, fake.prompts
    finally:
        rserver.stop(0)


def test_kafka_prompts_turn_a_failed_poll_into_unavailable(kafka_bootstrap: str, topics_config: TopicsConfig) -> None:
    """The training loop backs off and retries a step on Unavailable; any other error would end it."""
    from kafka.errors import KafkaConnectionError

    t, kafka = topics_config, KafkaConfig(bootstrap=kafka_bootstrap)
    bus.ensure_topics(kafka, t)
    with bus.Producer(kafka) as p:
        p.send_sync(t.interactions, "k", events_pb2.Interaction(prompt="live prompt", model="policy"))
    prompts = KafkaPrompts(kafka, t.interactions, ["pool prompt"], "tr-poll", "policy")
    try:
        real = prompts.consumer.poll
        prompts.consumer.poll = lambda **kw: (_ for _ in ()).throw(KafkaConnectionError("injected"))
        with pytest.raises(errors.Unavailable, match="polling prompts from Kafka failed"):
            prompts.take(1)
        prompts.consumer.poll = real
        deadline = time.monotonic() + 20
        while (got := prompts.take(1)) != ["live prompt"] and time.monotonic() < deadline:
            pass
        assert got == ["live prompt"]
    finally:
        prompts.close()
