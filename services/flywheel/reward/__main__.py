"""`flywheel serve reward` / `python -m flywheel.reward`: run the reward service until SIGTERM."""

from __future__ import annotations

import argparse
import os
import sys

from flywheel.core.config import ConfigError
from flywheel.core.logs import adopt_library_handlers, configure_logging, set_context
from flywheel.core.server import DEFAULT_PORTS, serve, server_config


def main(argv: list[str] | None = None) -> int:
    grpc_default, http_default = DEFAULT_PORTS["reward"]
    p = argparse.ArgumentParser(prog="flywheel serve reward", description=__doc__)
    p.add_argument("--grpc-port", type=int, default=None, help=f"gRPC port (default {grpc_default})")
    p.add_argument("--http-port", type=int, default=None, help=f"HTTP port (default {http_default})")
    p.add_argument("--config", default=None, help="YAML config file (default: FLYWHEEL_CONFIG)")
    p.add_argument(
        "--log-level", default=os.environ.get("FLYWHEEL_LOG_LEVEL", "INFO"), help="Flywheel's loggers (default INFO)"
    )
    args = p.parse_args(argv)
    try:
        configure_logging("reward", args.log_level, args.config)
    except ConfigError as e:
        p.error(str(e))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from flywheel.reward.server import RewardService, RewardServiceConfig, build_server

    adopt_library_handlers()  # transformers, imported just now, prints through a handler of its own
    config = RewardServiceConfig.from_env(args.config)
    service = RewardService(config)
    set_context(lambda: {"version": service.scorer.version})
    server = build_server(service, server_config("reward", grpc_port=args.grpc_port, http_port=args.http_port))
    return serve(server, service.setup, cleanup=service.stop)


if __name__ == "__main__":
    sys.exit(main())
