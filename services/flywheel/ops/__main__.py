"""`flywheel ops`: operate a Flywheel release on Kubernetes.

  status    pods of the release, the policy version each policy replica serves (Policy.GetInfo
            on the pod's IP), the trainer's state, step and consumer lag (Trainer.GetStatus),
            and which trainer pod holds the Lease
  promote   announce a version, bypassing the gate (Trainer.Promote)
  rollback  announce an earlier promoted version again (Trainer.Rollback)

Trainer RPCs carry the admin token as `authorization: Bearer <token>` metadata. Pod IPs are
reachable from inside the cluster (or a VPN into the pod network); from a laptop, port-forward
the trainer Service and pass --trainer-addr.

TLS: the `tls` config section (FLYWHEEL_TLS_* variables) or the --tls-* flags. With a CA file
every call is TLS; a policy pod, dialed by IP, must present a certificate for its Service's name
(<release>-policy.<namespace>.svc) unless --tls-server-name names another.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flywheel.core.tls import TlsConfig

# grpc and the kubernetes client load inside the commands: `flywheel --help` stays instant.
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def default_namespace() -> str:
    """The pod's own namespace inside a cluster, else FLYWHEEL_NAMESPACE, else 'flywheel'."""
    if SERVICE_ACCOUNT_NAMESPACE.is_file():
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "flywheel"
    return os.environ.get("FLYWHEEL_NAMESPACE", "flywheel")


def fullname(release: str) -> str:
    """The chart's `flywheel.fullname` (no overrides): the release name if it contains 'flywheel'."""
    return release if "flywheel" in release else f"{release}-flywheel"


def _metadata(token: str | None) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")] if token else []


def policy_info(addr: str, timeout: float, tls: TlsConfig | None = None) -> dict[str, Any]:
    """Policy.GetInfo of one replica, or {'error': ...}. `tls`: None reads the `tls` config section."""
    import grpc

    from flywheel.core.tls import channel as open_channel
    from flywheel.v1 import policy_pb2, policy_pb2_grpc

    try:
        with open_channel(addr, tls) as channel:
            info = policy_pb2_grpc.PolicyStub(channel).GetInfo(policy_pb2.GetInfoRequest(), timeout=timeout)
    except grpc.RpcError as e:
        return {"error": f"{e.code().name}: {e.details()}"}
    return {
        "policy_version": info.policy_version,
        "model": info.model,
        "device": info.device,
        "running": info.running_sequences,
        "waiting": info.waiting_requests,
        "spooled": info.spooled_interactions,
        "last_swap_error": info.last_swap_error,
    }


def trainer_call(
    addr: str, token: str | None, method: str, request: Any, timeout: float, tls: TlsConfig | None = None
) -> Any:
    """One Trainer RPC with the admin token; raises grpc.RpcError. `tls`: None reads the `tls` config section."""
    from flywheel.core.tls import channel as open_channel
    from flywheel.v1 import trainer_pb2_grpc

    with open_channel(addr, tls) as channel:
        stub = trainer_pb2_grpc.TrainerStub(channel)
        return getattr(stub, method)(request, timeout=timeout, metadata=_metadata(token))


def status_dict(status: Any) -> dict[str, Any]:
    return {
        "state": status.state,
        "step": status.step,
        "serving_version": status.serving_version,
        "training_version": status.training_version,
        "consumer_lag": status.consumer_lag,
        "waiting_for": status.waiting_for,
        "failing_steps": status.failing_steps,
        "last_error": status.last_error,
        "metrics": dict(status.metrics),
    }


def _trainer_addr(args: argparse.Namespace) -> str:
    if args.trainer_addr:
        return args.trainer_addr
    return os.environ.get("FLYWHEEL_TRAINER_ADDR") or f"{fullname(args.release)}-trainer.{args.namespace}.svc:50054"


def client_tls(args: argparse.Namespace) -> TlsConfig:
    """The `tls` section (file, environment) with the --tls-* flags over it; ConfigError if wrong."""
    from flywheel.core.config import load_section
    from flywheel.core.tls import TlsConfig

    return load_section(
        TlsConfig,
        ca_file=args.tls_ca_file,
        client_cert_file=args.tls_cert_file,
        client_key_file=args.tls_key_file,
        server_name=args.tls_server_name,
    )


def _pod_tls(args: argparse.Namespace, tls: TlsConfig) -> TlsConfig:
    """Pods are dialed by IP: check their certificate against the policy Service's name."""
    if not tls.client_enabled or tls.server_name:
        return tls
    return dataclasses.replace(tls, server_name=f"{fullname(args.release)}-policy.{args.namespace}.svc")


def collect_status(args: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    """Everything `status` shows, and whether every part answered."""
    import grpc

    from flywheel.ops import k8s
    from flywheel.v1 import trainer_pb2

    ok = True
    tls = args.tls
    out: dict[str, Any] = {"namespace": args.namespace, "release": args.release, "pods": [], "lease": None}
    try:
        api = k8s.api_client(args.api_server, args.kubeconfig, args.context)
        pods = k8s.list_pods(api, args.namespace, args.release)
        for pod in pods:
            row = dataclasses.asdict(pod)
            if pod.component == "policy" and pod.ip and pod.grpc_port and pod.phase == "Running":
                row["info"] = policy_info(f"{pod.ip}:{pod.grpc_port}", args.timeout, _pod_tls(args, tls))
                ok &= "error" not in row["info"]
            out["pods"].append(row)
        lease = k8s.coordination(api).read_namespaced_lease(
            f"{fullname(args.release)}-trainer", args.namespace, _request_timeout=10
        )
        spec = lease.spec
        holder, renewed = (spec.holder_identity, spec.renew_time) if spec else (None, None)
        out["lease"] = {"holder": holder, "renew_time": str(renewed)}
    except Exception as e:  # no cluster access: still report what the trainer says
        status = getattr(e, "status", None)
        if status == 404 and out["pods"]:
            out["lease"] = {"holder": None, "renew_time": None}
        else:
            out["kubernetes_error"] = f"{type(e).__name__}: {getattr(e, 'reason', None) or e}"
            ok = False
    try:
        request = trainer_pb2.GetStatusRequest()
        st = trainer_call(_trainer_addr(args), args.token, "GetStatus", request, args.timeout, tls)
        out["trainer"] = status_dict(st)
    except grpc.RpcError as e:
        out["trainer"] = {"error": f"{e.code().name}: {e.details()}"}
        ok = False
    return out, ok


def print_status(s: dict[str, Any]) -> None:
    print(f"release {s['release']} in namespace {s['namespace']}")
    if "kubernetes_error" in s:
        print(f"  kubernetes: {s['kubernetes_error']}")
    print(f"  {'COMPONENT':<9} {'POD':<40} {'PHASE':<10} {'READY':<5} {'RESTARTS':>8}  SERVES")
    for p in s["pods"]:
        info = p.get("info") or {}
        serves = info.get("error") or (f"v{info['policy_version']}" if "policy_version" in info else "")
        if info.get("last_swap_error"):
            serves += f" (last swap error: {info['last_swap_error']})"
        ready = "yes" if p["ready"] else "no"
        print(f"  {p['component']:<9} {p['name']:<40} {p['phase']:<10} {ready:<5} {p['restarts']:>8}  {serves}")
    versions = {p["info"]["policy_version"] for p in s["pods"] if "policy_version" in (p.get("info") or {})}
    if len(versions) > 1:
        print(f"  policy replicas serve different versions: {sorted(versions)} (a swap is in progress or stuck)")
    if s.get("lease"):
        print(f"  trainer lease holder: {s['lease']['holder'] or '(none)'}")
    t = s.get("trainer") or {}
    if "error" in t:
        print(f"  trainer: {t['error']}")
    else:
        metrics = " ".join(f"{k}={v:.4g}" for k, v in sorted(t["metrics"].items()))
        print(
            f"  trainer: {t['state']} step={t['step']} serving=v{t['serving_version']} "
            f"training=v{t['training_version']} lag={t['consumer_lag']} {metrics}".rstrip()
        )
        if t.get("waiting_for"):
            print(f"    waiting for the reward model: {t['waiting_for']}")
        if t.get("failing_steps"):
            print(f"    {t['failing_steps']} steps failed in a row; last: {t['last_error']}")


def _status(args: argparse.Namespace) -> int:
    s, ok = collect_status(args)
    if args.json:
        print(json.dumps(s, indent=2, default=str))
    else:
        print_status(s)
    return 0 if ok else 1


def _announce(args: argparse.Namespace) -> int:
    import grpc

    from flywheel.v1 import trainer_pb2

    if not args.token:
        print("flywheel ops: the Trainer needs the admin token: set FLYWHEEL_ADMIN_TOKEN or --token", file=sys.stderr)
        return 2
    method, req = (
        ("Promote", trainer_pb2.PromoteRequest)
        if args.action == "promote"
        else ("Rollback", trainer_pb2.RollbackRequest)
    )
    try:
        request = req(version=args.version, reason=args.reason)
        st = trainer_call(_trainer_addr(args), args.token, method, request, args.timeout, args.tls)
    except grpc.RpcError as e:
        print(f"flywheel ops {args.action} v{args.version}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    print(f"{args.action} v{args.version}: serving v{st.serving_version} (trainer {st.state}, step {st.step})")
    return 0


def add_parser(sub: Any, name: str = "ops") -> argparse.ArgumentParser:
    """Add `ops` with its actions to a subparsers object (the `flywheel` CLI calls this)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-n", "--namespace", default=default_namespace(), help="namespace of the release")
    common.add_argument("--release", default="flywheel", help="Helm release name (default flywheel)")
    common.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: in-cluster, then ~/.kube/config)")
    common.add_argument("--context", default=None, help="kubeconfig context")
    common.add_argument("--api-server", default=None, help="Kubernetes API URL without auth, e.g. from `kubectl proxy`")
    common.add_argument(
        "--trainer-addr",
        default=None,
        help="trainer gRPC host:port (default FLYWHEEL_TRAINER_ADDR, else the release's trainer Service)",
    )
    common.add_argument(
        "--token", default=os.environ.get("FLYWHEEL_ADMIN_TOKEN"), help="admin token (default FLYWHEEL_ADMIN_TOKEN)"
    )
    common.add_argument("--timeout", type=float, default=5.0, help="seconds per RPC (default 5)")
    for flag, field in (
        ("--tls-ca-file", "ca_file"),
        ("--tls-cert-file", "client_cert_file"),
        ("--tls-key-file", "client_key_file"),
        ("--tls-server-name", "server_name"),
    ):
        common.add_argument(flag, default=None, help=f"overrides tls.{field} (see docs/CONFIG.md, TLS)")

    p = sub.add_parser(name, help="operate a Kubernetes deployment: status, promote, rollback", description=__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    st = actions.add_parser("status", parents=[common], help="pods, served policy versions, trainer step and lag")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(run=_with_tls(_status))
    for action, about in (
        ("promote", "announce a version to the policy replicas, bypassing the gate"),
        ("rollback", "announce an earlier promoted version again"),
    ):
        a = actions.add_parser(action, parents=[common], help=about)
        a.add_argument("version", type=int, help="model-store version")
        a.add_argument("--reason", default="", help="why (recorded in the trainer's log)")
        a.set_defaults(run=_with_tls(_announce))
    return p


def build_parser() -> argparse.ArgumentParser:
    """`python -m flywheel.ops`: the same command as `flywheel ops`."""
    root = argparse.ArgumentParser(prog="flywheel")
    return add_parser(root.add_subparsers(dest="command", required=True), "ops")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


def _with_tls(run: Any) -> Any:
    """Resolve the TLS settings once, before any call: a wrong one is a usage error (exit 2)."""

    def wrapped(args: argparse.Namespace) -> int:
        from flywheel.core.config import ConfigError

        try:
            args.tls = client_tls(args)
        except ConfigError as e:
            print(f"flywheel ops: {e}", file=sys.stderr)
            return 2
        return run(args)

    return wrapped


if __name__ == "__main__":
    sys.exit(main())
