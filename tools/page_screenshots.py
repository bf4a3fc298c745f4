"""Screenshots of the feedback page for docs/PAGE.md and the README: desktop chat, phone, compare mode.

    python -m tools.page_screenshots            # writes docs/img/page-{desktop,phone,compare}.png

Starts the real services (tools/pagestack.py) with the starter policy (built once into the
`flywheel up` cache), on FLYWHEEL_KAFKA_BOOTSTRAP or an embedded Tansu broker, and drives the
page in Debian's Chromium with Playwright (the test extras), as tests/browser/test_page.py does.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
QUESTIONS = ["how do I reset my password?", "where is my order?"]


def starter_policy() -> Path:
    """The starter policy's directory in the `flywheel up` cache (built there if missing)."""
    from flywheel.core.modelstore import ModelStore
    from flywheel.loop.supervisor import cache_store
    from flywheel.policy.service import ensure_starter

    cache = ModelStore(cache_store())
    ensure_starter(cache, progress=True)
    return cache.version_path("policy", 0)


def shoot(page_url: str, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        desktop = browser.new_context(viewport={"width": 1280, "height": 820})
        page = desktop.new_page()
        page.goto(page_url)
        page.wait_for_selector("body[data-ready]")
        for n, q in enumerate(QUESTIONS, 1):
            page.fill("#prompt", q)
            page.press("#prompt", "Enter")
            page.wait_for_selector(f"#answer-{n}[data-state=done]", timeout=60_000)
        first = page.locator("#answer-1")
        first.get_by_role("button", name="Good answer").click()
        page.wait_for_selector("#status[data-kind=accepted]")
        first.get_by_label("Comment").fill("clear steps, thanks")
        first.get_by_role("button", name="Rate 3 of 3").click()
        page.wait_for_selector("#status[data-kind=accepted]")
        second = page.locator("#answer-2")
        second.get_by_role("button", name="Edit").click()
        second.get_by_label("The answer you wanted").fill("Open the tracking link in your order email.")
        page.screenshot(path=str(out / "page-desktop.png"))
        page.goto(page_url + "#compare")
        page.wait_for_selector("#status[data-kind=pair_ready]", timeout=60_000)
        page.keyboard.press("ArrowLeft")
        page.screenshot(path=str(out / "page-compare.png"))
        desktop.close()

        phone = browser.new_context(
            viewport={"width": 390, "height": 780}, device_scale_factor=2, is_mobile=True, has_touch=True
        )
        page = phone.new_page()
        page.goto(page_url)
        page.wait_for_selector("body[data-ready]")
        page.fill("#prompt", "how do I bake bread?")
        page.press("#prompt", "Enter")
        page.wait_for_selector("#answer-1[data-state=done]", timeout=60_000)
        page.locator("#answer-1").get_by_role("button", name="Good answer").tap()
        page.wait_for_selector("#status[data-kind=accepted]")
        page.screenshot(path=str(out / "page-phone.png"))
        phone.close()
        browser.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="where the PNG files go")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from flywheel.core.brokers import EmbeddedTansu
    from flywheel.core.config import KafkaConfig, env_value
    from tools.pagestack import PageStack

    model = starter_policy()
    broker = None
    bootstrap = env_value(KafkaConfig, "bootstrap")
    if not bootstrap:
        broker = EmbeddedTansu()
        bootstrap = broker.start()
    try:
        with tempfile.TemporaryDirectory(prefix="flywheel-page-") as tmp:
            stack = PageStack(bootstrap, Path(tmp), model)
            try:
                policy_port, page_port = stack.port(), stack.port()
                policy = stack.policy(policy_port, [f"http://127.0.0.1:{page_port}"])
                feedback = stack.feedback(page_port, policy.url, [])
                shoot(feedback.page, args.out)
            finally:
                stack.close()
    finally:
        if broker is not None:
            broker.stop()
    for name in ("page-desktop.png", "page-phone.png", "page-compare.png"):
        print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
