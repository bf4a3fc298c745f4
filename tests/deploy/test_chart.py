"""The Helm chart: lint, render, validate every object offline, and policy checks.

helm is built from source by scripts/helm (go install, cached in ~/.cache/flywheel/bin);
objects are validated against the Kubernetes 1.37 JSON schemas that the PyPI package
kubernetes-validate bundles (strict: unknown fields are errors; no network needed).
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "flywheel"
VALUES = ["values.yaml", "values-gpu.yaml", "values-minimal.yaml"]
K8S_VERSION = "1.37.0"
SERVICES = ["policy", "feedback", "reward", "trainer"]
CRDS = {"monitoring.coreos.com/v1/ServiceMonitor", "kafka.strimzi.io/v1beta2/KafkaTopic"}


@functools.cache
def helm() -> str:
    cached = sorted((Path.home() / ".cache" / "flywheel" / "bin").glob("helm-*"))
    if not cached and shutil.which("go") is None:
        pytest.skip("helm is not cached in ~/.cache/flywheel/bin and Go is not installed to build it (scripts/helm)")
    out = subprocess.run([str(ROOT / "scripts" / "helm")], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"scripts/helm failed:\n{out.stderr}"
    return out.stdout.strip().splitlines()[-1]


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm(), *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


@functools.cache
def render(values: str, *extra: str) -> tuple[dict[str, Any], ...]:
    out = run_helm("template", "flywheel", str(CHART), "-n", "flywheel", "-f", str(CHART / values), *extra)
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def kind_of(obj: dict[str, Any]) -> str:
    return f"{obj['apiVersion']}/{obj['kind']}"


def by_kind(objs: tuple[dict[str, Any], ...], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def workloads(objs: tuple[dict[str, Any], ...]) -> dict[str, dict[str, Any]]:
    """Deployments and StatefulSets (services with persistent state) by name."""
    return by_kind(objs, "Deployment") | by_kind(objs, "StatefulSet")


@pytest.mark.parametrize("values", VALUES)
def test_lint_strict(values: str) -> None:
    out = run_helm("lint", "--strict", str(CHART), "-f", str(CHART / values))
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("values", VALUES)
def test_every_object_valid_against_kubernetes_schemas(values: str) -> None:
    import kubernetes_validate

    objs = render(values)
    assert len(objs) > 10
    for obj in objs:
        if kind_of(obj) in CRDS:
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{values}: {obj['kind']}/{obj['metadata']['name']}: {e}")


def test_validator_catches_a_bad_object() -> None:
    """The schemas are really applied: an unknown field and a wrong type both fail."""
    import kubernetes_validate

    deployment = next(o for o in render("values.yaml") if o["kind"] == "Deployment")
    bad = yaml.safe_load(yaml.safe_dump(deployment))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpcc"] = {"port": 1}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    bad = yaml.safe_load(yaml.safe_dump(deployment))
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


@pytest.mark.parametrize("values", VALUES)
def test_containers_have_resources_probes_and_run_as_non_root(values: str) -> None:
    deployments = workloads(render(values))
    assert sorted(deployments) == [f"flywheel-{s}" for s in sorted(SERVICES)]
    for name, d in deployments.items():
        pod = d["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        for c in pod["containers"]:
            res = c["resources"]
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res[part]), f"{name}: {part} needs cpu and memory"
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in c, f"{name}: no {probe}"
            grpc_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
            assert c["readinessProbe"]["grpc"]["port"] == grpc_port, name
            assert c["livenessProbe"]["httpGet"]["path"] == "/live", name
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], name
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            assert "/tmp" in mounts, f"{name}: read-only root needs a writable /tmp"


@pytest.mark.parametrize(
    ("values", "gpu_services"), [("values.yaml", 3), ("values-gpu.yaml", 3), ("values-minimal.yaml", 0)]
)
def test_gpu_deployments_request_nvidia_gpus(values: str, gpu_services: int) -> None:
    deployments = workloads(render(values))
    with_gpu = []
    for name, d in deployments.items():
        pod = d["spec"]["template"]["spec"]
        limits = pod["containers"][0]["resources"]["limits"]
        image = pod["containers"][0]["image"]
        if "nvidia.com/gpu" in limits:
            with_gpu.append(name)
            assert int(limits["nvidia.com/gpu"]) >= 1
            assert image.endswith("-cuda"), f"{name}: a GPU pod needs the CUDA image, got {image}"
            assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])), name
    assert len(with_gpu) == gpu_services, with_gpu
    if gpu_services:
        assert "flywheel-feedback" not in with_gpu and "flywheel-policy" in with_gpu


def test_policy_rollout_pdb_and_hpa() -> None:
    objs = render("values.yaml")
    policy = by_kind(objs, "Deployment")["flywheel-policy"]
    assert policy["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    assert "replicas" not in policy["spec"], "the HPA owns replicas"
    assert set(by_kind(objs, "PodDisruptionBudget")) >= {"flywheel-policy"}
    hpas = by_kind(objs, "HorizontalPodAutoscaler")
    assert set(hpas) == {"flywheel-policy", "flywheel-feedback"}
    assert hpas["flywheel-policy"]["spec"]["scaleTargetRef"]["name"] == "flywheel-policy"


def test_trainer_single_active_replica_lease() -> None:
    objs = render("values-gpu.yaml")
    trainer = by_kind(objs, "Deployment")["flywheel-trainer"]
    assert trainer["spec"]["replicas"] == 2 and trainer["spec"]["strategy"]["type"] == "Recreate"
    pod = trainer["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is True
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["FLYWHEEL_TRAINER_LEASE_NAME"]["value"] == "flywheel-trainer"
    assert env["FLYWHEEL_TRAINER_LEASE_IDENTITY"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["FLYWHEEL_TRAINER_REWARD_ADDR"]["value"] == "flywheel-reward:50053"
    role = by_kind(objs, "Role")["flywheel-trainer-lease"]
    verbs = {v for r in role["rules"] if r["resources"] == ["leases"] for v in r["verbs"]}
    assert {"get", "create", "update"} <= verbs
    others = [d for n, d in workloads(objs).items() if n != "flywheel-trainer"]
    assert all(d["spec"]["template"]["spec"]["automountServiceAccountToken"] is False for d in others)


def test_config_secret_and_model_store() -> None:
    objs = render("values.yaml")
    cm = by_kind(objs, "ConfigMap")["flywheel-config"]["data"]
    assert cm["FLYWHEEL_KAFKA_BOOTSTRAP"] == "kafka:9092"
    assert cm["FLYWHEEL_TRAINER_ADDR"] == "flywheel-trainer:50054"
    assert cm["FLYWHEEL_TOPICS_POLICY_UPDATES"] == "flywheel.policy.updates"
    secret = by_kind(objs, "Secret")["flywheel-secrets"]
    assert set(secret["data"]) == {"hmac-key", "admin-token", "api-keys", "kafka-sasl-password"}
    assert secret["data"]["hmac-key"], "an HMAC key is generated when none is given"
    pvc = by_kind(objs, "PersistentVolumeClaim")["flywheel-models"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for name in ("flywheel-policy", "flywheel-reward", "flywheel-trainer"):
        env = by_kind(objs, "Deployment")[name]["spec"]["template"]["spec"]["containers"][0]["env"]
        names = {e["name"] for e in env}
        assert {
            "FLYWHEEL_MODEL_STORE_ROOT",
            "FLYWHEEL_AUTH_HMAC_KEY",
            "FLYWHEEL_AUTH_ADMIN_TOKEN",
            "FLYWHEEL_AUTH_API_KEYS",
        } <= names


# Trainer and reward settings the chart may set: where things are, not how they learn.
PLUMBING = {"device", "reward_addr", "state_dir", "base_model", "group"}


@pytest.mark.parametrize("values", VALUES)
def test_the_chart_learns_with_the_shipped_defaults(values: str) -> None:
    """No training setting of the trainer or the reward model in any rendered env or ConfigMap: an
    install learns with the defaults `flywheel bench learning` measures."""
    from flywheel.core.config import env_vars
    from flywheel.reward.config import JoinConfig, RewardModelConfig, TrainConfig
    from flywheel.trainer.config import TrainerConfig

    training = {
        name
        for c in (TrainerConfig, TrainConfig, JoinConfig, RewardModelConfig)
        for field, var in env_vars(c).items()
        if field not in PLUMBING
        for name in (var.name, var.deprecated_alias)
        if name
    }
    objs = render(values)
    names = {k for cm in by_kind(objs, "ConfigMap").values() for k in cm.get("data", {})}
    for w in workloads(objs).values():
        for c in w["spec"]["template"]["spec"]["containers"]:
            names |= {e["name"] for e in c.get("env", [])}
    assert training, "no training settings found: env_name changed?"
    assert not names & training, sorted(names & training)


def test_env_values_override_the_configmap_defaults() -> None:
    objs = render("values.yaml", "--set", "env.HF_HUB_OFFLINE=0", "--set", "env.FLYWHEEL_EXTRA=yes")
    cm = by_kind(objs, "ConfigMap")["flywheel-config"]["data"]
    assert (cm["HF_HUB_OFFLINE"], cm["FLYWHEEL_EXTRA"], cm["FLYWHEEL_SERVER_DRAIN_S"]) == ("0", "yes", "5")
    # A setting's deprecated name in `env` still overrides the chart's default under the new name.
    cm = by_kind(render("values.yaml", "--set", "env.FLYWHEEL_DRAIN_S=9"), "ConfigMap")["flywheel-config"]["data"]
    assert cm["FLYWHEEL_DRAIN_S"] == "9" and "FLYWHEEL_SERVER_DRAIN_S" not in cm


def test_gpu_values_strimzi_topics_tls_and_servicemonitor() -> None:
    objs = render("values-gpu.yaml")
    topics = {o["spec"]["topicName"]: o for o in objs if o["kind"] == "KafkaTopic"}
    assert set(topics) == {
        "flywheel.interactions",
        "flywheel.feedback",
        "flywheel.preferences",
        "flywheel.policy.updates",
        "flywheel.reward.updates",
        "flywheel.dlq",
    }
    for name, t in topics.items():
        assert t["metadata"]["labels"]["strimzi.io/cluster"] == "my-cluster"
        compacted = name.endswith(".updates")
        assert (t["spec"]["config"].get("cleanup.policy") == "compact") == compacted, name
        assert t["spec"]["partitions"] == (1 if compacted else 12)
    cm = by_kind(objs, "ConfigMap")["flywheel-config"]["data"]
    assert cm["FLYWHEEL_KAFKA_BOOTSTRAP"] == "my-cluster-kafka-bootstrap.flywheel.svc:9092"
    assert cm["FLYWHEEL_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    policy = by_kind(objs, "Deployment")["flywheel-policy"]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "FLYWHEEL_KAFKA_SSL_CAFILE", "value": "/etc/flywheel/kafka-ca/ca.crt"} in policy["env"]
    (monitor,) = [o for o in objs if o["kind"] == "ServiceMonitor"]
    assert monitor["spec"]["endpoints"][0] == {
        "port": "http",
        "path": "/metrics",
        "interval": "30s",
        "scrapeTimeout": "10s",
    }


def test_state_survives_the_pod_with_a_statefulset() -> None:
    default = workloads(render("values.yaml"))
    feedback = default["flywheel-feedback"]
    assert feedback["kind"] == "Deployment"
    env = {e["name"]: e.get("value") for e in feedback["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["FLYWHEEL_FEEDBACK_STATE_DIR"] == "/var/lib/flywheel/feedback"
    objs = render("values-gpu.yaml")
    for name in ("flywheel-feedback", "flywheel-reward"):
        sts = by_kind(objs, "StatefulSet")[name]
        (claim,) = sts["spec"]["volumeClaimTemplates"]
        assert claim["metadata"]["name"] == "state" and claim["spec"]["accessModes"] == ["ReadWriteOnce"]
        volumes = {v["name"] for v in sts["spec"]["template"]["spec"]["volumes"]}
        assert "state" not in volumes, "the claim template provides the state volume"
    hpa = by_kind(objs, "HorizontalPodAutoscaler")["flywheel-feedback"]
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "StatefulSet"


def test_helm_test_hook_checks_every_service() -> None:
    (pod,) = [o for o in render("values.yaml") if o["kind"] == "Pod"]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    args = pod["spec"]["containers"][0]["args"]
    assert args[1:] == [
        "flywheel-policy:50051",
        "flywheel-feedback:50052",
        "flywheel-reward:50053",
        "flywheel-trainer:50054",
    ]
    compile(args[0], "helm-test", "exec")  # the embedded check is valid Python


def test_helm_test_script_against_a_real_health_server() -> None:
    """Run the hook's Python against a grpc.health.v1 server: SERVING passes, NOT_SERVING fails."""
    import sys
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    (pod,) = [o for o in render("values.yaml") if o["kind"] == "Pod"]
    script = pod["spec"]["containers"][0]["args"][0]
    server = grpc.server(futures.ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        for status, rc in (
            (health_pb2.HealthCheckResponse.SERVING, 0),
            (health_pb2.HealthCheckResponse.NOT_SERVING, 1),
        ):
            servicer.set("", status)
            out = subprocess.run(
                [sys.executable, "-c", script, f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=60
            )
            assert out.returncode == rc, out.stdout + out.stderr
    finally:
        server.stop(0)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("kafka.securityProtocol=PLAIN_TEXT", "securityProtocol"),
        ("policy.gpus=-1", "gpus"),
        ("policy.imageVariant=rocm", "imageVariant"),
        ("kafka.bootstrap=no-port", "bootstrap"),
        ("trainer.strategy=BlueGreen", "strategy"),
    ],
)
def test_schema_rejects_bad_values(setting: str, message: str) -> None:
    out = run_helm("template", "flywheel", str(CHART), "--set", setting)
    assert out.returncode != 0 and message in out.stderr, out.stderr


def test_empty_bootstrap_without_strimzi_fails_clearly() -> None:
    out = run_helm("template", "flywheel", str(CHART), "--set", "kafka.bootstrap=")
    assert out.returncode != 0 and "kafka.bootstrap is empty" in out.stderr


def test_rendered_manifests_are_fresh() -> None:
    helm()  # build or locate helm (skips with the reason if it cannot)
    out = subprocess.run(
        [str(ROOT / "scripts" / "render-manifests"), "--check"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr + "\nrun scripts/render-manifests and commit deploy/manifests/flywheel.yaml"
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy" / "manifests" / "flywheel.yaml").read_text()) if d]
    kinds = {d["kind"] for d in docs}
    assert "Secret" not in kinds and "Pod" not in kinds, "kubectl manifests carry no secrets and no test hook"
    assert {"Deployment", "Service", "ConfigMap", "PersistentVolumeClaim", "NetworkPolicy"} <= kinds


def test_dockerfile_is_multi_stage_non_root_with_the_flywheel_entrypoint() -> None:
    """No container engine here: check the Dockerfile's contract with the chart textually."""
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    stages = re.findall(r"^FROM \$\{BASE_IMAGE\} AS (\w+)$", text, re.M)
    assert stages == ["build", "runtime"]
    assert re.search(r"^ARG BASE_IMAGE=python:3\.1[12]-slim", text, re.M)
    assert "ARG TORCH_INDEX_URL=" in text
    runtime = text.split("AS runtime", 1)[1]
    assert re.search(r"^USER 10001:10001$", runtime, re.M), "the chart's runAsUser"
    assert 'ENTRYPOINT ["flywheel"]' in runtime and 'CMD ["serve", "policy"]' in runtime
    for svc in ("policy", "feedback", "reward", "trainer"):
        pod = workloads(render("values.yaml"))[f"flywheel-{svc}"]["spec"]["template"]["spec"]
        assert pod["containers"][0]["args"][:2] == ["serve", svc]
        assert pod["securityContext"]["runAsUser"] == 10001


def test_dockerfile_installs_the_package_alone_and_checks_it_outside_the_source_tree() -> None:
    """The build stage copies the package (services/) and its metadata, never the development tree
    (protos/: the generated code is committed; tools/, tests/, bench/), and checks the installed
    package from `/` once /src is gone; the runtime stage checks the copied venv runs `flywheel`.
    tests/deploy/test_wheel.py builds and runs the wheel from the same COPY lines."""
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    build, runtime = text.split("AS runtime", 1)
    copied = [w for line in re.findall(r"^COPY (?!--from)(.+)$", build, re.M) for w in line.split()[:-1]]
    assert sorted(copied) == ["README.md", "pyproject.toml", "services"]
    for path in copied:
        assert (ROOT / path).exists(), path
    after_install = build.split("RUN pip install .", 1)[1]
    assert re.search(r"rm -rf /src", after_install) and re.search(r"^WORKDIR /$", after_install, re.M)
    check = re.search(r"^RUN (.*)$", after_install.split("WORKDIR /\n", 1)[1], re.M)
    assert check and "import flywheel.cli, flywheel.v1.trainer_pb2" in check[1] and "flywheel --help" in check[1]
    assert re.search(r"^RUN flywheel --help", runtime.split("COPY --from=build /opt/venv", 1)[1], re.M)
    # BuildKit's per-Dockerfile ignore file keeps a checkout's build leftovers out of services/.
    ignored = set((ROOT / "deploy" / "Dockerfile.dockerignore").read_text().split())
    assert {"**/__pycache__", "**/*.egg-info"} <= ignored
