"""`python -m flywheel.feedback` (and `flywheel serve feedback`): run the feedback service.

Configuration: the `feedback`, `server`, `kafka`, `topics`, `auth` and `limits` sections of the YAML
file in FLYWHEEL_CONFIG, then FLYWHEEL_* environment variables, then these flags. SIGTERM or
SIGINT stops it gracefully: NOT_SERVING, in-flight requests finish, the spool gets a few
seconds to drain, and whatever is left stays on disk for the next start.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

from flywheel.core.auth import AuthConfig
from flywheel.core.config import ConfigError, KafkaConfig, TopicsConfig, load_section, read_yaml
from flywheel.core.limits import LimitsConfig
from flywheel.core.logs import configure_logging
from flywheel.core.server import end_process, run_blocking, server_config
from flywheel.feedback.config import FeedbackConfig
from flywheel.feedback.server import build_server, open_and_serve

log = logging.getLogger("flywheel.feedback")


def main(argv: list[str] | None = None) -> int:
    """Run the feedback service until a signal; the process exit code."""
    parser = argparse.ArgumentParser(prog="flywheel serve feedback", description=__doc__.splitlines()[0])
    parser.add_argument("--grpc-port", type=int, default=None, help="gRPC port (default 50052; 0: a free one)")
    parser.add_argument("--http-port", type=int, default=None, help="HTTP port (default 8082; 0: a free one)")
    parser.add_argument("--host", default=None, help="interface to bind (default 0.0.0.0)")
    parser.add_argument(
        "--state-dir", default=None, help="directory of the spool and the store of accepted ids and votes"
    )
    parser.add_argument(
        "--log-level", default=os.environ.get("FLYWHEEL_LOG_LEVEL", "INFO"), help="Flywheel's loggers (default INFO)"
    )
    args = parser.parse_args(argv)
    try:
        configure_logging("feedback", args.log_level)
        sections = read_yaml()
        server_cfg = server_config(
            "feedback", sections.get("server"), grpc_port=args.grpc_port, http_port=args.http_port, host=args.host
        )
        config = load_section(FeedbackConfig, "feedback", state_dir=args.state_dir)
        kafka = load_section(KafkaConfig, "kafka")
        topics = load_section(TopicsConfig, "topics")
        auth = load_section(AuthConfig, "auth")
        limits = load_section(LimitsConfig, "limits")
        if not kafka.bootstrap:
            raise ConfigError(
                "KafkaConfig.bootstrap is empty: set FLYWHEEL_KAFKA_BOOTSTRAP (host:port); `flywheel up` sets it"
            )
    except ConfigError as e:
        parser.error(str(e))
    server, intake = build_server(server_cfg, config, kafka, topics, auth, limits)

    async def run() -> None:
        try:
            await server.run_forever(lambda s: open_and_serve(s, intake))
        finally:
            await run_blocking(intake.close)
            log.info(
                "feedback: %d events left in the spool for the next start", intake.spool.depth() if intake.spool else 0
            )

    asyncio.run(run())
    return end_process(server.exit_code)


if __name__ == "__main__":
    raise SystemExit(main())
