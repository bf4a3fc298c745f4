"""Thin Kubernetes API access for `flywheel ops` and the trainer's Lease.

Only the calls listed here are made (tests answer exactly these from a local HTTP server):
  GET  /api/v1/namespaces/{ns}/pods?labelSelector=...
  GET  /apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{name}
  POST /apis/coordination.k8s.io/v1/namespaces/{ns}/leases
  PUT  /apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{name}
"""

from __future__ import annotations

import dataclasses
import os

from kubernetes import client, config


def api_client(host: str | None = None, kubeconfig: str | None = None, context: str | None = None) -> client.ApiClient:
    """An ApiClient: for `host` (tests, `kubectl proxy`), else in-cluster, else kubeconfig."""
    if host:
        cfg = client.Configuration()
        cfg.host = host
        return client.ApiClient(cfg)
    if not kubeconfig and os.environ.get("KUBERNETES_SERVICE_HOST"):
        cfg = client.Configuration()
        config.load_incluster_config(client_configuration=cfg)
        return client.ApiClient(cfg)
    cfg = client.Configuration()
    config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=cfg)
    return client.ApiClient(cfg)


@dataclasses.dataclass
class PodInfo:
    """What `ops status` shows of one pod."""

    name: str
    component: str
    phase: str
    ready: bool
    restarts: int
    ip: str | None
    node: str | None
    grpc_port: int | None


def _grpc_port(spec: client.V1PodSpec | None) -> int | None:
    for container in spec.containers if spec else []:
        for port in container.ports or []:
            if port.name == "grpc":
                return port.container_port
    return None


def _pod_info(pod: client.V1Pod) -> PodInfo:
    # The API server fills these in for every listed pod; the client's models type them optional.
    meta = pod.metadata or client.V1ObjectMeta()
    status = pod.status or client.V1PodStatus()
    labels = meta.labels or {}
    conditions = {c.type: c.status for c in status.conditions or []}
    return PodInfo(
        name=meta.name or "?",
        component=labels.get("app.kubernetes.io/component", "?"),
        phase=status.phase or "Unknown",
        ready=conditions.get("Ready") == "True",
        restarts=sum(s.restart_count or 0 for s in status.container_statuses or []),
        ip=status.pod_ip,
        node=pod.spec.node_name if pod.spec else None,
        grpc_port=_grpc_port(pod.spec),
    )


def list_pods(api: client.ApiClient, namespace: str, release: str, name: str = "flywheel") -> list[PodInfo]:
    """Pods of a Helm release (the chart's selector labels), sorted by component and name."""
    selector = f"app.kubernetes.io/name={name},app.kubernetes.io/instance={release}"
    pods = client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=selector, _request_timeout=10)
    return sorted((_pod_info(pod) for pod in pods.items), key=lambda p: (p.component, p.name))


def coordination(api: client.ApiClient) -> client.CoordinationV1Api:
    return client.CoordinationV1Api(api)
