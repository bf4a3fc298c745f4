"""The durable set of feedback_ids the intake has already accepted, so a retry counts once.

A sqlite store of its own, apart from the hand-off engine in intake.py, whose module doc
explains the order it relies on (an id is recorded only after its event is durable) and why the
store runs with synchronous=NORMAL.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)


class SeenFeedbackIds:
    """Durable set of accepted feedback_ids with in-flight reservations and group commits.

    The state lock guards only in-memory sets, so `commit` and `release` (called on the event
    loop) never wait for disk; sqlite reads and the flusher's writes use their own connections.
    Every committed id is always in `_unflushed`, `_flushing` or the table.
    """

    def __init__(self, path: str, retention_s: float, flush_interval_s: float = 1.0) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._writer = self._connect(path)
        self._writer.execute("CREATE TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY, at REAL NOT NULL)")
        self._reader = self._connect(path)
        self.retention_s, self.flush_interval_s = retention_s, flush_interval_s
        self._prune()
        self._lock, self._read_lock, self._write_lock = threading.Lock(), threading.Lock(), threading.Lock()
        self._inflight: set[str] = set()
        self._unflushed: dict[str, float] = {}
        self._flushing: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._flush_loop, name="feedback-seen-ids", daemon=True)
        self._thread.start()

    @staticmethod
    def _connect(path: str) -> sqlite3.Connection:
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # survives a process crash; see intake.py's module doc
        return conn

    def _prune(self) -> None:
        self._writer.execute("DELETE FROM seen WHERE at < ?", (time.time() - self.retention_s,))

    def reserve(self, ids: list[str]) -> list[str]:
        """Per id: "new" (now reserved: commit or release it), "seen" or "busy" (in flight). Blocking."""
        out, lookup = [], []
        with self._lock:  # memory only; a reservation keeps everyone else off the id while we read
            for n, i in enumerate(ids):
                if i in self._inflight:
                    out.append("busy")
                elif i in self._unflushed or i in self._flushing:
                    out.append("seen")
                else:
                    self._inflight.add(i)
                    out.append("new")
                    lookup.append(n)
        if lookup:
            stored: set[str] = set()
            with self._read_lock:  # one query per 500 ids, not one per id
                for k in range(0, len(lookup), 500):
                    chunk = [ids[n] for n in lookup[k : k + 500]]
                    sql = f"SELECT id FROM seen WHERE id IN ({','.join('?' * len(chunk))})"
                    stored.update(row[0] for row in self._reader.execute(sql, chunk))
            if stored:
                with self._lock:
                    for n in lookup:
                        if ids[n] in stored:
                            self._inflight.discard(ids[n])
                            out[n] = "seen"
        return out

    def commit(self, ids: list[str]) -> None:
        """Mark reserved ids seen (their events are durable); `flush` writes them to disk."""
        now = time.time()
        with self._lock:
            for i in ids:
                self._inflight.discard(i)
                self._unflushed[i] = now

    def release(self, ids: list[str]) -> None:
        """Drop reservations whose events were not made durable (the client may retry)."""
        with self._lock:
            self._inflight.difference_update(ids)

    def flush(self) -> None:
        with self._write_lock:
            with self._lock:
                if not self._unflushed:
                    return
                self._flushing, self._unflushed = self._unflushed, {}
            try:
                self._writer.execute("BEGIN")
                self._writer.executemany("INSERT OR IGNORE INTO seen (id, at) VALUES (?, ?)", self._flushing.items())
                self._writer.execute("COMMIT")
            except BaseException:
                if self._writer.in_transaction:
                    self._writer.execute("ROLLBACK")
                with self._lock:  # keep them for the next try
                    self._unflushed.update(self._flushing)
                    self._flushing = {}
                raise
            with self._lock:
                self._flushing = {}

    def _flush_loop(self) -> None:
        last_prune = time.monotonic()
        while not self._stop.wait(self.flush_interval_s):
            try:
                self.flush()
                if time.monotonic() - last_prune > 3600:
                    with self._write_lock:
                        self._prune()
                    last_prune = time.monotonic()
            except sqlite3.Error:
                log.exception("writing seen feedback ids failed; retrying")

    def __contains__(self, feedback_id: str) -> bool:
        with self._lock:
            if feedback_id in self._unflushed or feedback_id in self._flushing:
                return True
        with self._read_lock:
            return self._reader.execute("SELECT 1 FROM seen WHERE id=?", (feedback_id,)).fetchone() is not None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.flush()
        self._reader.close()
        self._writer.close()
