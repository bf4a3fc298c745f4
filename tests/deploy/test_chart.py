"""The Helm chart: lint, render, validate every object offline, and policy checks.

helm is built from source by scripts/helm (go install, cached in ~/.cache/flywheel/bin);
objects are validated against the Kubernetes 1.37 JSON schemas that the PyPI package
kubernetes-validate bundles (strict: unknown fields are errors; no network needed).
"""

from __future__ import annotations

import base64
import functools
import hashlib
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
        for c in pod.get("initContainers", []):  # the trainer's models-init: the same limits apply
            assert {"cpu", "memory"} <= set(c["resources"]["limits"]), name
            assert "nvidia.com/gpu" not in c["resources"]["limits"], f"{name}: the starters build on the CPU"
            assert c["securityContext"] == pod["containers"][0]["securityContext"], name
            assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}, name


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


def test_a_trainer_with_several_gpus_runs_one_process_per_gpu_under_torchrun() -> None:
    """trainer.gpus > 1: the pod asks for them and starts the data-parallel trainer (rank 0 serves)."""
    pod = by_kind(render("values.yaml", "--set", "trainer.gpus=4"), "Deployment")["flywheel-trainer"]["spec"]
    c = pod["template"]["spec"]["containers"][0]
    assert c["command"] == [
        "python",
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--max-restarts",
        "3",
        "--nproc-per-node",
        "4",
        "-m",
        "flywheel.trainer",
    ]
    assert c["args"] == ["--grpc-port", "50054", "--http-port", "8084"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 4
    one = by_kind(render("values.yaml"), "Deployment")["flywheel-trainer"]["spec"]["template"]["spec"]["containers"][0]
    assert "command" not in one and one["args"][:2] == ["serve", "trainer"]  # one GPU: the plain service


def test_config_and_model_store() -> None:
    objs = render("values.yaml")
    cm = by_kind(objs, "ConfigMap")["flywheel-config"]["data"]
    assert cm["FLYWHEEL_KAFKA_BOOTSTRAP"] == "kafka:9092"
    assert cm["FLYWHEEL_TRAINER_ADDR"] == "flywheel-trainer:50054"
    assert cm["FLYWHEEL_TOPICS_POLICY_UPDATES"] == "flywheel.policy.updates"
    pvc = by_kind(objs, "PersistentVolumeClaim")["flywheel-models"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for name in ("flywheel-policy", "flywheel-reward", "flywheel-trainer"):
        env = env_of(workloads(objs)[name])
        assert env["FLYWHEEL_MODEL_STORE_ROOT"] == "/models"
    assert "FLYWHEEL_MODEL_STORE_ROOT" not in env_of(workloads(objs)["flywheel-feedback"])


def env_of(workload: dict[str, Any], container: str | None = None) -> dict[str, Any]:
    """A container's env (the first one, or the named container or init container): name -> value,
    or the valueFrom of a variable read from elsewhere."""
    pod = workload["spec"]["template"]["spec"]
    c = next(c for c in pod["containers"] + pod.get("initContainers", []) if container in (None, c["name"]))
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def secret_refs(workload: dict[str, Any]) -> dict[str, tuple[str, str, bool]]:
    """Variables read from a Secret: name -> (secret, key, optional)."""
    refs = {}
    for name, value in env_of(workload).items():
        if isinstance(value, dict) and "secretKeyRef" in value:
            ref = value["secretKeyRef"]
            refs[name] = (ref["name"], ref["key"], ref.get("optional", False))
    return refs


def secret_volume_keys(workload: dict[str, Any]) -> dict[str, set[str]]:
    """Secret name -> the keys the pod's volumes project from it."""
    out: dict[str, set[str]] = {}
    for vol in workload["spec"]["template"]["spec"]["volumes"]:
        sources = [vol["secret"] | {"name": vol["secret"]["secretName"]}] if "secret" in vol else []
        sources += [s["secret"] for s in vol.get("projected", {}).get("sources", []) if "secret" in s]
        for src in sources:
            out.setdefault(src["name"], set()).update(i["key"] for i in src.get("items", [{"key": "*"}]))
    return out


# What each service reads from its Secret (docs/SECURITY.md): variable -> key. The signing key is a file.
SECRETS_OF = {
    "policy": {
        "FLYWHEEL_AUTH_HMAC_KEY": "hmac-key",
        "FLYWHEEL_AUTH_API_KEYS": "api-keys",
        "FLYWHEEL_AUTH_ADMIN_TOKEN_SHA256": "admin-token-sha256",
        "FLYWHEEL_MODEL_STORE_TRUSTED_KEYS": "model-trusted-keys",
    },
    "feedback": {"FLYWHEEL_AUTH_HMAC_KEY": "hmac-key", "FLYWHEEL_AUTH_API_KEYS": "api-keys"},
    "reward": {
        "FLYWHEEL_AUTH_API_KEYS": "api-keys",
        "FLYWHEEL_AUTH_SERVICE_TOKEN": "service-token",
        "FLYWHEEL_MODEL_STORE_TRUSTED_KEYS": "model-trusted-keys",
    },
    "trainer": {
        "FLYWHEEL_AUTH_ADMIN_TOKEN": "admin-token",
        "FLYWHEEL_AUTH_SERVICE_TOKEN": "service-token",
        "FLYWHEEL_MODEL_STORE_TRUSTED_KEYS": "model-trusted-keys",
    },
}
SIGNERS = {"reward", "trainer"}  # with reward.train (the default)
SIGNING_KEY_FILE = "/etc/flywheel/signing/model-signing.key"


@pytest.mark.parametrize("values", VALUES)
def test_each_service_gets_exactly_its_own_secrets(values: str) -> None:
    """Per service one Secret with exactly its keys, read by exactly its variables: the policy holds
    neither the admin token (only its hash) nor the signing key; feedback no signing key, admin or
    service token. The Kafka password goes to every pod when Kafka uses SASL (values-gpu.yaml)."""
    objs = render(values)
    sasl = values == "values-gpu.yaml"
    secrets = by_kind(objs, "Secret")
    assert set(secrets) == {f"flywheel-{svc}-secrets" for svc in SERVICES}
    for svc in SERVICES:
        w = workloads(objs)[f"flywheel-{svc}"]
        expected = dict(SECRETS_OF[svc]) | ({"FLYWHEEL_KAFKA_SASL_PASSWORD": "kafka-sasl-password"} if sasl else {})
        refs = secret_refs(w)
        assert {n: key for n, (_, key, _) in refs.items()} == expected, svc
        assert {secret for secret, _, _ in refs.values()} == {f"flywheel-{svc}-secrets"}, svc
        optional = {key for _, key, opt in refs.values() if opt}
        assert optional <= {"api-keys", "kafka-sasl-password"}, f"{svc}: a security key must not be optional"
        signing = {f"flywheel-{svc}-secrets": {"model-signing-key"}} if svc in SIGNERS else {}
        assert secret_volume_keys(w) == signing | ({"my-cluster-cluster-ca-cert": {"*"}} if sasl else {}), svc
        assert (env_of(w).get("FLYWHEEL_MODEL_STORE_SIGNING_KEY") == SIGNING_KEY_FILE) == (svc in SIGNERS), svc
        keys = set(expected.values()) | ({"model-signing-key"} if svc in SIGNERS else set())
        assert set(secrets[f"flywheel-{svc}-secrets"]["data"]) == keys, svc
    policy, feedback = (set(secrets[f"flywheel-{s}-secrets"]["data"]) for s in ("policy", "feedback"))
    assert not policy & {"admin-token", "model-signing-key", "service-token"}
    assert not feedback & {"admin-token", "admin-token-sha256", "model-signing-key", "service-token"}


def decoded(objs: tuple[dict[str, Any], ...], svc: str) -> dict[str, str]:
    data = by_kind(objs, "Secret")[f"flywheel-{svc}-secrets"]["data"]
    return {k: base64.b64decode(v).decode() for k, v in data.items()}


def test_generated_secrets_agree_across_services() -> None:
    """Generated once per render: both ends of each secret hold the same value, the policy's hash is the
    trainer's admin token's, and the trusted key is the public half of the signing key."""
    from flywheel.core import signing

    objs = render("values.yaml")
    policy, feedback, reward, trainer = (decoded(objs, svc) for svc in SERVICES)
    assert len(policy["hmac-key"]) == 48 and policy["hmac-key"] == feedback["hmac-key"]
    assert len(trainer["admin-token"]) == 40
    assert policy["admin-token-sha256"] == hashlib.sha256(trainer["admin-token"].encode()).hexdigest()
    assert reward["service-token"] == trainer["service-token"] != trainer["admin-token"]
    assert reward["model-signing-key"] == trainer["model-signing-key"]
    public = signing.public_b64(signing.load_private_key(trainer["model-signing-key"]).public_key())
    for secret in (policy, reward, trainer):
        assert secret["model-trusted-keys"] == public
    # Configured values are used as given, the generated ones still agree with them.
    from flywheel.core.config import load
    from flywheel.core.modelstore import ModelStoreConfig

    old = signing.public_b64(signing.Signer(signing.load_private_key(trainer["model-signing-key"])).public_key)
    objs = render(
        "values.yaml",
        "--set",
        "secret.adminToken=admin-token-0123456789",
        "--set-json",
        f'secret.extraTrustedKeys=["{old}"]',
        "--set",
        "secret.serviceToken=service-token-0123456789",
    )
    policy, trainer = decoded(objs, "policy"), decoded(objs, "trainer")
    assert trainer["admin-token"] == "admin-token-0123456789"
    assert policy["admin-token-sha256"] == hashlib.sha256(b"admin-token-0123456789").hexdigest()
    new = signing.public_b64(signing.load_private_key(trainer["model-signing-key"]).public_key())
    assert policy["model-trusted-keys"] == f"{new},{old}"
    cfg = load(ModelStoreConfig, trusted_keys=policy["model-trusted-keys"].split(","))  # the policy accepts it
    assert len(cfg.verifier().keys) == 2 and cfg.verifier().required


def test_a_given_signing_key_is_used_and_a_wrong_one_refused(tmp_path: Path) -> None:
    from flywheel.core import signing

    pub = signing.keygen(tmp_path)
    key_file = str(tmp_path / signing.KEY_FILE)
    policy = decoded(render("values.yaml", "--set-file", f"secret.signingKey={key_file}"), "policy")
    assert policy["model-trusted-keys"] == signing.public_b64(pub)
    rsa = subprocess.run(
        ["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024"], capture_output=True, text=True
    )
    if rsa.returncode == 0:
        (tmp_path / "rsa.key").write_text(rsa.stdout)
        out = run_helm("template", "flywheel", str(CHART), "--set-file", f"secret.signingKey={tmp_path / 'rsa.key'}")
        assert out.returncode != 0 and "secret.signingKey is not an Ed25519 private key" in out.stderr, out.stderr
    out = run_helm("template", "flywheel", str(CHART), "--set", "secret.signingKey=not-a-pem")
    assert out.returncode != 0 and "signingKey" in out.stderr, out.stderr


def test_a_changed_secret_rolls_the_pods_that_read_it(tmp_path: Path) -> None:
    """Each pod template carries the checksum of its own Secret: a rotated service token restarts the
    reward service and the trainer, not the policy or feedback."""
    from flywheel.core import signing

    signing.keygen(tmp_path)
    given = ("--set", "secret.hmacKey=" + "h" * 20, "--set", "secret.adminToken=" + "a" * 20)
    given += ("--set-file", f"secret.signingKey={tmp_path / signing.KEY_FILE}")

    def checksums(service_token: str) -> dict[str, str]:
        objs = render("values.yaml", *given, "--set", f"secret.serviceToken={service_token}")
        return {
            n: w["spec"]["template"]["metadata"]["annotations"]["checksum/secrets"] for n, w in workloads(objs).items()
        }

    before, again, after = checksums("s" * 20), checksums("s" * 20), checksums("t" * 20)
    assert before == again, "generated values must not move the checksums of given ones"
    changed = {n for n in before if before[n] != after[n]}
    assert changed == {"flywheel-reward", "flywheel-trainer"}


def test_an_existing_secret_is_read_key_by_key() -> None:
    """secret.existingSecret: no Secret is rendered, every pod reads only its own keys from it."""
    objs = render("values.yaml", "--set", "secret.existingSecret=mine")
    assert not by_kind(objs, "Secret")
    for svc in SERVICES:
        w = workloads(objs)[f"flywheel-{svc}"]
        assert {n: (s, k) for n, (s, k, _) in secret_refs(w).items()} == {
            n: ("mine", k) for n, k in SECRETS_OF[svc].items()
        }
        assert secret_volume_keys(w) == ({"mine": {"model-signing-key"}} if svc in SIGNERS else {})
        assert "checksum/secrets" not in w["spec"]["template"]["metadata"]["annotations"]


def test_the_model_store_is_read_only_where_a_service_only_reads_it() -> None:
    def models_mount(w: dict[str, Any], container: str | None = None) -> dict[str, Any]:
        pod = w["spec"]["template"]["spec"]
        c = next(c for c in pod["containers"] + pod.get("initContainers", []) if container in (None, c["name"]))
        return next(m for m in c["volumeMounts"] if m["name"] == "models")

    ws = workloads(render("values.yaml"))
    assert models_mount(ws["flywheel-policy"]).get("readOnly") is True
    assert "readOnly" not in models_mount(ws["flywheel-trainer"])
    assert "readOnly" not in models_mount(ws["flywheel-reward"])  # it trains: it publishes versions
    assert "FLYWHEEL_REWARD_TRAIN_ENABLED" not in env_of(ws["flywheel-reward"])
    # The trainer's init container builds and signs the starters the policy waits for.
    trainer = ws["flywheel-trainer"]
    (init,) = trainer["spec"]["template"]["spec"]["initContainers"]
    assert init["name"] == "models-init" and init["args"] == ["models", "init"]
    assert init["image"] == trainer["spec"]["template"]["spec"]["containers"][0]["image"]
    assert "readOnly" not in models_mount(trainer, "models-init")
    env = env_of(trainer, "models-init")
    assert env["FLYWHEEL_MODEL_STORE_SIGNING_KEY"] == SIGNING_KEY_FILE
    assert {m["mountPath"]: m.get("readOnly") for m in init["volumeMounts"]}["/etc/flywheel/signing"] is True
    (signing,) = [v for v in trainer["spec"]["template"]["spec"]["volumes"] if v["name"] == "signing"]
    assert signing["secret"]["items"] == [{"key": "model-signing-key", "path": "model-signing.key", "mode": 0o400}]
    assert not any("initContainers" in w["spec"]["template"]["spec"] for n, w in ws.items() if n != "flywheel-trainer")
    # A reward that does not train: read-only, no signing key, training off.
    objs = render("values.yaml", "--set", "reward.train=false", "--set", "reward.model=/models/base/rm")
    reward = workloads(objs)["flywheel-reward"]
    assert models_mount(reward).get("readOnly") is True
    assert env_of(reward)["FLYWHEEL_REWARD_TRAIN_ENABLED"] == "false"
    assert "FLYWHEEL_MODEL_STORE_SIGNING_KEY" not in env_of(reward) and not secret_volume_keys(reward)
    assert set(decoded(objs, "reward")) == {"api-keys", "service-token", "model-trusted-keys"}
    assert env_of(workloads(objs)["flywheel-trainer"], "models-init")["FLYWHEEL_REWARD_MODEL_BASE_MODEL"] == (
        "/models/base/rm"  # the starter reward model is built from the reward service's base model
    )


@pytest.mark.parametrize("values", VALUES)
def test_metrics_have_their_own_port_open_only_to_the_monitoring_rule(values: str) -> None:
    objs = render(values)
    ports = {"policy": 9090, "feedback": 9091, "reward": 9092, "trainer": 9093}
    for svc, port in ports.items():
        w = workloads(objs)[f"flywheel-{svc}"]
        c = w["spec"]["template"]["spec"]["containers"][0]
        assert {"name": "metrics", "containerPort": port, "protocol": "TCP"} in c["ports"]
        assert env_of(w)["FLYWHEEL_SERVER_METRICS_PORT"] == str(port)
        assert w["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(port)
        service_ports = {p["name"]: p["port"] for p in by_kind(objs, "Service")[f"flywheel-{svc}"]["spec"]["ports"]}
        assert service_ports["metrics"] == port
    policies = by_kind(objs, "NetworkPolicy")
    if values == "values-minimal.yaml":
        assert not policies
        return
    monitoring = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    for svc in SERVICES:
        rules = policies[f"flywheel-{svc}"]["spec"]["ingress"]
        with_metrics = [r for r in rules if {"port": "metrics", "protocol": "TCP"} in r["ports"]]
        assert with_metrics == [{"ports": [{"port": "metrics", "protocol": "TCP"}], "from": monitoring}], svc
        for rule in rules:
            if rule is not with_metrics[0]:
                assert {p["port"] for p in rule["ports"]} == {"grpc", "http"}, svc
        external = [r for r in rules if "from" not in r]
        assert len(external) == (1 if svc in ("policy", "feedback") else 0), svc
    anywhere = by_kind(render("values.yaml", "--set-json", "networkPolicy.metricsFrom=[]"), "NetworkPolicy")
    rule = next(r for r in anywhere["flywheel-trainer"]["spec"]["ingress"] if r["ports"][0]["port"] == "metrics")
    assert rule["from"] == [{"namespaceSelector": {}}]


TLS = (
    "--set",
    "tls.enabled=true",
    "--set",
    "tls.secret=flywheel-tls",
    "--set",
    "tls.mutual=true",
    "--set",
    "tls.clientSecret=flywheel-client",
    "--set",
    "kafka.tls.clientSecret=kafka-user",
    "--set",
    "kafka.tls.clientCertKey=user.crt",
    "--set",
    "kafka.tls.clientKeyKey=user.key",
    "--set",
    "serviceMonitor.enabled=true",
)


def test_tls_serves_every_port_with_https_probes() -> None:
    objs = render("values.yaml", *TLS)
    for svc in SERVICES:
        w = workloads(objs)[f"flywheel-{svc}"]
        c = w["spec"]["template"]["spec"]["containers"][0]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert "grpc" not in c[probe], f"{svc}: a gRPC probe cannot speak TLS"
            path = "/live" if probe == "livenessProbe" or (svc, probe) == ("trainer", "startupProbe") else "/health"
            assert c[probe]["httpGet"] == {"path": path, "port": "http", "scheme": "HTTPS"}, (svc, probe)
        env = env_of(w)
        assert {k: v for k, v in env.items() if k.startswith(("FLYWHEEL_TLS_", "FLYWHEEL_KAFKA_SSL_"))} == {
            "FLYWHEEL_TLS_CERT_FILE": "/etc/flywheel/tls/tls.crt",
            "FLYWHEEL_TLS_KEY_FILE": "/etc/flywheel/tls/tls.key",
            "FLYWHEEL_TLS_CA_FILE": "/etc/flywheel/tls/ca.crt",
            "FLYWHEEL_TLS_CLIENT_CA_FILE": "/etc/flywheel/tls/ca.crt",
            "FLYWHEEL_TLS_CLIENT_CERT_FILE": "/etc/flywheel/tls/client.crt",
            "FLYWHEEL_TLS_CLIENT_KEY_FILE": "/etc/flywheel/tls/client.key",
            "FLYWHEEL_KAFKA_SSL_CERTFILE": "/etc/flywheel/kafka-client/tls.crt",
            "FLYWHEEL_KAFKA_SSL_KEYFILE": "/etc/flywheel/kafka-client/tls.key",
        }
        volumes = secret_volume_keys(w)
        assert volumes["flywheel-tls"] == {"tls.crt", "tls.key", "ca.crt"}
        assert volumes["flywheel-client"] == {"tls.crt", "tls.key"} and volumes["kafka-user"] == {
            "user.crt",
            "user.key",
        }
        mounts = {m["mountPath"]: m.get("readOnly") for m in c["volumeMounts"]}
        assert mounts["/etc/flywheel/tls"] is mounts["/etc/flywheel/kafka-client"] is True
        assert w["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scheme"] == "https"
    monitors = by_kind(objs, "ServiceMonitor")
    assert set(monitors) == {f"flywheel-{svc}" for svc in SERVICES}
    (endpoint,) = monitors["flywheel-reward"]["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["scheme"] == "https"
    assert endpoint["tlsConfig"] == {
        "serverName": "flywheel-reward",
        "ca": {"secret": {"name": "flywheel-tls", "key": "ca.crt"}},
        "cert": {"secret": {"name": "flywheel-client", "key": "tls.crt"}},
        "keySecret": {"name": "flywheel-client", "key": "tls.key"},
    }
    (hook,) = [o for o in objs if o["kind"] == "Pod"]
    assert {e["name"] for e in hook["spec"]["containers"][0]["env"]} >= {
        "FLYWHEEL_TLS_CA_FILE",
        "FLYWHEEL_TLS_CLIENT_CERT_FILE",
        "FLYWHEEL_TLS_CLIENT_KEY_FILE",
    }


def test_tls_renders_objects_kubernetes_accepts() -> None:
    import kubernetes_validate

    settings = (*TLS, "--set", "secret.existingSecret=mine", "--set", "reward.train=false")
    for obj in render("values.yaml", *settings):
        if kind_of(obj) not in CRDS:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (("tls.enabled=true",), "tls.enabled needs tls.secret"),
        (("tls.mutual=true",), "tls.mutual needs tls.enabled"),
    ],
)
def test_tls_values_that_cannot_work_fail_clearly(settings: tuple[str, ...], message: str) -> None:
    out = run_helm("template", "flywheel", str(CHART), *(a for s in settings for a in ("--set", s)))
    assert out.returncode != 0 and message in out.stderr, out.stderr


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
    monitors = by_kind(objs, "ServiceMonitor")
    assert set(monitors) == {f"flywheel-{svc}" for svc in SERVICES}
    for svc in SERVICES:
        spec = monitors[f"flywheel-{svc}"]["spec"]
        assert spec["selector"]["matchLabels"]["app.kubernetes.io/component"] == svc
        assert spec["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s", "scrapeTimeout": "10s"}]


@pytest.mark.parametrize("values", VALUES)
def test_state_survives_the_pod_with_a_statefulset(values: str) -> None:
    """The feedback spool and the reward join store are on a volume per pod by default (kind's default
    StorageClass provisions them for values-minimal.yaml)."""
    objs = render(values)
    assert set(by_kind(objs, "StatefulSet")) == {"flywheel-feedback", "flywheel-reward"}
    sizes = {"values-minimal.yaml": ("1Gi", "2Gi")}.get(values, ("5Gi", "20Gi"))
    for name, size in zip(("flywheel-feedback", "flywheel-reward"), sizes, strict=True):
        sts = by_kind(objs, "StatefulSet")[name]
        (claim,) = sts["spec"]["volumeClaimTemplates"]
        assert claim["metadata"]["name"] == "state" and claim["spec"]["accessModes"] == ["ReadWriteOnce"]
        assert claim["spec"]["resources"]["requests"]["storage"] == size
        volumes = {v["name"] for v in sts["spec"]["template"]["spec"]["volumes"]}
        assert "state" not in volumes, "the claim template provides the state volume"
    if values != "values-minimal.yaml":
        hpa = by_kind(objs, "HorizontalPodAutoscaler")["flywheel-feedback"]
        assert hpa["spec"]["scaleTargetRef"]["kind"] == "StatefulSet"
    # The policy's interactions spool: an emptyDir (the policy stays a Deployment with its HPA).
    policy = by_kind(objs, "Deployment")["flywheel-policy"]
    assert env_of(policy)["FLYWHEEL_POLICY_STATE_DIR"] == "/var/lib/flywheel/policy"
    assert {"name": "state", "emptyDir": {"sizeLimit": "2Gi"}} in policy["spec"]["template"]["spec"]["volumes"]


def test_persistent_false_keeps_an_emptydir_deployment() -> None:
    objs = render("values.yaml", "--set", "feedback.state.persistent=false")
    feedback = by_kind(objs, "Deployment")["flywheel-feedback"]
    assert env_of(feedback)["FLYWHEEL_FEEDBACK_STATE_DIR"] == "/var/lib/flywheel/feedback"
    assert {"name": "state", "emptyDir": {"sizeLimit": "5Gi"}} in feedback["spec"]["template"]["spec"]["volumes"]
    assert by_kind(objs, "HorizontalPodAutoscaler")["flywheel-feedback"]["spec"]["scaleTargetRef"]["kind"] == (
        "Deployment"
    )


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


def _pki(tmp: Path) -> dict[str, str]:
    """A CA, a server certificate for localhost and a client certificate: their PEM files by name."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ca")])
    files: dict[str, str] = {}

    def cert(cn: str, key: Any, ca: bool = False) -> x509.Certificate:
        b = (
            x509.CertificateBuilder()
            .subject_name(ca_name if ca else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        if ca:
            b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        else:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        return b.sign(ca_key, hashes.SHA256())

    for name, key, is_ca in (("ca", ca_key, True), ("server", None, False), ("client", None, False)):
        key = key or ec.generate_private_key(ec.SECP256R1())
        files[f"{name}.crt"] = str(tmp / f"{name}.crt")
        (tmp / f"{name}.crt").write_bytes(cert(name, key, is_ca).public_bytes(serialization.Encoding.PEM))
        files[f"{name}.key"] = str(tmp / f"{name}.key")
        (tmp / f"{name}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return files


def test_helm_test_script_speaks_mutual_tls_when_the_release_does(tmp_path: Path) -> None:
    """With tls.enabled the hook's pod gets the CA (and, under tls.mutual, a client certificate) in the
    FLYWHEEL_TLS_* variables; the script then checks health over TLS, presenting the certificate."""
    import os
    import sys
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    (pod,) = [o for o in render("values.yaml", *TLS) if o["kind"] == "Pod"]
    script, env = pod["spec"]["containers"][0]["args"][0], pod["spec"]["containers"][0]["env"]
    files = _pki(tmp_path)
    where = {
        "/etc/flywheel/tls/ca.crt": files["ca.crt"],
        "/etc/flywheel/tls/client.crt": files["client.crt"],
        "/etc/flywheel/tls/client.key": files["client.key"],
    }
    tls_env = {e["name"]: where[e["value"]] for e in env if e["name"].startswith("FLYWHEEL_TLS_")}
    assert set(tls_env) == {"FLYWHEEL_TLS_CA_FILE", "FLYWHEEL_TLS_CLIENT_CERT_FILE", "FLYWHEEL_TLS_CLIENT_KEY_FILE"}
    server = grpc.server(futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    creds = grpc.ssl_server_credentials(
        [(Path(files["server.key"]).read_bytes(), Path(files["server.crt"]).read_bytes())],
        root_certificates=Path(files["ca.crt"]).read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("localhost:0", creds)
    server.start()
    try:
        base = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_TLS_")}
        for extra, rc, said in (
            (tls_env, 0, "SERVING"),
            ({"FLYWHEEL_TLS_CA_FILE": files["ca.crt"]}, 1, "unreachable: UNAVAILABLE"),  # no client certificate
            ({}, 1, "unreachable: UNAVAILABLE"),  # plaintext
        ):
            out = subprocess.run(
                [sys.executable, "-c", script, f"localhost:{port}"],
                capture_output=True,
                text=True,
                timeout=60,
                env=base | extra,
            )
            assert out.returncode == rc and f"localhost:{port} {said}" in out.stdout, out.stdout + out.stderr
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
        ("policy.metricsPort=8080", "policy.metricsPort 8080 is also its gRPC or HTTP port"),
        ("secret.extraTrustedKeys[0]=not-a-key", "extraTrustedKeys"),
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


def page_env(objs: tuple[dict[str, Any], ...], svc: str) -> dict[str, str]:
    """The page's settings in the env of service `svc`'s container."""
    (workload,) = [o for n, o in workloads(objs).items() if n.endswith(f"-{svc}")]
    env = workload["spec"]["template"]["spec"]["containers"][0]["env"]
    return {e["name"]: e.get("value", "") for e in env if "CORS" in e["name"] or "PAGE" in e["name"]}


def test_the_page_works_through_port_forward_by_default() -> None:
    """No Ingress: the page (feedback, localhost:8082) calls the policy at localhost:8080, which allows it."""
    objs = render("values.yaml")
    assert not by_kind(objs, "Ingress")
    assert page_env(objs, "feedback") == {
        "FLYWHEEL_FEEDBACK_PAGE_ENABLED": "true",
        "FLYWHEEL_FEEDBACK_PAGE_POLICY_URL": "http://localhost:8080",
    }
    assert page_env(objs, "policy") == {"FLYWHEEL_SERVER_CORS_ORIGINS": "http://localhost:8082"}


def test_the_ingress_serves_the_page_and_its_policy_routes_under_one_host() -> None:
    import kubernetes_validate

    settings = ["ingress.enabled=true", "ingress.host=rate.example.com", "ingress.className=nginx"]
    settings += [
        "ingress.tls.enabled=true",
        "ingress.tls.secretName=rate-tls",
        "page.corsOrigins={https://app.example.com}",
    ]
    objs = render("values.yaml", *(a for s in settings for a in ("--set", s)))
    (ing,) = by_kind(objs, "Ingress").values()
    kubernetes_validate.validate(ing, K8S_VERSION, strict=True)
    spec = ing["spec"]
    assert spec["ingressClassName"] == "nginx" and spec["tls"] == [
        {"hosts": ["rate.example.com"], "secretName": "rate-tls"}
    ]
    (rule,) = spec["rules"]
    routes = [(p["path"], p["pathType"], p["backend"]["service"]["name"]) for p in rule["http"]["paths"]]
    assert rule["host"] == "rate.example.com" and routes == [
        ("/generate_stream", "Exact", "flywheel-policy"),
        ("/generate_pair", "Exact", "flywheel-policy"),
        ("/", "Prefix", "flywheel-feedback"),
    ]
    assert all(p["backend"]["service"]["port"] == {"name": "http"} for p in rule["http"]["paths"])
    # Same origin: the page calls its own host; only the application's site (the widget) is a CORS origin.
    assert page_env(objs, "feedback") == {
        "FLYWHEEL_SERVER_CORS_ORIGINS": "https://app.example.com",
        "FLYWHEEL_FEEDBACK_PAGE_ENABLED": "true",
        "FLYWHEEL_FEEDBACK_PAGE_POLICY_URL": "",
    }
    assert page_env(objs, "policy") == {"FLYWHEEL_SERVER_CORS_ORIGINS": "https://app.example.com"}
    # The policy on a host of its own: it allows the page's origin (the Ingress host).
    objs = render("values.yaml", "--set", "ingress.enabled=true", "--set", "page.policyUrl=https://policy.example.com/")
    assert page_env(objs, "feedback")["FLYWHEEL_FEEDBACK_PAGE_POLICY_URL"] == "https://policy.example.com"
    assert page_env(objs, "policy") == {"FLYWHEEL_SERVER_CORS_ORIGINS": "http://flywheel.example.com"}


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("ingress.tls.enabled=true", "ingress.tls.enabled needs ingress.tls.secretName"),
        ("policy.enabled=false", "ingress.enabled routes to the policy and the feedback service"),
        ("page.corsOrigins[0]=app.example.com", "corsOrigins"),
        ("page.policyUrl=policy:8080", "policyUrl"),
    ],
)
def test_page_values_that_cannot_work_fail_clearly(setting: str, message: str) -> None:
    out = run_helm("template", "flywheel", str(CHART), "--set", "ingress.enabled=true", "--set", setting)
    assert out.returncode != 0 and message in out.stderr, out.stderr
