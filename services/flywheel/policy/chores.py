"""Work handed to the engine's scheduler thread, to run between two of its steps.

A hot swap's Python-heavy parts (building a module tree, a smoke forward) slow every decode step
they overlap in another thread: both threads want the interpreter lock, which the decode step
releases and re-takes around every torch op (`flywheel.policy.reload`). Run in the scheduler
thread between two steps, they delay one step instead.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class BetweenSteps:
    """Runs functions in the scheduler thread between two steps (at most one per step), and
    returns their results to the calling thread. Where no scheduler thread runs, in the caller.

    `lock`: the condition the scheduler thread waits on (a chore wakes it); `thread`: that thread,
    or None before it starts.
    """

    def __init__(self, lock: threading.Condition, thread: Callable[[], threading.Thread | None]) -> None:
        self._lock = lock
        self._thread = thread
        self._chores: deque[tuple[Callable[[], Any], Future[Any]]] = deque()  # guarded by _lock

    @property
    def scheduler_alive(self) -> bool:
        thread = self._thread()
        return thread is not None and thread.is_alive()

    @property
    def pending(self) -> bool:
        """Chores wait (read under the lock)."""
        return bool(self._chores)

    def __call__(self, fn: Callable[[], T]) -> T:
        """`fn()` in the scheduler thread: its result, or what it raised."""
        thread = self._thread()
        if thread is None or threading.current_thread() is thread:
            return fn()
        done: Future[T] = Future()
        with self._lock:
            self._chores.append((fn, done))
            self._lock.notify_all()
        while True:
            try:
                return done.result(timeout=0.05)
            except TimeoutError:
                if not self.scheduler_alive and done.cancel():
                    return fn()  # the scheduler stopped before it got there

    def run_one(self) -> None:
        """In the scheduler thread: the oldest chore, if any."""
        with self._lock:
            if not self._chores:
                return
            fn, done = self._chores.popleft()
        if done.set_running_or_notify_cancel():
            try:
                done.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
                done.set_exception(e)
