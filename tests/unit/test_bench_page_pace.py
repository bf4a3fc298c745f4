"""bench/page_pace.py's reading of the page's own log (no browser): which key press led to which
pair, what the status line said between, and which requests were the comparison's."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parents[2] / "bench" / "page_pace.py"


def _load() -> Any:
    spec = importlib.util.spec_from_file_location("bench_page_pace", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


page_pace = _load()


def status(kind: str, t: float, pair: str | None, painted: float | None = None) -> dict[str, Any]:
    return {"kind": kind, "t": t, "pair": pair, "painted": painted}


def test_each_choice_key_is_timed_to_the_next_pair_and_its_own_requests() -> None:
    log = {
        "keys": [
            {"key": "Shift", "t": 1.0},
            {"key": "Enter", "t": 2.0},
            {"key": "1", "t": 100.0},
            {"key": "2", "t": 300.0},
        ],
        "status": [
            status("answering", 5.0, None),
            status("pair_ready", 50.0, "p1", 60.0),
            status("accepted", 120.0, "p1"),
            status("answering", 121.0, None),
            status("pair_ready", 200.0, "p2", 212.5),
            status("rate_limited", 310.0, "p2"),  # the second choice was refused: no next pair
        ],
    }
    resources = [
        {"name": "http://h:1/ui/config.json", "start": 3.0, "end": 4.0},
        {"name": "http://h:2/generate_pair", "start": 6.0, "end": 49.0},  # the first pair, before any key
        {"name": "http://h:1/feedback", "start": 103.0, "end": 118.0},
        {"name": "http://h:2/generate_pair", "start": 122.0, "end": 195.0},
        {"name": "http://h:1/feedback", "start": 302.0, "end": 309.0},
    ]
    first, second = page_pace.pair_up(log, resources)
    assert first == {
        "key": "1",
        "judged_pair": "p1",
        "next_pair": "p2",
        "outcomes": ["accepted"],
        "shown_ms": 100.0,
        "painted_ms": 112.5,
        "feedback_ms": [3.0, 18.0],
        "generate_pair_ms": [22.0, 95.0],
    }
    assert (second["judged_pair"], second["next_pair"], second["shown_ms"], second["painted_ms"]) == (
        "p2",
        None,
        None,
        None,
    )
    assert second["outcomes"] == ["rate_limited"] and second["generate_pair_ms"] is None
    assert page_pace.breakdown([first]) == {
        "key_to_feedback_request": 3.0,
        "feedback_request": 15.0,
        "feedback_to_pair_request": 4.0,
        "generate_pair_request": 73.0,
        "response_to_shown": 5.0,
        "shown_to_painted": 12.5,
    }
