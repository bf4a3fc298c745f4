"""`flywheel up` prints the page's URL and gives the policy and the feedback service what the page
needs: the page (on feedback's port) may call the policy (another port, so another origin), and
knows where the policy is. No processes: the environment each child would get, loaded as each
service loads its config."""

from __future__ import annotations

from pathlib import Path

import pytest

from flywheel.core.config import DEFAULT_PORTS, load
from flywheel.core.server import ServerConfig
from flywheel.feedback.config import FeedbackConfig
from flywheel.loop.supervisor import Child, Supervisor, UpConfig


def supervisor(tmp_path: Path) -> Supervisor:
    sup = Supervisor(UpConfig(tmp_path, progress=False))
    sup.children = {n: Child(n, g, h, tmp_path / n) for n, (g, h) in DEFAULT_PORTS.items()}
    return sup


def loaded(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> tuple[ServerConfig, FeedbackConfig]:
    for k, v in env.items():
        if k.startswith("FLYWHEEL_"):
            monkeypatch.setenv(k, v)
    return load(ServerConfig), load(FeedbackConfig)


def test_up_lets_the_page_call_the_policy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FLYWHEEL_SERVER_CORS_ORIGINS", raising=False)
    monkeypatch.delenv("FLYWHEEL_FEEDBACK_PAGE_POLICY_URL", raising=False)
    sup = supervisor(tmp_path)
    policy_port, page_port = DEFAULT_PORTS["policy"][1], DEFAULT_PORTS["feedback"][1]
    env = sup.env()
    with monkeypatch.context() as m:
        server, _ = loaded(m, sup.child_env("policy", env))
        assert server.cors_origins == [f"http://127.0.0.1:{page_port}", f"http://localhost:{page_port}"]
    with monkeypatch.context() as m:
        server, feedback = loaded(m, sup.child_env("feedback", env))
        assert feedback.page_enabled and feedback.page_policy_url == f"http://127.0.0.1:{policy_port}"
        assert server.cors_origins == []  # the page is the feedback service's own origin
    assert "FLYWHEEL_SERVER_CORS_ORIGINS" not in sup.child_env("reward", env)
    table = sup.endpoints().split("\n\n", 1)[0]
    assert f"page      http://127.0.0.1:{page_port}/ " in table


def test_up_keeps_what_the_user_set(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FLYWHEEL_SERVER_CORS_ORIGINS", "https://app.example.com")
    monkeypatch.setenv("FLYWHEEL_FEEDBACK_PAGE_POLICY_URL", "https://policy.example.com")
    sup = supervisor(tmp_path)
    env = sup.env()
    policy = sup.child_env("policy", env)
    assert policy["FLYWHEEL_SERVER_CORS_ORIGINS"].split(",") == [
        "https://app.example.com",
        f"http://127.0.0.1:{DEFAULT_PORTS['feedback'][1]}",
        f"http://localhost:{DEFAULT_PORTS['feedback'][1]}",
    ]
    feedback = sup.child_env("feedback", env)
    assert feedback["FLYWHEEL_FEEDBACK_PAGE_POLICY_URL"] == "https://policy.example.com"
    assert feedback["FLYWHEEL_SERVER_CORS_ORIGINS"] == "https://app.example.com"  # the widget's site
