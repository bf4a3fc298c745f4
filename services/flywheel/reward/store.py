"""The durable preference dataset: one sqlite file that the join writes and the trainer reads.

Kept apart from the join (join.py), which decides what goes in: every SQL statement lives
here, behind `PreferenceStore`'s queries (what readers such as the reward trainer, tests and
tools need) and `JoinWrites` (what the join does inside one transaction).
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flywheel.v1 import events_pb2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS interactions (
  interaction_id TEXT PRIMARY KEY, pair_id TEXT, side TEXT, prompt TEXT, response TEXT,
  policy_version INTEGER, user_id TEXT, created_at REAL);
CREATE INDEX IF NOT EXISTS interactions_pair ON interactions(pair_id);
CREATE TABLE IF NOT EXISTS feedback (
  feedback_id TEXT PRIMARY KEY, interaction_id TEXT, pair_id TEXT, status TEXT NOT NULL,
  received_at REAL NOT NULL, event BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS feedback_pending ON feedback(status, interaction_id, pair_id);
CREATE TABLE IF NOT EXISTS pairs (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, pair_id TEXT UNIQUE NOT NULL, split TEXT NOT NULL,
  published INTEGER NOT NULL, source TEXT, weight REAL, margin REAL, message BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS pairs_unpublished ON pairs(seq) WHERE published = 0;
CREATE TABLE IF NOT EXISTS labels (
  feedback_id TEXT PRIMARY KEY, seq INTEGER, interaction_id TEXT, kind TEXT, prompt TEXT, response TEXT,
  label REAL NOT NULL, split TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS labels_prompt ON labels(prompt, kind);
CREATE INDEX IF NOT EXISTS labels_seq ON labels(seq);
CREATE TABLE IF NOT EXISTS demonstrations (
  feedback_id TEXT PRIMARY KEY, interaction_id TEXT, prompt TEXT, demonstration TEXT, created_at REAL);
"""


@dataclasses.dataclass
class PairRow:
    """One stored pair, as the trainer reads it."""

    seq: int
    pair_id: str
    prompt: str
    chosen: str
    rejected: str
    weight: float
    margin: float
    source: str
    split: str


@dataclasses.dataclass
class LabelRow:
    """One pointwise label (thumbs/rating), as the trainer reads it."""

    prompt: str
    response: str
    label: float  # 0..1


@dataclasses.dataclass
class StoredInteraction:
    """One side of an answer, as the join needs it to build pairs."""

    interaction_id: str
    prompt: str
    response: str
    policy_version: int


@dataclasses.dataclass
class LabelPartner:
    """An earlier pointwise label on another answer to the same prompt."""

    feedback_id: str
    interaction_id: str
    response: str
    label: float


class PreferenceStore:
    """The durable join state and preference dataset (one sqlite file, WAL, synchronous=FULL)."""

    def __init__(self, path: str | os.PathLike) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(path)
        self.conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.executescript(_SCHEMA)
        self.lock = threading.RLock()

    def close(self) -> None:
        with self.lock:
            self.conn.close()

    def _q(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self.lock:
            return self.conn.execute(sql, args).fetchall()

    @contextmanager
    def transaction(self) -> Iterator[JoinWrites]:
        """BEGIN IMMEDIATE ... COMMIT under the store's lock; ROLLBACK on any error."""
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield JoinWrites(self.conn)
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    @staticmethod
    def _row(r: tuple[Any, ...]) -> PairRow:
        seq, split, blob = r
        m = events_pb2.PreferencePair.FromString(blob)
        return PairRow(seq, m.pair_id, m.prompt, m.chosen, m.rejected, m.weight, m.margin, m.source, split)

    def pairs_after(self, seq: int, split: str | None = "train", limit: int = 100_000) -> list[PairRow]:
        """Pairs stored after `seq` (in arrival order), of one split or of both (None)."""
        where = "seq > ?" + (" AND split = ?" if split else "")
        args = (seq, split) if split else (seq,)
        return [
            self._row(r)
            for r in self._q(
                f"SELECT seq, split, message FROM pairs WHERE {where} ORDER BY seq LIMIT {int(limit)}", args
            )
        ]

    def count_pairs(self, split: str | None = None) -> int:
        if split is None:
            return int(self._q("SELECT COUNT(*) FROM pairs")[0][0])
        return int(self._q("SELECT COUNT(*) FROM pairs WHERE split = ?", (split,))[0][0])

    def unpublished_pairs(self) -> list[tuple[int, events_pb2.PreferencePair]]:
        """(seq, pair) of every stored pair Kafka has not acknowledged yet, in arrival order."""
        rows = self._q("SELECT seq, message FROM pairs WHERE published = 0 ORDER BY seq")
        return [(seq, events_pb2.PreferencePair.FromString(blob)) for seq, blob in rows]

    def count_interactions(self) -> int:
        return int(self._q("SELECT COUNT(*) FROM interactions")[0][0])

    def max_seq(self) -> int:
        return int(self._q("SELECT COALESCE(MAX(seq), 0) FROM pairs")[0][0])

    def labels(self, split: str = "train", limit: int = 100_000) -> list[LabelRow]:
        rows = self._q(
            "SELECT prompt, response, label FROM labels WHERE split = ? ORDER BY seq LIMIT ?", (split, limit)
        )
        return [LabelRow(*r) for r in rows]

    def supervised_examples(self, limit: int = 100_000) -> list[tuple[str, str]]:
        """(prompt, demonstration) rows for supervised fine-tuning of the policy."""
        rows = self._q("SELECT prompt, demonstration FROM demonstrations ORDER BY created_at LIMIT ?", (limit,))
        return [(prompt, demonstration) for prompt, demonstration in rows]

    def feedback_status(self, feedback_id: str) -> str | None:
        rows = self._q("SELECT status FROM feedback WHERE feedback_id = ?", (feedback_id,))
        return str(rows[0][0]) if rows else None

    def pending_count(self) -> int:
        return int(self._q("SELECT COUNT(*) FROM feedback WHERE status = 'pending'")[0][0])


class JoinWrites:
    """The join's reads and writes inside one open transaction (`PreferenceStore.transaction`)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def insert_interaction(self, it: events_pb2.Interaction) -> bool:
        """Store an interaction once (by interaction_id); False if it was already there."""
        created_at = it.created_at.ToNanoseconds() / 1e9 if it.HasField("created_at") else time.time()
        cur = self.conn.execute(
            "INSERT OR IGNORE INTO interactions VALUES (?,?,?,?,?,?,?,?)",
            (
                it.interaction_id,
                it.pair_id,
                it.pair_side,
                it.prompt,
                it.response,
                it.policy_version,
                it.user_id,
                created_at,
            ),
        )
        return cur.rowcount > 0

    def interaction(self, interaction_id: str) -> StoredInteraction | None:
        row = self.conn.execute(
            "SELECT interaction_id, prompt, response, policy_version FROM interactions WHERE interaction_id = ?",
            (interaction_id,),
        ).fetchone()
        return StoredInteraction(*row) if row else None

    def pair_sides(self, pair_id: str) -> dict[str, StoredInteraction]:
        """The stored sides ("A", "B") of a GeneratePair pair."""
        rows = self.conn.execute(
            "SELECT side, interaction_id, prompt, response, policy_version FROM interactions WHERE pair_id = ?",
            (pair_id,),
        )
        return {side: StoredInteraction(*rest) for side, *rest in rows}

    def insert_feedback(self, fb: events_pb2.FeedbackEvent) -> bool:
        """Store a feedback event as pending, once (by feedback_id); False if it was already there."""
        cur = self.conn.execute(
            "INSERT OR IGNORE INTO feedback VALUES (?,?,?,?,?,?)",
            (fb.feedback_id, fb.interaction_id, fb.pair_id, "pending", time.time(), fb.SerializeToString()),
        )
        return cur.rowcount > 0

    def pending_feedback_for(self, interaction_id: str, pair_id: str) -> list[events_pb2.FeedbackEvent]:
        """Pending feedback on this interaction or on its pair."""
        rows = self.conn.execute(
            "SELECT event FROM feedback WHERE status = 'pending' AND (interaction_id = ? OR (pair_id != '' AND pair_id = ?))",
            (interaction_id, pair_id),
        ).fetchall()
        return [events_pb2.FeedbackEvent.FromString(blob) for (blob,) in rows]

    def set_feedback_status(self, feedback_id: str, status: str) -> None:
        self.conn.execute("UPDATE feedback SET status = ? WHERE feedback_id = ?", (status, feedback_id))

    def expire_pending(self, received_before: float) -> int:
        """Mark pending feedback received before this time orphaned; returns how many."""
        return self.conn.execute(
            "UPDATE feedback SET status = 'orphaned' WHERE status = 'pending' AND received_at < ?", (received_before,)
        ).rowcount

    def label_partners(
        self, prompt: str, kind: str, interaction_id: str, response: str, label: float, limit: int
    ) -> list[LabelPartner]:
        """The most recent labels of this kind on other, different answers to the same prompt."""
        rows = self.conn.execute(
            "SELECT feedback_id, interaction_id, response, label FROM labels WHERE prompt = ? AND kind = ? "
            "AND interaction_id != ? AND response != ? AND label != ? ORDER BY seq DESC LIMIT ?",
            (prompt, kind, interaction_id, response, label, limit),
        ).fetchall()
        return [LabelPartner(*r) for r in rows]

    def insert_label(self, feedback_id: str, it: StoredInteraction, kind: str, label: float, split: str) -> None:
        seq = self.conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM labels").fetchone()[0]
        self.conn.execute(
            "INSERT OR IGNORE INTO labels VALUES (?,?,?,?,?,?,?,?)",
            (feedback_id, seq, it.interaction_id, kind, it.prompt, it.response, label, split),
        )

    def insert_demonstration(self, feedback_id: str, it: StoredInteraction, demonstration: str) -> None:
        self.conn.execute(
            "INSERT OR IGNORE INTO demonstrations VALUES (?,?,?,?,?)",
            (feedback_id, it.interaction_id, it.prompt, demonstration, time.time()),
        )

    def insert_pair(self, p: events_pb2.PreferencePair, split: str, published: bool) -> bool:
        """Store a pair once (by pair_id); False if it was already there."""
        cur = self.conn.execute(
            "INSERT OR IGNORE INTO pairs (pair_id, split, published, source, weight, margin, message) "
            "VALUES (?,?,?,?,?,?,?)",
            (p.pair_id, split, int(published), p.source, p.weight, p.margin, p.SerializeToString()),
        )
        return cur.rowcount > 0

    def mark_published(self, seqs: Sequence[int]) -> None:
        self.conn.executemany("UPDATE pairs SET published = 1 WHERE seq = ?", [(s,) for s in seqs])
