"""What the feedback service tells the page (/ui/config.json), when it serves no page, and the
page settings it refuses; a real feedback server on real ports, no browser."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from flywheel.core.auth import AuthConfig
from flywheel.core.config import ConfigError, KafkaConfig, TopicsConfig
from flywheel.core.server import ServerConfig
from flywheel.feedback.config import FeedbackConfig
from flywheel.feedback.page import origin_of, security_headers
from flywheel.feedback.server import build_server


async def fetch(config: FeedbackConfig, auth: AuthConfig, paths: list[str]) -> list[tuple[int, object]]:
    """GET each path from a started feedback server (its stores are never opened: the page needs none)."""
    server, _ = build_server(
        ServerConfig(host="127.0.0.1", grpc_port=0, http_port=0, grace_s=0),
        config,
        KafkaConfig(bootstrap="127.0.0.1:9"),
        TopicsConfig(),
        auth,
    )
    await server.start(handle_signals=False)
    out: list[tuple[int, object]] = []
    try:
        async with aiohttp.ClientSession() as http:
            for path in paths:
                async with http.get(f"http://127.0.0.1:{server.http_port}{path}", allow_redirects=False) as r:
                    body = await r.json() if r.content_type == "application/json" else r.headers.get("Location")
                    out.append((r.status, body))
    finally:
        await server.stop(grace=0)
    return out


def test_config_json_says_a_session_is_needed_once_api_keys_are_set(tmp_path: Path) -> None:
    cfg = FeedbackConfig(state_dir=str(tmp_path), page_policy_url="https://policy.example.com/", page_prompts=["hi"])
    keys = AuthConfig(hmac_key="k" * 32, api_keys=["app:secret-key-0123456789"])
    ((status, body), (moved, to)) = asyncio.run(fetch(cfg, keys, ["/ui/config.json", "/?session=fws1.x.y"]))
    assert status == 200 and body == {
        "policy_url": "https://policy.example.com",
        "rating_scale": 3,
        "session_required": True,
        "prompts": ["hi"],
    }
    assert (moved, to) == (302, "/ui/?session=fws1.x.y")  # the session travels to the page, which removes it
    ((_, body),) = asyncio.run(fetch(cfg, AuthConfig(hmac_key="k" * 32), ["/ui/config.json"]))
    assert isinstance(body, dict) and body["session_required"] is False


def test_page_enabled_false_serves_no_page(tmp_path: Path) -> None:
    cfg = FeedbackConfig(state_dir=str(tmp_path), page_enabled=False)
    assert [s for s, _ in asyncio.run(fetch(cfg, AuthConfig(), ["/", "/ui/", "/ui/widget.js"]))] == [404, 404, 404]


def test_same_origin_policy_url_and_bad_ones(tmp_path: Path) -> None:
    assert origin_of("") == "" and origin_of("https://h.example.com:8443/policy") == "https://h.example.com:8443"
    assert "connect-src 'self';" in security_headers("")["Content-Security-Policy"]
    for bad in ("policy:8080", "https://p.example.com/?x=1", "ftp://p.example.com"):
        with pytest.raises(ConfigError, match="page_policy_url"):
            FeedbackConfig(state_dir=str(tmp_path), page_policy_url=bad)
