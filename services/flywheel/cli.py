"""The `flywheel` command. Subcommands import their service lazily, so `--help` is instant
and no subcommand needs a GPU (or torch) before it does real work."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# The source checkout this package was installed from in editable mode, if any: bench/ and
# tools/ (development tooling) live there, not in the installed package.
CHECKOUT = Path(__file__).resolve().parents[2]

ABOUT = {
    "policy": "the policy: generation over gRPC, TGI and OpenAI HTTP routes, hot swap",
    "feedback": "feedback intake: validation, auth, durable hand-off to Kafka",
    "reward": "preference join, online reward-model training and scoring",
    "trainer": "continuous PPO, checkpoints, the promotion gate",
}


def _up(args: argparse.Namespace) -> int:
    from flywheel.loop.supervisor import up_main

    return up_main(args)


def _demo(args: argparse.Namespace) -> int:
    from flywheel.loop.demo import demo_main

    return demo_main(args)


def _serve(args: argparse.Namespace) -> int:
    """Hand over to the service's own entry point, `python -m flywheel.<service>`."""
    import importlib

    entry = importlib.import_module(f"flywheel.{args.service}.__main__")
    return entry.main(["--grpc-port", str(args.grpc_port), "--http-port", str(args.http_port)])


def _bench(args: argparse.Namespace) -> int:
    """List bench/*.py of this checkout, or run one with its own arguments."""
    import ast
    import subprocess

    bench_dir = CHECKOUT / "bench"
    scripts = {p.stem: p for p in sorted(bench_dir.glob("*.py"))}
    if not scripts:
        print(f"no benchmarks found in {bench_dir} (they live in a source checkout)", file=sys.stderr)
        return 2
    if args.name is None:
        for name, path in scripts.items():
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            print(f"{name:20s} {doc.splitlines()[0] if doc else ''}")
        return 0
    if args.name not in scripts:
        print(f"unknown benchmark {args.name!r}; choose one of: {', '.join(scripts)}", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(scripts[args.name]), *args.args])


def _broker(args: argparse.Namespace) -> int:
    from flywheel.core import brokers

    if args.impl == "kafka":
        try:
            sys.path.insert(0, str(CHECKOUT))
            from tools import kafka
        except ImportError:
            print(
                "--impl kafka runs Apache Kafka from its Maven jars with tools/kafka.py, which lives in a source checkout",
                file=sys.stderr,
            )
            return 2
        return kafka.main(["run", "--port", str(args.port), "--dir", args.dir])
    return brokers.run_embedded(args.port)


def _models_store(args: argparse.Namespace):
    """The configured store: with model_store.signing_key, what `models init` builds is signed (the
    chart's trainer init container), and `models verify` checks signatures as the services do."""
    from flywheel.core.config import load
    from flywheel.core.modelstore import ModelStoreConfig

    return load(ModelStoreConfig, root=args.store).store()


def _models_list(args: argparse.Namespace) -> int:
    store = _models_store(args)
    names = [args.model] if args.model else store.models()
    if not names:
        print(f"no models in {store.root}")
    for name in names:
        for m in store.list_versions(name):
            flags = " promoted" if m.promoted else ""
            gate = f" gate={m.gate}" if m.gate else ""
            metrics = " ".join(f"{k}={v:.4g}" for k, v in sorted(m.metrics.items()))
            parent = "-" if m.parent is None else f"v{m.parent}"
            created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m.created_at))
            base = f" base={m.base.model}:v{m.base.version}" if m.base is not None else ""
            kind = f"kind={m.kind}{base} bytes={m.bytes}"
            print(f"{name} v{m.version} parent={parent} {kind} {created}{flags}{gate} {metrics}".rstrip())
    return 0


def _models_lineage(args: argparse.Namespace) -> int:
    import json

    from flywheel.core.config import load
    from flywheel.core.errors import FlywheelError
    from flywheel.core.lineage import format_text, lineage
    from flywheel.reward.config import RewardModelConfig

    store = _models_store(args)
    reward_model = args.reward_model or load(RewardModelConfig).name
    try:
        data = lineage(store, args.model, args.version, reward_model)
    except FlywheelError as e:
        print(f"flywheel models lineage: {e}", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=2) if args.json else format_text(data))
    return 0


def _models_init(args: argparse.Namespace) -> int:
    from flywheel.core.config import load
    from flywheel.policy.service import ensure_starter as ensure_policy
    from flywheel.reward.config import RewardModelConfig
    from flywheel.reward.starter import ensure_starter as ensure_reward

    store = _models_store(args)
    ensure_policy(store, **({"steps": args.policy_steps} if args.policy_steps else {}), progress=True)
    reward = ensure_reward(store, load(RewardModelConfig))
    print(f"policy v0 and {reward.model} v{reward.version} are in {store.root}")
    return 0


def _models_verify(args: argparse.Namespace) -> int:
    from flywheel.core.errors import FlywheelError, NotFound

    store = _models_store(args)
    try:
        version = args.version
        if version is None:
            latest = store.latest(args.model)
            if latest is None:
                raise NotFound(f"model {args.model!r} has no versions in {store.root}")
            version = latest.version
        path = store.verify(args.model, version)
    except FlywheelError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    print(f"ok: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flywheel",
        description="Flywheel: online RLHF. Serve a policy, learn a reward model from live user feedback, "
        "improve the policy with PPO and hot-swap it while serving.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from flywheel.loop.__main__ import add_demo_arguments, add_up_arguments

    up = sub.add_parser("up", help="start the embedded broker and all four services, print their endpoints")
    add_up_arguments(up)
    up.set_defaults(run=_up)

    demo = sub.add_parser("demo", help="`up` plus a panel of simulated users; leaves DIR/report.json and report.png")
    add_demo_arguments(demo)
    demo.set_defaults(run=_demo)

    serve = sub.add_parser("serve", help="run one service (gRPC + HTTP with /metrics)")
    serve_sub = serve.add_subparsers(dest="service", required=True, metavar="SERVICE")
    from flywheel.core.config import DEFAULT_PORTS

    for name, about in ABOUT.items():
        grpc_port, http_port = DEFAULT_PORTS[name]
        s = serve_sub.add_parser(name, help=about)
        s.add_argument("--grpc-port", type=int, default=grpc_port, help=f"gRPC port (default {grpc_port})")
        s.add_argument("--http-port", type=int, default=http_port, help=f"HTTP port (default {http_port})")
        s.set_defaults(run=_serve)

    broker = sub.add_parser("broker", help="run a local Kafka-compatible broker in the foreground")
    broker.add_argument("--port", type=int, default=9092, help="listener port (default 9092)")
    broker.add_argument(
        "--impl",
        choices=["tansu", "kafka"],
        default="tansu",
        help="tansu: the embedded in-memory broker (default); kafka: Apache Kafka in KRaft mode from Maven Central jars",
    )
    broker.add_argument(
        "--dir", default=".cache/kafka", help="data directory for --impl kafka (persists across restarts)"
    )
    broker.set_defaults(run=_broker)

    models = sub.add_parser("models", help="inspect the model store (FLYWHEEL_MODEL_STORE)")
    models.add_argument("--store", default=None, help="model store root (default: FLYWHEEL_MODEL_STORE)")
    models_sub = models.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = models_sub.add_parser(
        "list", help="versions with kind (full/adapter), base, bytes, lineage, metrics and promotion"
    )
    listing.add_argument("model", nargs="?", help="model name (default: all)")
    listing.set_defaults(run=_models_list)
    verify = models_sub.add_parser("verify", help="check every file of a version against its manifest's sha256")
    verify.add_argument("model", help="model name, e.g. policy")
    verify.add_argument("version", type=int, nargs="?", default=None, help="version (default: latest)")
    verify.set_defaults(run=_models_verify)
    lineage = models_sub.add_parser(
        "lineage",
        help="a version's parent chain back to the starter, its reward versions and the Kafka offsets each trained on",
    )
    lineage.add_argument("--store", default=argparse.SUPPRESS, help="model store root (as `models --store`)")
    lineage.add_argument("model", help="model name, e.g. policy")
    lineage.add_argument("version", type=int, help="version")
    lineage.add_argument(
        "--reward-model", default=None, help="the reward model's name in the store (default: reward_model.name)"
    )
    lineage.add_argument("--json", action="store_true", help="machine-readable output")
    lineage.set_defaults(run=_models_lineage)
    init = models_sub.add_parser("init", help="build the starter policy and reward model (version 0) if missing")
    init.add_argument(
        "--policy-steps",
        type=int,
        default=None,
        help="training steps of the starter policy (default: the recipe's, 2000)",
    )
    init.set_defaults(run=_models_init)

    bench = sub.add_parser("bench", help="run the benchmarks under bench/ (each prints a ratio to its baseline)")
    bench.add_argument("name", nargs="?", help="benchmark to run (default: list them)")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark (see NAME --help)")
    bench.set_defaults(run=_bench)

    from flywheel.ops.__main__ import add_parser as add_ops_parser

    add_ops_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
