"""Comparisons a minute the feedback page allows a keyboard user, against the bare API's time per pair.

Issue 21 asks for 10 comparisons a minute without the mouse. In one run, on the starter policy
`flywheel up` serves (from the starter cache, built there as `flywheel models init` does if
missing) with the shipped engine settings, and a real Kafka broker:
  1. baseline: a bare `POST /generate_pair` over HTTP with the page's body and prompt, on one
     keep-alive connection: the API's own time per pair;
  2. the page in Chromium, compare mode reached and driven by keyboard alone: press 1, 2 or 3 and
     wait until the next pair is shown. Timed inside the page, from the keydown event to the
     frame after the status line says the next pair is ready (what a person waits for); the time
     Playwright saw from its key press to that state is kept as a cross-check.
The two alternate, one round each, --n rounds after one warm-up round (kept apart in the
record), so both see the same load on this shared machine. Machine time only: a person's reading
time comes on top, so the rate is a ceiling. Every choice (warm-up included) must then be on the
feedback topic with its pair and preference, and the page must have said "accepted" for each.

The page's time splits (resource timing) into script before its POST /feedback, that request,
its POST /generate_pair, and rendering: what the page adds to the model's time. The services run
in this process (tools/pagestack.py, one asyncio loop, as the browser tests run them), not one
process each as under `flywheel up`: the feedback hand-off shares the loop with the policy's HTTP.
With --n 20, p95 is the slowest round.

    .venv/bin/python bench/page_pace.py --n 20                        # starts its own Kafka
    .venv/bin/python bench/page_pace.py --bootstrap 127.0.0.1:9092 --out docs/bench/cpu-page-pace.json
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from serving import pct, report  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
KEYS = {"1": "A", "2": "B", "3": "TIE"}
TARGET_PER_MINUTE = 10.0
# Installed before the page's own script (CDP, so the page's CSP does not apply): the time of every
# key event, and of every change of the status line's kind with the pair shown and the next frame.
INSTRUMENT = """(() => {
  const log = (window.__pace = { keys: [], status: [] });
  performance.setResourceTimingBufferSize(100000);
  addEventListener("keydown", (e) => log.keys.push({ key: e.key, t: e.timeStamp }), true);
  const watch = () => {
    const el = document.getElementById("status");
    new MutationObserver((records) => {
      const t = performance.now();
      const kinds = records.slice(1).map((r) => r.oldValue).concat([el.dataset.kind]);
      const pair = document.getElementById("pair").dataset.pairId || null;
      for (const kind of kinds) {
        const entry = { kind, t, pair, painted: null };
        log.status.push(entry);
        requestAnimationFrame(() => setTimeout(() => (entry.painted = performance.now()), 0));
      }
    }).observe(el, { attributes: true, attributeFilter: ["data-kind"], attributeOldValue: true });
  };
  if (document.readyState === "loading") addEventListener("DOMContentLoaded", watch);
  else watch();
})();"""
READY = """(prev) => document.getElementById("status").dataset.kind === "pair_ready"
  && document.getElementById("pair").dataset.pairId !== prev"""
RESOURCES = """() => performance.getEntriesByType("resource").map(
  (e) => ({ name: e.name, start: e.startTime, end: e.responseEnd }))"""


def since(t0: float, t: float | None) -> float | None:
    return None if t is None else round(t - t0, 1)


def pair_up(log: dict[str, list[dict[str, Any]]], resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per 1/2/3 key press of the page's log: when the next pair was shown and painted,
    what the status line said in between (the feedback's outcome), and the page's two requests.
    Times in ms from the keydown; `None` where the page never got there."""
    status, out = log["status"], []
    for key in [k for k in log["keys"] if k["key"] in KEYS]:
        t = key["t"]
        before = [s["pair"] for s in status if s["t"] < t and s["kind"] == "pair_ready"]
        shown_pair = before[-1] if before else None
        after = [s for s in status if s["t"] >= t]
        ready = next((s for s in after if s["kind"] == "pair_ready" and s["pair"] != shown_pair), None)
        said = [s["kind"] for s in after if ready is None or s["t"] <= ready["t"]]

        def fetch(path: str, t: float = t) -> dict[str, Any] | None:
            return next((r for r in resources if r["name"].endswith(path) and r["start"] >= t), None)

        fb, gp = fetch("/feedback"), fetch("/generate_pair")
        out.append(
            {
                "key": key["key"],
                "judged_pair": shown_pair,
                "next_pair": ready["pair"] if ready else None,
                "outcomes": [k for k in said if k not in ("answering", "pair_ready")],
                "shown_ms": since(t, ready["t"] if ready else None),
                "painted_ms": since(t, ready["painted"] if ready else None),
                "feedback_ms": fb and [since(t, fb["start"]), since(t, fb["end"])],
                "generate_pair_ms": gp and [since(t, gp["start"]), since(t, gp["end"])],
            }
        )
    return out


def stats(xs: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(xs), "p50": pct(xs, 0.5), "p95": pct(xs, 0.95), "max": max(xs)}


def breakdown(rounds: list[dict[str, Any]]) -> dict[str, float]:
    """Median ms of each part of a comparison: script before the feedback request, the request, the
    gap to the pair request, that request, then until the pair is shown and painted."""
    parts: dict[str, list[float]] = {}
    for r in rounds:
        (fs, fe), (gs, ge) = r["feedback_ms"], r["generate_pair_ms"]
        for name, v in (
            ("key_to_feedback_request", fs),
            ("feedback_request", fe - fs),
            ("feedback_to_pair_request", gs - fe),
            ("generate_pair_request", ge - gs),
            ("response_to_shown", r["shown_ms"] - ge),
            ("shown_to_painted", r["painted_ms"] - r["shown_ms"]),
        ):
            parts.setdefault(name, []).append(v)
    return {name: round(statistics.median(v), 1) for name, v in parts.items()}


class BarePolicy:
    """POST /generate_pair as the page sends it, over one keep-alive connection."""

    def __init__(self, url: str, user: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=120)
        self.headers = {"content-type": "application/json", "x-flywheel-user-id": user}

    def pair(self, prompt: str) -> float:
        t0 = time.perf_counter()
        self.conn.request("POST", "/generate_pair", json.dumps({"inputs": prompt}), self.headers)
        resp = self.conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise SystemExit(f"bare POST /generate_pair answered {resp.status}: {body[:300]!r}")
        json.loads(body)["pair_id"]  # noqa: B018 - a whole answer, parsed as the page does
        return time.perf_counter() - t0


def on_topic(bootstrap: str, topic: str, user: str, n: int, timeout_s: float = 30) -> list[Any]:
    """The feedback events of `user` on `topic` (one partition) once `n` arrived."""
    from kafka import KafkaConsumer, TopicPartition

    from flywheel.v1 import events_pb2 as ev

    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    tp = TopicPartition(topic, 0)
    c.assign([tp])
    c.seek_to_beginning(tp)
    got: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < n and time.monotonic() < deadline:
            for ms in c.poll(timeout_ms=200).values():
                got += [e for e in (ev.FeedbackEvent.FromString(m.value) for m in ms) if e.user_id == user]
    finally:
        c.close()
    return got


@contextlib.contextmanager
def kafka(bootstrap: str) -> Iterator[str]:
    """--bootstrap, else a broker of our own (tools/kafka.py: Apache Kafka, as the tests use)."""
    if bootstrap:
        yield bootstrap
        return
    from tools.kafka import ApacheKafka

    broker = ApacheKafka()
    try:
        yield broker.start()
    finally:
        broker.stop()


def starter_policy() -> tuple[Path, dict[str, Any]]:
    """The starter policy `flywheel up` serves: from the starter cache, built there if missing."""
    from flywheel.core.modelstore import ModelStore
    from flywheel.loop.supervisor import cache_store
    from flywheel.policy.service import ensure_starter
    from flywheel.policy.starter import RECIPE

    cache = ModelStore(cache_store())
    ensure_starter(cache)
    path = cache.version_path("policy", 0)
    meta = json.loads((path / "starter.json").read_text())
    return path, {"starter_policy": RECIPE, "params": meta["params"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20, help="comparisons (and bare pairs)")
    ap.add_argument("--bootstrap", default="", help="Kafka bootstrap; empty: start Apache Kafka (tools/kafka.py)")
    ap.add_argument("--chromium", default=CHROMIUM, help="the Chromium Playwright drives (no browser download)")
    ap.add_argument("--out", default="", help="write the JSON record here")
    args = ap.parse_args()
    if args.n < 1:
        raise SystemExit(f"--n {args.n}: use 1 or more comparisons")
    if not Path(args.chromium).is_file():
        raise SystemExit(f"{args.chromium} is missing: apt-get install chromium, or pass --chromium PATH")
    import torch
    from playwright.sync_api import sync_playwright

    from flywheel.policy.config import EngineConfig
    from tools.pagestack import PageStack

    logging.getLogger("kafka").setLevel(logging.WARNING)  # the services' clients, in this process
    os.environ.setdefault("FLYWHEEL_LOG_LEVEL", "WARNING")  # and in the policy's swap worker
    torch.set_num_threads(1)  # as `flywheel up` runs each service (OMP_NUM_THREADS=1)
    model, model_info = starter_policy()
    d = EngineConfig()  # the shipped engine settings, not pagestack's test limits
    engine = {k: getattr(d, k) for k in ("max_concurrent_sequences", "max_input_tokens", "default_max_new_tokens")}
    root = Path(tempfile.mkdtemp(prefix="flywheel-bench-page-pace-"))
    load_before = os.getloadavg()
    with kafka(args.bootstrap) as bootstrap:
        stack = PageStack(bootstrap, root, model)
        try:
            pport, fport = stack.port(), stack.port()
            policy_url, page_url = f"http://127.0.0.1:{pport}", f"http://127.0.0.1:{fport}"
            stack.feedback(fport, policy_url, [], wait=False)
            stack.policy(pport, [page_url], **engine)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
                result = run(browser, page_url, policy_url, args.n)
                result["chromium"] = browser.version
                browser.close()
            events = on_topic(bootstrap, stack.topics.feedback, result.pop("user"), args.n + 1)
        finally:
            stack.close()
    result["feedback"] = check_topic(events, result["per_comparison"])
    result["machine"] = {
        "cpus": os.cpu_count(),
        "loadavg_1m_before": load_before[0],
        "loadavg_1m_after": os.getloadavg()[0],
    }
    out = {"model": model_info, "engine": engine} | result
    report(out, args.out, root)
    page, bare = result["page_s"], result["bare_api_s"]
    print(
        f"{result['comparisons_per_minute']:.0f} comparisons a minute by keyboard (machine time; target "
        f">= {TARGET_PER_MINUTE:g}): p50 {page['p50'] * 1000:.0f} ms, p95 {page['p95'] * 1000:.0f} ms a comparison, "
        f"{result['page_vs_bare_api']:.2f}x the bare API's {bare['mean'] * 1000:.0f} ms a pair; "
        f"{result['feedback']['on_topic']}/{args.n + 1} choices on the topic, all accepted: "
        f"{result['feedback']['every_choice_accepted_and_on_topic']}"
    )


def run(browser: Any, page_url: str, policy_url: str, n: int) -> dict[str, Any]:
    """Alternate a bare pair and a keyboard comparison, 1 + n times (the first of each warms up and
    is not counted); the timings, every comparison's record and the page's user."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.add_init_script(script=INSTRUMENT)
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.extend([m.text] if m.type == "error" else []))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(page_url + "/ui/")
    page.wait_for_selector("body[data-ready]")
    user = page.get_attribute("#who", "data-user") or ""
    prompts = json.loads(urllib.request.urlopen(page_url + "/ui/config.json", timeout=10).read())["prompts"]
    page.keyboard.press("Shift+Tab")  # from the question box to the Compare switch, as a person would
    page.keyboard.press("Enter")
    page.wait_for_function(READY, arg=None, timeout=60_000)
    bare, bare_s, driver = BarePolicy(policy_url, "bench-bare"), [], []
    for i in range(n + 1):
        prompt = prompts[(i + 1) % len(prompts)]  # the page's next pair: it showed prompts[0] first
        bare_s.append(bare.pair(prompt))
        shown = page.get_attribute("#pair", "data-pair-id")
        t0 = time.perf_counter()
        page.keyboard.press("123"[i % 3])
        try:
            page.wait_for_function(READY, arg=shown, timeout=60_000)
        except Exception as e:
            said = page.inner_text("#status")
            raise SystemExit(f"comparison {i}: no next pair within 60 s; the page says {said!r}") from e
        driver.append(time.perf_counter() - t0)
        if page.inner_text("#pair-question") != prompt:
            raise SystemExit(f"comparison {i}: the page asked another prompt than the baseline's")
    page.evaluate("() => new Promise((r) => requestAnimationFrame(() => setTimeout(r, 0)))")  # the last paint
    rounds = pair_up(page.evaluate("() => window.__pace"), page.evaluate(RESOURCES))
    context.close()
    if len(rounds) != n + 1 or any(r["painted_ms"] is None or r["generate_pair_ms"] is None for r in rounds):
        raise SystemExit(f"the page's log has {len(rounds)} of {n + 1} complete comparisons: {rounds}")
    page_s = [r["painted_ms"] / 1000 for r in rounds[1:]]
    return {
        "comparisons": n,
        "user": user,
        "comparisons_per_minute": 60 / statistics.fmean(page_s),
        "target_per_minute": TARGET_PER_MINUTE,
        "page_vs_bare_api": statistics.fmean(page_s) / statistics.fmean(bare_s[1:]),
        "page_vs_bare_api_p50": pct(page_s, 0.5) / pct(bare_s[1:], 0.5),
        "page_s": stats(page_s),
        "bare_api_s": stats(bare_s[1:]),
        "page_as_playwright_saw_it_s": stats(driver[1:]),
        "page_parts_p50_ms": breakdown(rounds[1:]),
        "warm_up": {"page_s": rounds[0]["painted_ms"] / 1000, "bare_api_s": bare_s[0]},
        "console_errors": errors,
        "per_comparison": rounds,
    }


def check_topic(events: list[Any], rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Every choice (warm-up included) once on the feedback topic, in order, with its pair and
    preference, and the page said "accepted" for each."""
    from flywheel.v1 import events_pb2 as ev

    prefs = {"1": ev.PREFERENCE_A, "2": ev.PREFERENCE_B, "3": ev.PREFERENCE_TIE}
    want = [(r["judged_pair"], prefs[r["key"]]) for r in rounds]
    arrived = [(e.pair_id, e.preference) for e in events if e.kind == ev.FEEDBACK_KIND_PREFERENCE]
    said = Counter(o for r in rounds for o in r["outcomes"])
    return {
        "choices": len(rounds),
        "page_said": dict(said),
        "on_topic": len(arrived),
        "every_choice_accepted_and_on_topic": said == Counter(accepted=len(rounds)) and arrived == want,
    }


if __name__ == "__main__":
    main()
