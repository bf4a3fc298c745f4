"""The durable preference dataset: one sqlite file that the join writes and the trainer reads.

Kept apart from the join (join.py), which decides what goes in, so that readers of the
dataset (the reward trainer, tests, tools) need only this: the schema, `PreferenceStore`'s
queries, and the `PairRow` / `LabelRow` they return.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

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

    def _q(self, sql: str, args: Sequence = ()) -> list[tuple]:
        with self.lock:
            return self.conn.execute(sql, args).fetchall()

    @staticmethod
    def _row(r: tuple) -> PairRow:
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
            return self._q("SELECT COUNT(*) FROM pairs")[0][0]
        return self._q("SELECT COUNT(*) FROM pairs WHERE split = ?", (split,))[0][0]

    def max_seq(self) -> int:
        return self._q("SELECT COALESCE(MAX(seq), 0) FROM pairs")[0][0]

    def labels(self, split: str = "train", limit: int = 100_000) -> list[LabelRow]:
        rows = self._q(
            "SELECT prompt, response, label FROM labels WHERE split = ? ORDER BY seq LIMIT ?", (split, limit)
        )
        return [LabelRow(*r) for r in rows]

    def supervised_examples(self, limit: int = 100_000) -> list[tuple[str, str]]:
        """(prompt, demonstration) rows for supervised fine-tuning of the policy."""
        return self._q("SELECT prompt, demonstration FROM demonstrations ORDER BY created_at LIMIT ?", (limit,))

    def feedback_status(self, feedback_id: str) -> str | None:
        rows = self._q("SELECT status FROM feedback WHERE feedback_id = ?", (feedback_id,))
        return rows[0][0] if rows else None

    def pending_count(self) -> int:
        return self._q("SELECT COUNT(*) FROM feedback WHERE status = 'pending'")[0][0]
