"""Alert rules and a real Prometheus server (Debian's `prometheus` package).

* `promtool check rules` and `promtool test rules` on deploy/prometheus/alerts.yaml;
* a Prometheus server scrapes a running ServiceServer (services/flywheel/core/server.py, in a
  subprocess with a trivial Policy servicer) on 127.0.0.1, loads the alert rules, and the
  key series are there (queried over Prometheus' HTTP API).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import textwrap
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from flywheel.testing import wait_for

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
DASHBOARDS = ROOT / "deploy" / "grafana"
INSTALL = "install Debian's package: apt-get install -y prometheus (scripts/test does)"


def tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path is None:
        pytest.skip(f"{name} is not installed; {INSTALL}")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_promtool_check_rules() -> None:
    out = subprocess.run([tool("promtool"), "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    names = {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    assert {
        "FlywheelFeedbackSpoolGrowing",
        "FlywheelPolicySwapFailures",
        "FlywheelRewardAccuracyFalling",
        "FlywheelKLOverBudget",
        "FlywheelConsumerLag",
    } <= names


def dashboard_queries() -> dict[str, list[tuple[str, str]]]:
    """Every panel's PromQL per dashboard, with Grafana's variables resolved for a plain query."""
    out = {}
    for path in sorted(DASHBOARDS.glob("*.json")):
        dash = json.loads(path.read_text())
        exprs = [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]
        subst = {"$__rate_interval": "1m", "$namespace": ".*", "$pod": ".*"}
        for old, new in subst.items():
            exprs = [(title, e.replace(old, new)) for title, e in exprs]
        out[path.stem] = exprs
    return out


def test_a_dashboard_per_service() -> None:
    assert set(dashboard_queries()) == {"policy", "feedback", "reward", "trainer"}
    for path in DASHBOARDS.glob("*.json"):
        dash = json.loads(path.read_text())
        assert dash["uid"] == f"flywheel-{path.stem}"
        ids = [p["id"] for p in dash["panels"]]
        assert len(ids) == len(set(ids)) >= 8, path.name
        assert all(0 <= p["gridPos"]["x"] and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24 for p in dash["panels"])


def _alert(name: str, at: str, labels: dict[str, str] | None = None, summary: str = "") -> dict[str, Any]:
    """An alert_rule_test case: quiet at `at` (no labels), or firing with labels and summary."""
    if labels is None:
        return {"eval_time": at, "alertname": name, "exp_alerts": []}
    rule = next(r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"] if r["alert"] == name)
    annotations = {**rule["annotations"], "summary": summary}
    return {"eval_time": at, "alertname": name, "exp_alerts": [{"exp_labels": labels, "exp_annotations": annotations}]}


def test_promtool_unit_tests_fire_the_key_alerts(tmp_path: Path) -> None:
    """Synthetic series: each key alert fires on a bad trend and stays quiet on a good one."""
    pod = {"namespace": "flywheel", "pod": "p-1"}
    series = [
        # spool: 50 -> +20/min for 40m on p-1; flat at 500 on p-2
        {"series": 'flywheel_spool_depth{namespace="flywheel",pod="p-1",spool="feedback"}', "values": "50+20x40"},
        {"series": 'flywheel_spool_depth{namespace="flywheel",pod="p-2",spool="feedback"}', "values": "500x40"},
        {
            "series": 'flywheel_policy_swaps_total{namespace="flywheel",pod="p-1",outcome="failed"}',
            "values": "0x10 1x30",
        },
        {"series": 'flywheel_policy_swaps_total{namespace="flywheel",pod="p-2",outcome="ok"}', "values": "0+1x40"},
        # accuracy: 0.80 for 20m, then 0.70
        {"series": 'flywheel_reward_heldout_accuracy{namespace="flywheel",pod="r-1"}', "values": "0.8x20 0.7x60"},
        {"series": 'flywheel_trainer_kl{namespace="flywheel",pod="t-1"}', "values": "2x10 9x30"},
        # failing steps: 0 for 10m, then 1, 2, ... on t-1 (a step fails each minute)
        {"series": 'flywheel_trainer_failing_steps{namespace="flywheel",pod="t-1"}', "values": "0x10 1+1x30"},
        {
            "series": 'flywheel_bus_consumer_lag{namespace="flywheel",pod="t-1",group="flywheel-trainer",topic="flywheel.interactions",partition="0"}',
            "values": "20000x40",
        },
    ]
    tests = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    _alert("FlywheelFeedbackSpoolGrowing", "10m"),
                    _alert(
                        "FlywheelFeedbackSpoolGrowing",
                        "35m",
                        {**pod, "spool": "feedback", "severity": "warning"},
                        "Feedback spool feedback on p-1 keeps growing (750 records)",
                    ),
                    _alert("FlywheelPolicySwapFailures", "5m"),
                    _alert(
                        "FlywheelPolicySwapFailures",
                        "15m",
                        {**pod, "severity": "critical"},
                        "Policy replica p-1 failed to hot-swap a new version",
                    ),
                    _alert("FlywheelRewardAccuracyFalling", "30m"),
                    _alert(
                        "FlywheelRewardAccuracyFalling",
                        "60m",
                        {"namespace": "flywheel", "pod": "r-1", "severity": "warning"},
                        "Reward model held-out accuracy on r-1 is 0.10 below its 6 h best",
                    ),
                    _alert("FlywheelKLOverBudget", "15m"),
                    _alert(
                        "FlywheelKLOverBudget",
                        "30m",
                        {"namespace": "flywheel", "pod": "t-1", "severity": "warning"},
                        "Trainer KL to the reference is 9.00 nats (budget 6)",
                    ),
                    _alert("FlywheelTrainerStepsFailing", "20m"),
                    _alert(
                        "FlywheelTrainerStepsFailing",
                        "30m",
                        {"namespace": "flywheel", "pod": "t-1", "severity": "critical"},
                        "Trainer t-1 has failed 20 steps in a row",
                    ),
                    _alert(
                        "FlywheelConsumerLag",
                        "20m",
                        {
                            "namespace": "flywheel",
                            "group": "flywheel-trainer",
                            "topic": "flywheel.interactions",
                            "severity": "warning",
                        },
                        "Consumer group flywheel-trainer is 20000 records behind on flywheel.interactions",
                    ),
                ],
            }
        ],
    }
    path = tmp_path / "alerts-test.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    out = subprocess.run([tool("promtool"), "test", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


SERVER = textwrap.dedent(
    """
    import asyncio, json, sys
    from flywheel.core.server import ServiceServer, ServerConfig
    from flywheel.v1 import policy_pb2, policy_pb2_grpc

    class Policy(policy_pb2_grpc.PolicyServicer):
        async def GetInfo(self, request, context):
            return policy_pb2.PolicyInfo(model="test", policy_version=4)

    async def main():
        server = ServiceServer(ServerConfig(host="127.0.0.1", grpc_port=0, http_port=0), name="policy")
        server.add_servicer(policy_pb2_grpc.add_PolicyServicer_to_server, Policy())
        await server.start()
        await server.set_serving(True)
        print(json.dumps({"grpc": server.grpc_port, "http": server.http_port}), flush=True)
        await server.wait()

    asyncio.run(main())
    """
)


@pytest.fixture
def service() -> Iterator[dict[str, int]]:
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line, f"the ServiceServer did not start (exit {proc.poll()})"
        yield json.loads(line)
    finally:
        proc.terminate()
        proc.wait(20)


def query(port: int, promql: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]


def eventually(fn: Any, timeout: float = 45.0) -> Any:
    """`fn()`'s first truthy result, polled every 0.5 s (Prometheus scrapes and evaluates every
    1 s); an OSError (Prometheus not listening yet) counts as not yet."""
    result = None

    def ready() -> bool:
        nonlocal result
        try:
            result = fn()
        except OSError:
            return False
        return bool(result)

    wait_for(ready, timeout, fn.__doc__ or repr(fn), poll_s=0.5)
    return result


def test_real_prometheus_scrapes_a_running_service(service: dict[str, int], tmp_path: Path) -> None:
    import grpc

    from flywheel.v1 import policy_pb2, policy_pb2_grpc

    prometheus = tool("prometheus")
    with grpc.insecure_channel(f"127.0.0.1:{service['grpc']}") as channel:
        for _ in range(3):
            assert (
                policy_pb2_grpc.PolicyStub(channel).GetInfo(policy_pb2.GetInfoRequest(), timeout=5).policy_version == 4
            )
    rules = tmp_path / "alerts.yaml"
    shutil.copy(ALERTS, rules)
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [
            {
                "job_name": "flywheel-policy",
                "static_configs": [{"targets": [f"127.0.0.1:{service['http']}"], "labels": {"namespace": "test"}}],
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:

        def scraped() -> list[dict[str, Any]]:
            """flywheel_grpc_requests_total{method="GetInfo"} in Prometheus"""
            return query(port, 'flywheel_grpc_requests_total{method="GetInfo"}')

        (sample,) = eventually(scraped)
        assert sample["metric"]["job"] == "flywheel-policy" and sample["metric"]["code"] == "OK"
        assert sample["metric"]["service"] == "flywheel.v1.Policy"
        assert float(sample["value"][1]) == 3
        (up,) = query(port, 'up{job="flywheel-policy"}')
        assert up["value"][1] == "1"
        (serving,) = query(port, "flywheel_serving")
        assert serving["value"][1] == "1"
        assert query(port, "flywheel_grpc_latency_seconds_bucket")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/rules", timeout=5) as r:
            groups = json.load(r)["data"]["groups"]
        loaded = [rule for g in groups for rule in g["rules"]]
        assert len(loaded) >= 16 and all(rule["health"] != "err" for rule in loaded), loaded
        # Every dashboard query parses and runs; the policy's gRPC panel shows the calls.
        panel_expr = ""
        for name, exprs in dashboard_queries().items():
            for title, expr in exprs:
                try:
                    query(port, expr)
                except urllib.error.HTTPError as e:
                    pytest.fail(f"{name} dashboard, panel {title!r}: {e.read().decode()}")
                if name == "policy" and title == "gRPC requests by method and code":
                    panel_expr = expr
        # rate() needs two scrapes inside its window.
        eventually(lambda: [r for r in query(port, panel_expr) if r["metric"].get("method") == "GetInfo"])
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()
