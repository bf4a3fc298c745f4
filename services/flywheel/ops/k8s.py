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


def _grpc_port(pod: client.V1Pod) -> int | None:
    for container in pod.spec.containers or []:
        for port in container.ports or []:
            if port.name == "grpc":
                return port.container_port
    return None


def list_pods(api: client.ApiClient, namespace: str, release: str, name: str = "flywheel") -> list[PodInfo]:
    """Pods of a Helm release (the chart's selector labels), sorted by component and name."""
    selector = f"app.kubernetes.io/name={name},app.kubernetes.io/instance={release}"
    pods = client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=selector, _request_timeout=10)
    out = []
    for pod in pods.items:
        labels = pod.metadata.labels or {}
        statuses = pod.status.container_statuses or []
        conditions = {c.type: c.status for c in pod.status.conditions or []}
        out.append(
            PodInfo(
                name=pod.metadata.name,
                component=labels.get("app.kubernetes.io/component", "?"),
                phase=pod.status.phase or "Unknown",
                ready=conditions.get("Ready") == "True",
                restarts=sum(s.restart_count or 0 for s in statuses),
                ip=pod.status.pod_ip,
                node=pod.spec.node_name,
                grpc_port=_grpc_port(pod),
            )
        )
    return sorted(out, key=lambda p: (p.component, p.name))


def coordination(api: client.ApiClient) -> client.CoordinationV1Api:
    return client.CoordinationV1Api(api)
