"""Hot-swap settings: the verify and load threads yield the CPU to the decode thread
(EngineConfig.swap_nice); the updates topic's fetch wait is range-checked."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from flywheel.core.config import ConfigError
from flywheel.policy.config import EngineConfig
from flywheel.policy.swap import lower_cpu_priority


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(sys.platform != "linux", reason="niceness is per thread on Linux only")
def test_only_the_swap_thread_and_the_threads_it_starts_are_lowered() -> None:
    before, seen = _nice(), {}

    def swap_thread() -> None:
        lower_cpu_priority(5)
        seen["swap"] = _nice()
        hasher = threading.Thread(target=lambda: seen.setdefault("hasher", _nice()))  # e.g. sha256_files' pool
        hasher.start()
        hasher.join()

    t = threading.Thread(target=swap_thread)
    t.start()
    t.join()
    assert seen == {"swap": min(19, before + 5), "hasher": min(19, before + 5)}
    assert _nice() == before  # the calling (decode) thread keeps its priority


def test_zero_leaves_the_thread_alone() -> None:
    before = _nice()
    lower_cpu_priority(0)
    assert _nice() == before


def test_swap_nice_out_of_range_says_what_to_use() -> None:
    with pytest.raises(ConfigError, match=r"swap_nice = 20: use 0 \(off\) to 19"):
        EngineConfig(swap_nice=20)


def test_update_fetch_wait_out_of_range_says_what_to_use() -> None:
    with pytest.raises(ConfigError, match=r"update_fetch_wait_ms = 0: use 10 to 5000"):
        EngineConfig(update_fetch_wait_ms=0)
