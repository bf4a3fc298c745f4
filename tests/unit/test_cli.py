"""The `flywheel` command: real subprocesses, as a user runs it."""

import subprocess
import sys


def flywheel(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flywheel.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_contract_command():
    r = flywheel("--help")
    assert r.returncode == 0
    for cmd in ("up", "demo", "serve", "broker", "models", "bench", "ops"):
        assert f"    {cmd} " in r.stdout


def test_serve_help_has_ports_for_each_service():
    for service, port in (("policy", 50051), ("feedback", 50052), ("reward", 50053), ("trainer", 50054)):
        r = flywheel("serve", service, "--help")
        assert r.returncode == 0 and "--grpc-port" in r.stdout and "--http-port" in r.stdout and str(port) in r.stdout


def test_up_and_demo_document_their_options():
    up = flywheel("up", "--help").stdout
    assert "--run-dir" in up and "--restarts" in up
    r = flywheel("up", "--restarts", "-1")
    assert r.returncode == 2 and "restarts=-1" in r.stderr and "give restarts >= 0" in r.stderr
    demo = flywheel("demo", "--help").stdout
    assert "--minutes" in demo and "--out" in demo


def test_unknown_command_is_an_error():
    r = flywheel("fly")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_models_init_list_verify_on_a_fresh_store(tmp_path):
    store = str(tmp_path / "models")
    r = flywheel("models", "--store", store, "init", "--policy-steps", "5")
    assert r.returncode == 0, r.stderr
    listing = flywheel("models", "--store", store, "list")
    assert listing.returncode == 0
    assert "policy v0 parent=- " in listing.stdout and "reward v0" in listing.stdout
    assert flywheel("models", "--store", store, "verify", "policy", "0").returncode == 0
    weights = next((tmp_path / "models" / "reward").glob("v*/model.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"x")
    bad = flywheel("models", "--store", store, "verify", "reward")
    assert bad.returncode == 1 and "model.safetensors" in bad.stderr


def test_bench_lists_every_benchmark_and_refuses_an_unknown_one():
    r = flywheel("bench")
    assert r.returncode == 0
    for name in ("bus_throughput", "serving", "hot_swap", "feedback_throughput", "reward_scoring", "ppo_vs_trl"):
        assert name in r.stdout
    bad = flywheel("bench", "nope")
    assert bad.returncode == 2 and "unknown benchmark 'nope'" in bad.stderr
