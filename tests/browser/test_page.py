"""The feedback page and the widget in a real browser (Debian's Chromium driven by Playwright)
against real services on the real Kafka broker (tools/pagestack.py): a policy with a tiny model
that never stops early (so every answer streams for a while), the feedback service that serves
the page, and the reward service's join.

Chat with a streamed answer, thumbs, a rating with a comment, an edit; three comparisons with
the keyboard alone; a rate limit and an expired token at phone width (a second feedback service
with a per-user limit of one, a second policy whose tokens live 4 s); a session from the URL;
the widget on a page of another origin. Each flow then finds its events on the feedback topic
(kind, value, user, version), and the comparisons their pairs on the preferences topic. The
page's CSP stays on: a violation (an inline script, a request to an origin it does not allow)
shows as a console error, and every test fails on one.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests
from aiohttp import web
from kafka import KafkaConsumer, TopicPartition

from flywheel.testing import tiny_policy, tiny_reward_model
from flywheel.v1 import events_pb2 as ev
from tests.integration.test_policy_service import one_torch_thread, slow_without_eos  # noqa: F401 - autouse
from tools.pagestack import HOST, PageStack

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(240)]
CHROMIUM = "/usr/bin/chromium"
STRICT_TTL_S = 4
DESKTOP = {"viewport": {"width": 1280, "height": 800}}
LONG_ANSWERS = {"default_max_new_tokens": 160, "max_new_tokens_cap": 160, "max_input_tokens": 64}
STREAMING_WITH_TEXT = """() => {
  const a = document.querySelector("#answer-1");
  return a !== null && a.dataset.state === "streaming" && a.querySelector(".text").textContent.trim() !== "";
}"""
PHONE = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True}

if not Path(CHROMIUM).is_file():  # scripts/test installs it
    pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extras)")


class Stack:
    """The running services and where the browser finds them."""

    def __init__(self, stack: PageStack, reward: Any, tap: StreamTap, **urls: str) -> None:
        self.stack, self.reward, self.tap = stack, reward, tap
        self.policy, self.page, self.strict_page, self.app = urls["policy"], urls["page"], urls["strict"], urls["app"]

    def read(self, topic: str, cls: Any, want: Callable[[list[Any]], bool], timeout_s: float = 30) -> list[Any]:
        """Every record of `topic` once `want(records)` holds and nothing more came for 0.5 s."""
        c = KafkaConsumer(bootstrap_servers=self.stack.kafka.bootstrap, enable_auto_commit=False)
        tp = TopicPartition(topic, 0)
        c.assign([tp])
        c.seek_to_beginning(tp)
        got: list[Any] = []
        deadline, quiet = time.monotonic() + timeout_s, time.monotonic()
        try:
            while time.monotonic() < deadline:
                new = [cls.FromString(m.value) for ms in c.poll(timeout_ms=200).values() for m in ms]
                got += new
                if new:
                    quiet = time.monotonic()
                elif want(got) and time.monotonic() - quiet > 0.5:
                    return got
        finally:
            c.close()
        raise AssertionError(f"timed out waiting on {topic}; got {len(got)} records: {got[-5:]}")

    def feedback_of(self, user: str, n: int) -> list[ev.FeedbackEvent]:
        """The feedback events of `user` once `n` of them arrived (and no more came)."""
        topic = self.stack.topics.feedback
        mine = self.read(topic, ev.FeedbackEvent, lambda got: sum(e.user_id == user for e in got) >= n)
        return [e for e in mine if e.user_id == user]


POLICY, FEEDBACK, HTTP = web.AppKey("policy", str), web.AppKey("feedback", str), web.AppKey("http", Any)


async def answer_page(request: web.Request) -> web.Response:
    """The application's page: an answer it got from the policy (server-side), the widget under it."""
    policy, feedback = request.app[POLICY], request.app[FEEDBACK]
    async with request.app[HTTP].post(
        f"{policy}/generate", json={"inputs": "where is my order?"}, headers={"x-flywheel-user-id": "widget-user"}
    ) as r:
        a = await r.json()
    html = f"""<!doctype html><html><head><title>Shop</title><link rel="icon" href="data:,">
<script src="{feedback}/ui/widget.js"></script><script src="/embed.js" defer></script></head>
<body><h1>Our shop's assistant</h1><div id="answer" data-interaction-id="{a["interaction_id"]}"
data-feedback-token="{a["feedback_token"]}"><p>{a["generated_text"]}</p></div></body></html>"""
    return web.Response(text=html, content_type="text/html")


EMBED_JS = """const el = document.getElementById("answer");
Flywheel.feedback(el, {interaction_id: el.dataset.interactionId, feedback_token: el.dataset.feedbackToken,
                       user_id: "widget-user"});"""


async def embed_js(request: web.Request) -> web.Response:
    return web.Response(text=EMBED_JS, content_type="text/javascript")


HOP_BY_HOP = {"host", "content-length", "content-encoding", "transfer-encoding", "connection", "keep-alive"}


class StreamTap:
    """A pass-through proxy in front of the policy (the page's policy URL) that, when armed, holds
    the next streamed answer after its first visible token until the test has seen that token on
    the page. That proves the page renders tokens as they come whatever the machine's speed: on a
    busy machine the browser may read a whole short stream in one go."""

    def __init__(self, stack: PageStack, port: int, upstream: str) -> None:
        self.loop, self.upstream, self.url = stack.loop, upstream, f"http://{HOST}:{port}"
        self.held: asyncio.Event | None = None

        async def start() -> None:
            self.session = aiohttp.ClientSession()
            app = web.Application()
            app.router.add_route("*", "/{path:.*}", self.forward)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, HOST, port).start()

            async def stop() -> None:
                await self.session.close()
                await runner.cleanup()

            stack.on_close(lambda: stack.loop.call(stop()))

        stack.loop.call(start())

    def hold_next(self) -> None:
        self.held = asyncio.Event()

    def release(self) -> None:
        held = self.held
        assert held is not None, "hold_next() first"
        self.loop.loop.call_soon_threadsafe(held.set)
        self.held = None

    async def forward(self, request: web.Request) -> web.StreamResponse:
        hold = self.held if request.path == "/generate_stream" else None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        async with self.session.request(
            request.method, self.upstream + request.path_qs, headers=headers, data=await request.read()
        ) as up:
            out = web.StreamResponse(
                status=up.status, headers={k: v for k, v in up.headers.items() if k.lower() not in HOP_BY_HOP}
            )
            await out.prepare(request)
            shown = False  # the event being forwarded carries a visible token
            async for line in up.content:  # SSE: "data: {...}" lines, each event ended by a blank line
                await out.write(line)
                shown = shown or (line.startswith(b"data:") and visible_token(line[5:]))
                if hold is not None and shown and not line.strip():
                    await hold.wait()
                    hold = None
            await out.write_eof()
            return out


def visible_token(data: bytes) -> bool:
    token = json.loads(data).get("token") or {}
    return bool(token.get("text", "").strip()) and not token.get("special")


def start_app(stack: PageStack, port: int, policy: str, feedback: str) -> None:
    """The application on its own origin (another port)."""

    async def start() -> None:
        app = web.Application()
        app[POLICY], app[FEEDBACK], app[HTTP] = policy, feedback, aiohttp.ClientSession()
        app.router.add_get("/", answer_page)
        app.router.add_get("/embed.js", embed_js)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, HOST, port).start()

        async def stop() -> None:
            await app[HTTP].close()
            await runner.cleanup()

        stack.on_close(lambda: stack.loop.call(stop()))

    stack.loop.call(start())


@pytest.fixture(scope="module")
def stack(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("page")
    # Slow enough (a few ms a token) and never ending early, so an answer streams for a while.
    slow_without_eos(tiny_policy(tmp / "tiny"))(tmp / "slow")
    s = PageStack(kafka_bootstrap, tmp, tmp / "slow")
    ports = {name: s.port() for name in ("policy", "tap", "strict_policy", "page", "strict", "app")}
    origin = {name: f"http://{HOST}:{port}" for name, port in ports.items()}
    try:
        # Models load one at a time (transformers' loading is not thread-safe); the rest meanwhile.
        policy_url, strict_url = f"http://{HOST}:{ports['policy']}", f"http://{HOST}:{ports['strict_policy']}"
        tap = StreamTap(s, ports["tap"], policy_url)  # the page talks to the policy through it
        s.feedback(ports["page"], tap.url, [origin["app"]], wait=False)
        s.feedback(ports["strict"], strict_url, [], per_user_rate=0.01, per_user_burst=1, wait=False)
        s.policy(ports["policy"], [origin["page"]], **LONG_ANSWERS)
        s.policy(ports["strict_policy"], [origin["strict"]], token_ttl_s=STRICT_TTL_S, **LONG_ANSWERS)
        reward = s.reward_join(tiny_reward_model(tmp / "reward-base"))
        start_app(s, ports["app"], policy_url, origin["page"])
        yield Stack(s, reward, tap, policy=tap.url, page=origin["page"], strict=origin["strict"], app=origin["app"])
    finally:
        s.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


class Page:
    """A page in a fresh browser context (its own storage: another anonymous user), whose console
    errors and uncaught exceptions (CSP violations among them) fail the test."""

    def __init__(self, browser: Any, url: str, refusals: tuple[int, ...] = (), **context: Any) -> None:
        self.context = browser.new_context(**context)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        # Chromium logs every 4xx the page fetched; those the test provokes are expected.
        expected = [f"the server responded with a status of {code} " for code in refusals]
        self.page.on(
            "console",
            lambda m: m.type == "error" and not any(e in m.text for e in expected) and self.errors.append(m.text),
        )
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(url)

    def ready(self) -> str:
        """Wait for the page's start-up; its anonymous user id."""
        self.page.wait_for_selector("body[data-ready]")
        return self.page.get_attribute("#who", "data-user") or ""

    def status(self, kind: str, timeout_ms: float = 30_000) -> str:
        self.page.wait_for_selector(f"#status[data-kind={kind}]", timeout=timeout_ms)
        return self.page.inner_text("#status")

    def ask(self, prompt: str, n: int, while_streaming: Callable[[], None] = lambda: None) -> Any:
        self.page.fill("#prompt", prompt)
        self.page.press("#prompt", "Enter")
        while_streaming()
        self.page.wait_for_selector(f"#answer-{n}[data-state=done]", timeout=30_000)
        return self.page.locator(f"#answer-{n}")

    def close(self) -> None:
        self.context.close()
        assert not self.errors, f"the page logged errors: {self.errors}"


def test_chat_streams_and_takes_thumbs_rating_comment_and_edit(stack: Stack, browser: Any) -> None:
    headers = requests.get(f"{stack.page}/ui/", timeout=10).headers
    csp = headers["Content-Security-Policy"]
    assert "script-src 'self';" in csp and f"connect-src 'self' {stack.policy};" in csp
    assert "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert headers["Referrer-Policy"] == "no-referrer" and headers["X-Frame-Options"] == "DENY"
    assert requests.get(f"{stack.page}/ui/widget.js", timeout=10).headers["Cross-Origin-Resource-Policy"] == (
        "cross-origin"
    )
    config = requests.get(f"{stack.page}/ui/config.json", timeout=10).json()
    assert config["policy_url"] == stack.policy and config["rating_scale"] == 3 and config["prompts"]

    p = Page(browser, stack.page + "/", **DESKTOP)
    assert p.page.url == stack.page + "/ui/"  # GET / redirects
    user = p.ready()

    def first_token_shows_before_the_rest() -> None:
        p.page.wait_for_function(STREAMING_WITH_TEXT, timeout=30_000)  # the tap holds the rest back
        stack.tap.release()

    stack.tap.hold_next()
    answer = p.ask("how do I reset my password?", 1, first_token_shows_before_the_rest)
    assert answer.locator(".meta").inner_text() == "policy version 0"
    iid = answer.get_attribute("data-interaction-id")
    answer.get_by_role("button", name="Good answer").click()
    assert p.status("accepted") == "Thanks, your feedback was recorded."
    answer.get_by_role("button", name="Bad answer").click()
    assert "first one counts" in p.status("already_voted")
    answer.get_by_label("Comment").fill("a bit short")
    answer.get_by_role("button", name="Rate 3 of 3").click()
    assert "Your comment came with it." in p.status("accepted")
    answer.get_by_role("button", name="Edit").click()
    answer.get_by_label("The answer you wanted").fill("Click 'forgot password' on the login page.")
    answer.get_by_role("button", name="Send edit").click()
    p.page.wait_for_selector("#answer-1 .editor[hidden]", state="attached")
    assert p.page.get_attribute("#answer-1 .edit-open", "aria-pressed") == "true"
    p.close()

    events = stack.feedback_of(user, 3)
    assert [(e.kind, e.value, e.interaction_id, e.policy_version) for e in events] == [
        (ev.FEEDBACK_KIND_THUMBS, 1, iid, 0),
        (ev.FEEDBACK_KIND_RATING, 3, iid, 0),
        (ev.FEEDBACK_KIND_DEMONSTRATION, 0, iid, 0),
    ]
    assert events[1].comment == "a bit short" and events[1].rating_scale == 3 and not events[2].comment
    assert events[2].demonstration == "Click 'forgot password' on the login page."


def test_three_comparisons_with_the_keyboard_alone(stack: Stack, browser: Any) -> None:
    p = Page(browser, stack.page + "/ui/", **DESKTOP)
    user = p.ready()
    kb = p.page.keyboard
    kb.press("Shift+Tab")  # from the question box (focused at start) to the mode switch
    kb.press("Enter")
    assert p.page.get_attribute("#mode-compare", "aria-pressed") == "true"
    picks = []
    for n, keys, choice in ((1, ["1"], "A"), (2, ["ArrowRight", "Enter"], "B"), (3, ["3"], "TIE")):
        p.status("pair_ready")
        box = p.page.locator("#pair")
        pair = (
            box.get_attribute("data-pair-id"),
            p.page.get_attribute("#side-a", "data-interaction-id"),
            p.page.get_attribute("#side-b", "data-interaction-id"),
        )
        assert pair[0] not in [q[0] for q, _ in picks], "a new pair for each comparison"
        picks.append((pair, choice))
        for key in keys:
            kb.press(key)
        p.page.wait_for_selector(f"#pair[data-compared='{n}']")
    assert "Recorded: about the same." in p.status("pair_ready")  # the next pair is there, still by keyboard
    p.close()

    events = stack.feedback_of(user, 3)
    prefs = {"A": ev.PREFERENCE_A, "B": ev.PREFERENCE_B, "TIE": ev.PREFERENCE_TIE}
    assert [(e.kind, e.pair_id, e.preference, e.policy_version) for e in events] == [
        (ev.FEEDBACK_KIND_PREFERENCE, pair[0], prefs[choice], 0) for pair, choice in picks
    ]
    pair_ids = {pair[0] for pair, _ in picks}

    def joined(got: list[ev.PreferencePair]) -> list[tuple[str, str, str]]:
        ids = {e.feedback_id for e in events}
        return sorted(
            (p.source, p.chosen_interaction_id, p.rejected_interaction_id)
            for p in got
            if any(f.endswith(i) for f in p.source_feedback_ids for i in ids)
        )

    (a1, b1), (a2, b2), (a3, b3) = [(pair[1], pair[2]) for pair, _ in picks]
    want = sorted([("preference", a1, b1), ("preference", b2, a2), ("tie", a3, b3), ("tie", b3, a3)])
    got = stack.read(stack.stack.topics.preferences, ev.PreferencePair, lambda got: len(joined(got)) >= 4)
    assert joined(got) == want and len(pair_ids) == 3


def test_rate_limit_and_expired_token_at_phone_width(stack: Stack, browser: Any) -> None:
    p = Page(browser, stack.strict_page + "/", refusals=(429, 403), **PHONE)
    user = p.ready()
    answer = p.ask("where is my order?", 1)
    answered = time.monotonic()
    width = p.page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page is {width} px wide at phone width: it scrolls sideways"
    box = p.page.locator("#send").bounding_box()
    assert box is not None and box["x"] + box["width"] <= 390 and box["height"] >= 40  # a thumb-sized target
    answer.get_by_role("button", name="Good answer").tap()
    p.status("accepted")
    answer.get_by_role("button", name="Rate 2 of 3").tap()
    text = p.status("rate_limited")
    wait = re.search(r"please wait (\d+) seconds and try again", text)
    assert wait and int(wait.group(1)) >= 60, text  # one event per 100 s: the wait from Retry-After
    time.sleep(max(0.0, answered + STRICT_TTL_S + 1.5 - time.monotonic()))  # the token's lifetime passes
    answer.get_by_role("button", name="Edit").tap()
    answer.get_by_role("button", name="Send edit").tap()
    assert "too old to rate now" in p.status("expired")
    p.page.screenshot(path=str(Path(stack.stack.workdir) / "phone.png"))
    p.close()
    assert [(e.kind, e.value) for e in stack.feedback_of(user, 1)] == [(ev.FEEDBACK_KIND_THUMBS, 1)]


def test_session_from_the_url_is_the_user(stack: Stack, browser: Any) -> None:
    minted = requests.post(f"{stack.page}/sessions", json={"user_id": "session-user", "ttl_s": 600}, timeout=10)
    session = minted.json()["session"]
    assert minted.status_code == 200 and session.startswith("fws1.")
    p = Page(browser, f"{stack.page}/?session={session}", **DESKTOP)
    p.ready()
    assert "session" not in p.page.url  # out of the address bar and the history
    assert p.page.inner_text("#who") == "Signed in by your application as session-user"
    answer = p.ask("how do I bake bread?", 1)
    answer.get_by_role("button", name="Bad answer").click()
    p.status("accepted")
    iid = answer.get_attribute("data-interaction-id")
    p.close()
    (e,) = stack.feedback_of("session-user", 1)
    assert (e.kind, e.value, e.interaction_id) == (ev.FEEDBACK_KIND_THUMBS, -1, iid)


def test_widget_on_another_origin(stack: Stack, browser: Any) -> None:
    p = Page(browser, stack.app + "/", **DESKTOP)
    widget = p.page.locator(".flywheel-feedback")
    widget.get_by_role("button", name="Good answer").click()
    p.page.wait_for_selector(".flywheel-feedback[data-outcome=accepted]")
    widget.get_by_role("button", name="Rate 2 of 3").click()
    p.page.wait_for_selector(".flywheel-feedback[data-outcome=accepted] [aria-label='Rate 2 of 3'][aria-pressed=true]")
    assert widget.get_by_role("status").inner_text() == "Thanks, recorded."
    iid = p.page.get_attribute("#answer", "data-interaction-id")
    p.close()
    events = stack.feedback_of("widget-user", 2)
    assert [(e.kind, e.value, e.interaction_id) for e in events] == [
        (ev.FEEDBACK_KIND_THUMBS, 1, iid),
        (ev.FEEDBACK_KIND_RATING, 2, iid),
    ]
