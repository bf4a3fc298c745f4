"""The feedback web page and the embeddable widget, served by the feedback service (docs/PAGE.md).

`GET /` redirects to `/ui/`; `/ui/` is index.html, then app.js, style.css and widget.js (static
files in ui/, shipped in the wheel as package data) and `/ui/config.json`, which tells the page
where the policy is (`feedback.page_policy_url`), the rating scale, whether a session is needed
(API keys configured) and the sample prompts of compare mode.

Why these headers: the page holds a session token (from its URL) and a feedback token per
answer, so it allows no script, style or frame but its own (CSP without 'unsafe-inline': the
files are hand-written with no inline script or style), connects only to itself and the policy,
cannot be framed (clickjacking a vote) and sends no Referer (a session can be in the address
until app.js removes it). widget.js alone is meant for other sites' pages, so it is served with
Cross-Origin-Resource-Policy: cross-origin; its requests to this service need the application's
origin in `server.cors_origins`.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from flywheel.core.auth import AuthConfig
from flywheel.feedback.config import FeedbackConfig

FILES = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "style.css": "text/css",
    "widget.js": "text/javascript",
}


def origin_of(url: str) -> str:
    """scheme://host[:port] of `url` ("" for "": the page's own origin)."""
    if not url:
        return ""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def security_headers(policy_origin: str) -> dict[str, str]:
    """The headers of every page file (module doc)."""
    connect = " ".join(filter(None, ["'self'", policy_origin]))
    csp = (
        f"default-src 'self'; script-src 'self'; style-src 'self'; connect-src {connect}; img-src 'self' data:; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    )
    return {
        "Content-Security-Policy": csp,
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-cache",
    }


def default_prompts() -> list[str]:
    """The starter policy's corpus prompts: what the starter answers sensibly."""
    from flywheel.policy import corpus

    return corpus.prompts()


def page_config(config: FeedbackConfig, auth: AuthConfig | None) -> dict[str, Any]:
    """The body of /ui/config.json."""
    keys = auth is not None and bool(auth.api_keys) and auth.require_api_key
    return {
        "policy_url": config.page_policy_url.rstrip("/"),
        "rating_scale": config.rating_scale,
        "session_required": keys,
        "prompts": list(config.page_prompts) or default_prompts(),
    }


def add_page_routes(app: web.Application, config: FeedbackConfig, auth: AuthConfig | None = None) -> None:
    """Register GET /, /ui/ and its files on the feedback service's app (nothing when page_enabled is false)."""
    if not config.page_enabled:
        return
    ui = resources.files("flywheel.feedback") / "ui"
    bodies = {name: (ui / name).read_bytes() for name in FILES}
    headers = security_headers(origin_of(config.page_policy_url))
    cfg_body = json.dumps(page_config(config, auth)).encode()

    def serve(name: str, body: bytes, content_type: str) -> Any:
        extra = {"Cross-Origin-Resource-Policy": "cross-origin"} if name == "widget.js" else {}

        async def handle(request: web.Request) -> web.Response:
            return web.Response(body=body, content_type=content_type, charset="utf-8", headers=headers | extra)

        return handle

    async def root(request: web.Request) -> web.Response:
        query = f"?{request.query_string}" if request.query_string else ""  # keeps ?session=...
        raise web.HTTPFound(f"/ui/{query}", headers={"Referrer-Policy": "no-referrer"})

    r = app.router
    r.add_get("/", root)
    r.add_get("/ui", root)
    r.add_get("/ui/", serve("index.html", bodies["index.html"], FILES["index.html"]))
    for name, content_type in FILES.items():
        r.add_get(f"/ui/{name}", serve(name, bodies[name], content_type))
    r.add_get("/ui/config.json", serve("config.json", cfg_body, "application/json"))
