"""The durable record of accepted feedback, so that a retry counts once and a user votes once.

Each accepted item leaves two claims, both keyed by the user the feedback token binds (with API
keys configured, the user in its key's namespace: core.auth.Caller.scoped_user_id):
- its id, `id_key(user, feedback_id)`: a retry of the same id is DUPLICATE. Ids are per user, so
  nobody can pre-claim an id another user will send: theirs is another piece of feedback;
- its vote, `vote_key(user, kind, subject)`: one per user, feedback kind (thumbs, rating,
  demonstration, preference) and subject (the answer's interaction_id; a preference's pair_id).
  First wins: a later item of the same vote under another id is ALREADY_VOTED and not recorded.
Both are remembered `retention_s`, longer than a feedback token lives (feedback.dedup_retention_s
vs auth.token_ttl_s), after which no token admits another vote anyway; the reward join ignores a
repeated vote too (reward/join.py), whichever route brought it.

A sqlite store of its own, apart from the hand-off engine in intake.py, whose module doc
explains the order it relies on (claims are recorded only after their event is durable) and why
the store runs with synchronous=NORMAL. Stores from before per-user ids kept raw feedback ids in
the table `seen`: it is no longer read (an id there names no user) and empties by retention.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

Claim = tuple[str, str]  # (id_key, vote_key) of one item


def id_key(user_id: str, feedback_id: str) -> str:
    """The claim of a feedback id by one user (length-prefixed: no two (user, id) pairs share one)."""
    return f"id:{len(user_id)}:{user_id}:{feedback_id}"


def vote_key(user_id: str, kind: str, subject: str) -> str:
    """The claim of one user's vote of `kind` ("thumbs", ...) on an answer or pair."""
    return f"vote:{len(user_id)}:{user_id}:{kind}:{subject}"


class FeedbackClaims:
    """Durable id and vote claims with in-flight reservations and group commits.

    The state lock guards only in-memory sets, so `commit` and `release` (called on the event
    loop) never wait for disk; sqlite reads and the flusher's writes use their own connections.
    Every committed key is always in `_unflushed`, `_flushing` or the table.
    """

    def __init__(self, path: str, retention_s: float, flush_interval_s: float = 1.0) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._writer = self._connect(path)
        self._writer.execute("CREATE TABLE IF NOT EXISTS claims (key TEXT PRIMARY KEY, at REAL NOT NULL)")
        self._reader = self._connect(path)
        self.retention_s, self.flush_interval_s = retention_s, flush_interval_s
        self._prune()
        self._lock, self._read_lock, self._write_lock = threading.Lock(), threading.Lock(), threading.Lock()
        self._inflight: set[str] = set()
        self._unflushed: dict[str, float] = {}
        self._flushing: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._flush_loop, name="feedback-claims", daemon=True)
        self._thread.start()

    @staticmethod
    def _connect(path: str) -> sqlite3.Connection:
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # survives a process crash; see intake.py's module doc
        return conn

    def _prune(self) -> None:
        cutoff = time.time() - self.retention_s
        self._writer.execute("DELETE FROM claims WHERE at < ?", (cutoff,))
        legacy = self._writer.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'seen'")
        if legacy.fetchone():  # raw ids of a store from before per-user ids: only aged out
            self._writer.execute("DELETE FROM seen WHERE at < ?", (cutoff,))

    def reserve(self, claims: list[Claim]) -> list[str]:
        """Per claim, in order: "new" (both keys now reserved: commit or release it), "seen" (its id
        was recorded), "busy" (its id is in flight), "voted" (its vote was recorded under another
        id) or "vote_busy" (its vote is in flight under another id). Blocking."""
        out, lookup = [], []
        with self._lock:  # memory only; a reservation keeps everyone else off the keys while we read
            for n, (i, v) in enumerate(claims):
                if i in self._inflight:
                    out.append("busy")
                elif i in self._unflushed or i in self._flushing:
                    out.append("seen")
                elif v in self._inflight:
                    out.append("vote_busy")
                elif v in self._unflushed or v in self._flushing:
                    out.append("voted")
                else:
                    self._inflight.update((i, v))
                    out.append("new")
                    lookup.append(n)
        if lookup:
            keys = [k for n in lookup for k in claims[n]]
            stored: set[str] = set()
            with self._read_lock:  # one query per 500 keys, not one per key
                for k in range(0, len(keys), 500):
                    chunk = keys[k : k + 500]
                    sql = f"SELECT key FROM claims WHERE key IN ({','.join('?' * len(chunk))})"
                    stored.update(row[0] for row in self._reader.execute(sql, chunk))
            if stored:
                with self._lock:
                    for n in lookup:
                        i, v = claims[n]
                        if i in stored or v in stored:
                            self._inflight.difference_update((i, v))
                            out[n] = "seen" if i in stored else "voted"
        return out

    def commit(self, claims: list[Claim]) -> None:
        """Record reserved claims (their events are durable); `flush` writes them to disk."""
        now = time.time()
        with self._lock:
            for i, v in claims:
                self._inflight.difference_update((i, v))
                self._unflushed[i] = self._unflushed[v] = now

    def release(self, claims: list[Claim]) -> None:
        """Drop reservations whose events were not made durable (the client may retry)."""
        with self._lock:
            for i, v in claims:
                self._inflight.difference_update((i, v))

    def flush(self) -> None:
        with self._write_lock:
            with self._lock:
                if not self._unflushed:
                    return
                self._flushing, self._unflushed = self._unflushed, {}
            try:
                self._writer.execute("BEGIN")
                self._writer.executemany("INSERT OR IGNORE INTO claims (key, at) VALUES (?, ?)", self._flushing.items())
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
                log.exception("writing feedback claims failed; retrying")

    def __contains__(self, key: str) -> bool:
        """Whether a claim (`id_key(...)` or `vote_key(...)`) is recorded."""
        with self._lock:
            if key in self._unflushed or key in self._flushing:
                return True
        with self._read_lock:
            return self._reader.execute("SELECT 1 FROM claims WHERE key=?", (key,)).fetchone() is not None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.flush()
        self._reader.close()
        self._writer.close()
