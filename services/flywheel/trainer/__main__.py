"""`python -m flywheel.trainer` (and `flywheel serve trainer`): the trainer service.

Configuration: the `trainer`, `kafka`, `topics`, `model_store` and `auth` sections of the
YAML file (FLYWHEEL_CONFIG or --config) and their FLYWHEEL_* variables; the reward service
at `trainer.reward_addr` (FLYWHEEL_TRAINER_REWARD_ADDR, default localhost:50053). Health turns SERVING once this replica
holds the active-trainer lock and has loaded its models; a standby stays NOT_SERVING.

Under torchrun (`torchrun --nproc-per-node N -m flywheel.trainer`) rank 0 is this service and the
other ranks follow it, data parallel (flywheel/trainer/distributed.py): they serve nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
import threading
from typing import Any

from flywheel.core.auth import AuthConfig, Authenticator
from flywheel.core.config import ConfigError, KafkaConfig, TopicsConfig, load_section
from flywheel.core.errors import FlywheelError
from flywheel.core.logs import configure_logging, set_context
from flywheel.core.modelstore import ModelStoreConfig
from flywheel.core.server import ServiceServer, serve, server_config
from flywheel.ops.lease import elector_from_env
from flywheel.trainer.config import TrainerConfig
from flywheel.trainer.distributed import TorchGroup, group_for
from flywheel.trainer.loop import Trainer, build_trainer
from flywheel.trainer.promotion import Announce
from flywheel.trainer.prompt_sources import KafkaPrompts, PoolPrompts, PromptSource, default_pool, split_pool
from flywheel.trainer.reward_source import GrpcReward, RewardInfo
from flywheel.trainer.server import TrainerServicer
from flywheel.v1 import trainer_pb2_grpc

log = logging.getLogger("flywheel.trainer")


def build(config_path: str | None = None) -> tuple[Trainer, Authenticator]:
    """The Trainer wired to its reward service, prompt source, model store and announcer."""
    cfg = load_section(TrainerConfig, "trainer", config_path)
    group = group_for(cfg.device)  # torchrun: this process's rank (distributed.py)
    if isinstance(group, TorchGroup) and group.device.type == "cuda":
        cfg = dataclasses.replace(cfg, device=str(group.device))
    kafka = load_section(KafkaConfig, "kafka", config_path)
    topics = load_section(TopicsConfig, "topics", config_path)
    store = load_section(ModelStoreConfig, "model_store", config_path)
    auth = Authenticator(load_section(AuthConfig, "auth", config_path))
    reward = GrpcReward(cfg.reward_addr, token=auth.config.service_token)

    def reward_info() -> RewardInfo | None:  # normalization statistics; None while the reward service cannot say
        try:
            return reward.info()
        except Exception:
            return None

    train, heldout = split_pool(cfg.prompt_pool or default_pool(), cfg.gate_prompts, cfg.seed)
    announce: Announce | None = None
    if kafka.bootstrap and group.main:  # only rank 0 consumes and announces
        from flywheel.core.bus import Producer, ensure_topics

        ensure_topics(kafka, topics)
        producer = Producer(kafka)

        def send_update(update: Any) -> None:  # a flywheel.v1.ModelUpdate
            producer.send_sync(topics.policy_updates, update.model, update)

        announce = send_update
    elif group.main:
        log.warning("FLYWHEEL_KAFKA_BOOTSTRAP is not set: prompts come from the pool and versions are not announced")
    prompts: PromptSource
    if cfg.prompt_source == "kafka" and kafka.bootstrap and group.main:
        prefs = topics.preferences if cfg.ptx_coef > 0 and not cfg.ptx_data else None
        prompts = KafkaPrompts(
            kafka, topics.interactions, train, cfg.consumer_group, cfg.model, prefs, cfg.poll_timeout_ms
        )
    else:
        prompts = PoolPrompts(train)
    trainer = build_trainer(cfg, store.store(), reward, prompts, heldout, announce, store.keep_last, reward_info, group)
    return trainer, auth


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="flywheel serve trainer", description="Continuous PPO, checkpoints, the gate.")
    p.add_argument("--grpc-port", type=int, default=None, help="gRPC port (default 50054)")
    p.add_argument("--http-port", type=int, default=None, help="HTTP port for /metrics and /health (default 8084)")
    p.add_argument("--config", default=None, help="YAML config file (default: FLYWHEEL_CONFIG)")
    p.add_argument(
        "--log-level", default=os.environ.get("FLYWHEEL_LOG_LEVEL", "INFO"), help="Flywheel's loggers (default INFO)"
    )
    args = p.parse_args(argv)
    try:
        configure_logging("trainer", args.log_level, args.config)
    except ConfigError as e:
        p.error(str(e))
    server = ServiceServer(server_config("trainer", grpc_port=args.grpc_port, http_port=args.http_port), name="trainer")
    try:
        trainer, auth = build(args.config)
    except FlywheelError as e:
        print(f"flywheel trainer: {e}", file=sys.stderr)
        return 2
    if not trainer.group.main:  # another rank of a data-parallel trainer: rank 0 leads, this one follows
        log.info("rank %d of %d: following rank 0", trainer.group.rank, trainer.group.world)
        trainer.follow()
        return 0
    set_context(lambda: {"version": trainer.version, "serving_version": trainer.serving_version})
    server.add_servicer(trainer_pb2_grpc.add_TrainerServicer_to_server, TrainerServicer(trainer, auth))
    stop = threading.Event()
    died: list[BaseException] = []

    def train() -> None:
        try:
            trainer.run(stop)
        except BaseException as e:  # the watchdog stops the service (exit code 1): restarted, it resumes
            died.append(e)
            log.exception("the training loop died")

    thread = threading.Thread(target=train, name="trainer-loop", daemon=True)
    leading = threading.Event()
    elector = elector_from_env(lambda held: _on_lease_change(held, leading))

    async def setup(srv: ServiceServer) -> None:
        if elector is not None:  # in a cluster: hold the Lease before touching the model store
            elector.start()
            while not leading.is_set():
                await asyncio.sleep(0.5)
        thread.start()  # models load in the loop's thread, never on the event loop
        while trainer.status in ("standby", "starting"):  # a standby waits here, NOT_SERVING
            await asyncio.sleep(0.5)
        if trainer.status == "stopped":
            raise RuntimeError("the training loop stopped during start-up; see the log above")
        srv.watch("the training loop", lambda: died[0] if died else None)
        await srv.set_serving(True)

    def cleanup() -> None:
        stop.set()
        if thread.is_alive():
            thread.join(timeout=60)
        if elector is not None:
            elector.stop()  # releases the Lease, so a standby takes over at once

    return serve(server, setup, cleanup)


def _on_lease_change(held: bool, leading: threading.Event) -> None:
    """Gaining the Lease lets start-up go on; losing it stops this replica (as client-go's
    OnStoppedLeading usually does), so that the new leader trains alone. Kubernetes restarts it
    as a standby."""
    if held:
        leading.set()
    elif leading.is_set():
        log.error("lost the trainer Lease: stopping so that only the new leader trains")
        os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(main())
