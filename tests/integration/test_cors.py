"""CORS by an allow-list of origins and nosniff, on the policy (in this process) and the feedback
service (a child process), with aiohttp as a browser would send the requests: a preflight and a
simple request from an allowed origin and from an unknown one, a streamed answer, aiohttp's own 404
and a refusal (401), each checked header by header."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from flywheel.core.cors import ALLOW_HEADERS, ALLOW_METHODS, EXPOSE_HEADERS
from tests.integration.test_sessions import (
    APP_KEY,
    ORIGIN,
    PROMPTS,
    Stack,
    bearer,
    one_torch_thread,  # noqa: F401 - autouse fixture
)

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(240)]
EVIL = "https://evil.example.test"
CORS = ("Access-Control-Allow-Origin", "Access-Control-Expose-Headers", "Access-Control-Allow-Methods")


@pytest.fixture(scope="module")
def stack(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(kafka_bootstrap, tmp_path_factory.mktemp("cors"))
    yield s
    s.close()


async def fetch(method: str, url: str, headers: dict[str, str], body: Any = None) -> tuple[int, Any, Any]:
    async with aiohttp.ClientSession() as http, http.request(method, url, json=body, headers=headers) as r:
        text = await r.read()
        return r.status, text, r.headers


def call(method: str, url: str, headers: dict[str, str], body: Any = None) -> tuple[int, Any, Any]:
    return asyncio.run(fetch(method, url, headers, body))


def preflight(origin: str, request_headers: str = "authorization, content-type") -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": request_headers,
    }


def assert_allowed(h: Any) -> None:
    assert h["Access-Control-Allow-Origin"] == ORIGIN and "Origin" in h["Vary"]
    assert h["Access-Control-Expose-Headers"] == EXPOSE_HEADERS and h["X-Content-Type-Options"] == "nosniff"
    assert "Access-Control-Allow-Credentials" not in h


def test_preflight_from_an_allowed_and_an_unknown_origin(stack: Stack) -> None:
    for base, path in ((stack.policy.http, "/generate_stream"), (stack.feedback_http, "/feedback")):
        status, body, h = call("OPTIONS", base + path, preflight(ORIGIN))
        assert (status, body) == (204, b"")
        assert (h["Access-Control-Allow-Methods"], h["Access-Control-Allow-Headers"]) == (ALLOW_METHODS, ALLOW_HEADERS)
        assert h["Access-Control-Max-Age"] == "600"
        assert_allowed(h)
        status, body, h = call("OPTIONS", base + "/no/such/path", preflight(ORIGIN))
        assert status == 204 and h["Access-Control-Allow-Origin"] == ORIGIN  # any path

        status, body, h = call("OPTIONS", base + path, preflight(EVIL))
        err = json.loads(body)
        assert status == 403 and err["error_type"] == "permission_denied"
        assert "server.cors_origins" in err["error"] and EVIL in err["error"]
        assert not any(name in h for name in CORS) and h["X-Content-Type-Options"] == "nosniff"


def test_simple_requests_carry_the_headers_only_for_an_allowed_origin(stack: Stack) -> None:
    policy, key = stack.policy.http, bearer(APP_KEY)
    body = {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 4}}
    status, text, h = call("POST", policy + "/generate", {"Origin": ORIGIN} | key, body)
    assert status == 200 and json.loads(text)["interaction_id"] == h["x-flywheel-interaction-id"]
    assert_allowed(h)
    status, text, h = call("POST", policy + "/generate_stream", {"Origin": ORIGIN} | key, body)
    assert status == 200 and text.startswith(b"data:")
    assert_allowed(h)  # a stream's headers leave before its handler returns: set at prepare
    status, _, h = call("POST", policy + "/generate", {"Origin": EVIL} | key, body)
    assert status == 200 and not any(name in h for name in CORS) and h["X-Content-Type-Options"] == "nosniff"
    assert "Origin" in h["Vary"]  # what this service answers depends on Origin: caches must know

    # Refusals and aiohttp's own answers carry them too, so the page can read the error.
    status, _, h = call("GET", policy + "/nothing-here", {"Origin": ORIGIN})
    assert status == 404
    assert_allowed(h)
    status, text, h = call("POST", stack.feedback_http + "/sessions", {"Origin": ORIGIN}, {"user_id": "x"})
    assert status == 401 and "API key" in json.loads(text)["error"]
    assert_allowed(h)
    status, text, h = call("POST", stack.feedback_http + "/sessions", {"Origin": ORIGIN} | key, {"user_id": "x"})
    assert status == 200 and json.loads(text)["session"].startswith("fws1.")
    assert_allowed(h)
    for base in (policy, stack.feedback_http):
        status, _, h = call("GET", base + "/health", {})
        assert status == 200 and h["X-Content-Type-Options"] == "nosniff"
        assert "Access-Control-Allow-Origin" not in h
