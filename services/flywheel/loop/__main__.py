"""`python -m flywheel.loop up|demo`: the same commands as `flywheel up` / `flywheel demo`."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flywheel.loop", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the broker and the four services; Ctrl-C stops them")
    add_up_arguments(up)
    demo = sub.add_parser("demo", help="`up` plus the simulated panel; writes DIR/report.json and report.png")
    add_demo_arguments(demo)
    return p


def add_up_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", default=".flywheel/up", help="logs and service state (default .flywheel/up)")
    p.add_argument("--free-ports", action="store_true", help="let the OS pick ports instead of 50051-50054/808x")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for every service to serve")
    p.add_argument(
        "--restarts",
        type=int,
        default=5,
        help="restart a service that exits up to this often in 10 minutes (1 s backoff, doubling), then stop"
        " everything; 0: the first exit stops everything (default 5)",
    )


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--minutes", type=float, default=20, help="time limit in minutes")
    p.add_argument("--out", default="runs/demo", help="directory for report.json and report.png")
    p.add_argument("--max-events", type=int, default=3000, help="feedback events the panel gives at most")
    p.add_argument("--events-per-s", type=float, default=4.0, help="the panel's feedback rate")
    p.add_argument("--target", type=float, default=0.8, help="stop once the win-rate reaches this twice")
    p.add_argument(
        "--adapter",
        choices=("none", "lora"),
        default=None,
        help="lora: the trainer publishes LoRA adapter versions on the starter (trainer.adapter; default: the config's)",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "up":
        from flywheel.loop.supervisor import up_main

        return up_main(args)
    from flywheel.loop.demo import demo_main

    return demo_main(args)


if __name__ == "__main__":
    sys.exit(main())
