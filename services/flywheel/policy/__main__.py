"""`flywheel serve policy` / `python -m flywheel.policy`: run the policy service until SIGTERM.

Configuration: the `policy_engine`, `policy`, `server`, `kafka`, `topics`, `model_store` and
`auth` sections of the YAML file in FLYWHEEL_CONFIG, then FLYWHEEL_* environment variables,
then these flags. With no model configured (FLYWHEEL_POLICY_MODEL empty) it serves the
starter policy, version 0 of "policy" in the model store, building it first if it is missing.
"""

from __future__ import annotations

import argparse
import os
import sys

from flywheel.core.config import ConfigError, read_yaml
from flywheel.core.logs import adopt_library_handlers, configure_logging, set_context
from flywheel.core.server import DEFAULT_PORTS, serve, server_config
from flywheel.policy.service import ensure_starter

__all__ = ["ensure_starter", "main"]


def main(argv: list[str] | None = None) -> int:
    grpc_default, http_default = DEFAULT_PORTS["policy"]
    p = argparse.ArgumentParser(prog="flywheel serve policy", description=__doc__.splitlines()[0])
    p.add_argument("--grpc-port", type=int, default=None, help=f"gRPC port (default {grpc_default}; 0: a free one)")
    p.add_argument("--http-port", type=int, default=None, help=f"HTTP port (default {http_default}; 0: a free one)")
    p.add_argument("--host", default=None, help="interface to bind (default 0.0.0.0)")
    p.add_argument("--config", default=None, help="YAML config file (default: FLYWHEEL_CONFIG)")
    p.add_argument(
        "--log-level", default=os.environ.get("FLYWHEEL_LOG_LEVEL", "INFO"), help="Flywheel's loggers (default INFO)"
    )
    args = p.parse_args(argv)
    try:
        configure_logging("policy", args.log_level, args.config)
    except ConfigError as e:
        p.error(str(e))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from flywheel.policy.server import build_server
    from flywheel.policy.service import PolicyService, PolicyServiceConfig

    adopt_library_handlers()  # transformers, imported just now, prints through a handler of its own
    try:
        config = PolicyServiceConfig.from_env(args.config)
        sections = read_yaml(args.config)
        scfg = server_config(
            "policy", sections.get("server"), grpc_port=args.grpc_port, http_port=args.http_port, host=args.host
        )
        if not config.kafka.bootstrap:
            raise ConfigError(
                "KafkaConfig.bootstrap is empty: set FLYWHEEL_KAFKA_BOOTSTRAP (host:port); `flywheel up` sets it"
            )
    except ConfigError as e:
        p.error(str(e))
    service = PolicyService(config)
    set_context(lambda: {"version": getattr(service.engine.serving_model, "version", None)})
    server = build_server(service, scfg)
    return serve(server, service.setup, cleanup=service.stop)


if __name__ == "__main__":
    sys.exit(main())
