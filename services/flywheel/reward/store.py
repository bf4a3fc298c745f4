"""The durable preference dataset: one sqlite file that the join writes and the trainer reads.

Kept apart from the join (join.py), which decides what goes in: every SQL statement lives
here, behind `PreferenceStore`'s queries (what readers such as the reward trainer, tests and
tools need) and `JoinWrites` (what the join does inside one transaction).

Feedback is keyed by (user_id, feedback_id): feedback ids are chosen by clients, so one user's id
must never shadow another's. `votes` keeps each user's first feedback of a kind on an answer (or
pair). Schema version 1 (`PRAGMA user_version`); a store from before it (feedback keyed by
feedback_id alone) is migrated once on open, in one transaction (`_migrate_to_v1`).
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

# Tables keyed by (user_id, feedback_id) since schema version 1 (`PRAGMA user_version`).
_PER_USER_TABLES = {
    "feedback": """CREATE TABLE IF NOT EXISTS feedback (
  user_id TEXT NOT NULL, feedback_id TEXT NOT NULL, interaction_id TEXT, pair_id TEXT, status TEXT NOT NULL,
  received_at REAL NOT NULL, event BLOB NOT NULL, PRIMARY KEY (user_id, feedback_id))""",
    "votes": """CREATE TABLE IF NOT EXISTS votes (
  user_id TEXT NOT NULL, kind INTEGER NOT NULL, subject TEXT NOT NULL, feedback_id TEXT NOT NULL,
  PRIMARY KEY (user_id, kind, subject))""",
    "labels": """CREATE TABLE IF NOT EXISTS labels (
  user_id TEXT NOT NULL, feedback_id TEXT NOT NULL, seq INTEGER, interaction_id TEXT, kind TEXT, prompt TEXT,
  response TEXT, label REAL NOT NULL, split TEXT NOT NULL, PRIMARY KEY (user_id, feedback_id))""",
    "demonstrations": """CREATE TABLE IF NOT EXISTS demonstrations (
  user_id TEXT NOT NULL, feedback_id TEXT NOT NULL, interaction_id TEXT, prompt TEXT, demonstration TEXT,
  created_at REAL, PRIMARY KEY (user_id, feedback_id))""",
}
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS interactions (
  interaction_id TEXT PRIMARY KEY, pair_id TEXT, side TEXT, prompt TEXT, response TEXT,
  policy_version INTEGER, user_id TEXT, created_at REAL);
CREATE INDEX IF NOT EXISTS interactions_pair ON interactions(pair_id);
{_PER_USER_TABLES["feedback"]};
CREATE INDEX IF NOT EXISTS feedback_pending ON feedback(status, interaction_id, pair_id);
{_PER_USER_TABLES["votes"]};
CREATE TABLE IF NOT EXISTS pairs (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, pair_id TEXT UNIQUE NOT NULL, split TEXT NOT NULL,
  published INTEGER NOT NULL, source TEXT, weight REAL, margin REAL, message BLOB NOT NULL,
  kafka_partition INTEGER, kafka_offset INTEGER);
CREATE INDEX IF NOT EXISTS pairs_unpublished ON pairs(seq) WHERE published = 0;
{_PER_USER_TABLES["labels"]};
CREATE INDEX IF NOT EXISTS labels_prompt ON labels(prompt, kind);
CREATE INDEX IF NOT EXISTS labels_seq ON labels(seq);
{_PER_USER_TABLES["demonstrations"]};
"""
SCHEMA_VERSION = 1
# The columns after (user_id, feedback_id) of the version 0 tables that are copied as they are.
_V0_COLUMNS = {
    "labels": "seq, interaction_id, kind, prompt, response, label, split",
    "demonstrations": "interaction_id, prompt, demonstration, created_at",
}


def subject_of(fb: events_pb2.FeedbackEvent) -> str:
    """What a piece of feedback is about: the pair for a preference, else the answer."""
    return fb.pair_id if fb.kind == events_pb2.FEEDBACK_KIND_PREFERENCE else fb.interaction_id


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

    user_id: str
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
        self._migrate_to_v1()
        self.conn.executescript(_SCHEMA)
        self._add_offset_columns()
        if self.conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:  # a write: only once
            self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self.lock = threading.RLock()

    def _migrate_to_v1(self) -> None:
        """Rebuild a version 0 store's feedback, labels and demonstrations keyed by (user_id,
        feedback_id), and record each user's first vote (by arrival), in one transaction."""
        if not self._is_v0():
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            if not self._is_v0():  # another process migrated it meanwhile
                self.conn.execute("COMMIT")
                return
            self._migrate_feedback_v0()
            for table in _V0_COLUMNS:
                self._migrate_v0_table(table)
            self.conn.execute("DROP TABLE feedback_v0")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def _add_offset_columns(self) -> None:
        """A store from before pairs knew their place on flywheel.preferences gets the two columns
        (left NULL for the pairs it has: their ranges stay unknown)."""
        have = {row[1] for row in self.conn.execute("PRAGMA table_info(pairs)")}
        for column in ("kafka_partition", "kafka_offset"):
            if column not in have:
                try:
                    self.conn.execute(f"ALTER TABLE pairs ADD COLUMN {column} INTEGER")
                except sqlite3.OperationalError as e:  # another process added it meanwhile
                    if "duplicate column" not in str(e):
                        raise

    def _is_v0(self) -> bool:
        """A feedback table without user_id: a store from before per-user feedback ids."""
        columns = [row[1] for row in self.conn.execute("PRAGMA table_info(feedback)")]
        return bool(columns) and "user_id" not in columns

    def _migrate_feedback_v0(self) -> None:
        """feedback -> feedback_v0, copied into the new table with the user_id of each event (the
        old table had no column for it), oldest first so each user's first vote is the one kept."""
        c = self.conn
        c.execute("ALTER TABLE feedback RENAME TO feedback_v0")
        c.execute(_PER_USER_TABLES["feedback"])
        c.execute(_PER_USER_TABLES["votes"])
        writes = JoinWrites(c)
        rows = c.execute(
            "SELECT feedback_id, interaction_id, pair_id, status, received_at, event FROM feedback_v0 "
            "ORDER BY received_at, rowid"
        )
        for fid, iid, pair_id, status, received_at, blob in rows.fetchall():
            fb = events_pb2.FeedbackEvent.FromString(blob)
            c.execute(
                "INSERT INTO feedback VALUES (?,?,?,?,?,?,?)",
                (fb.user_id, fid, iid, pair_id, status, received_at, blob),
            )
            writes.claim_vote(fb)

    def _migrate_v0_table(self, table: str) -> None:
        """A version 0 labels or demonstrations table rebuilt with the user of each row's feedback
        (a feedback_id was unique in a version 0 store). Its old indexes go with the old table."""
        c, rest = self.conn, _V0_COLUMNS[table]
        if not c.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone():
            return  # the schema creates it
        c.execute(f"ALTER TABLE {table} RENAME TO {table}_v0")
        c.execute(_PER_USER_TABLES[table])
        user = "COALESCE((SELECT f.user_id FROM feedback f WHERE f.feedback_id = t.feedback_id LIMIT 1), '')"
        c.execute(
            f"INSERT INTO {table} (user_id, feedback_id, {rest}) SELECT {user}, t.feedback_id, {rest} FROM {table}_v0 t"
        )
        c.execute(f"DROP TABLE {table}_v0")

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

    def set_pair_offsets(self, places: Sequence[tuple[str, int, int]]) -> None:
        """Record (pair_id, partition, offset) of pairs on flywheel.preferences; a pair keeps its
        first place (a copy sent again after a crash lands later)."""
        if not places:
            return
        with self.lock:
            self.conn.executemany(
                "UPDATE pairs SET kafka_partition = ?, kafka_offset = ? WHERE pair_id = ? AND kafka_offset IS NULL",
                [(partition, offset, pair_id) for pair_id, partition, offset in places],
            )

    def offset_ranges(self, after_seq: int, upto_seq: int, split: str = "train") -> dict[int, tuple[int, int, int]]:
        """partition -> (lowest offset, highest offset + 1, pairs) of the pairs of `split` with
        after_seq < seq <= upto_seq whose place on flywheel.preferences is known."""
        rows = self._q(
            "SELECT kafka_partition, MIN(kafka_offset), MAX(kafka_offset), COUNT(*) FROM pairs "
            "WHERE seq > ? AND seq <= ? AND split = ? AND kafka_offset IS NOT NULL GROUP BY kafka_partition",
            (after_seq, upto_seq, split),
        )
        return {int(p): (int(lo), int(hi) + 1, int(n)) for p, lo, hi, n in rows}

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

    def feedback_status(self, feedback_id: str, user_id: str = "") -> str | None:
        """pending, joined, invalid, orphaned or repeated_vote; None when this user's id is unknown."""
        rows = self._q("SELECT status FROM feedback WHERE user_id = ? AND feedback_id = ?", (user_id, feedback_id))
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
        """Store a feedback event as pending, once (by user_id and feedback_id); False if it was already there."""
        cur = self.conn.execute(
            "INSERT OR IGNORE INTO feedback VALUES (?,?,?,?,?,?,?)",
            (
                fb.user_id,
                fb.feedback_id,
                fb.interaction_id,
                fb.pair_id,
                "pending",
                time.time(),
                fb.SerializeToString(),
            ),
        )
        return cur.rowcount > 0

    def claim_vote(self, fb: events_pb2.FeedbackEvent) -> bool:
        """Record fb as its user's vote of its kind on its answer (or pair); False when the user
        already has one under another feedback_id (the first stays). Feedback without a user or a
        subject names no vote: always True."""
        subject = subject_of(fb)
        if not fb.user_id or not subject:
            return True
        self.conn.execute(
            "INSERT OR IGNORE INTO votes VALUES (?,?,?,?)", (fb.user_id, int(fb.kind), subject, fb.feedback_id)
        )
        row = self.conn.execute(
            "SELECT feedback_id FROM votes WHERE user_id = ? AND kind = ? AND subject = ?",
            (fb.user_id, int(fb.kind), subject),
        ).fetchone()
        return bool(row[0] == fb.feedback_id)

    def pending_feedback_for(self, interaction_id: str, pair_id: str) -> list[events_pb2.FeedbackEvent]:
        """Pending feedback on this interaction or on its pair."""
        rows = self.conn.execute(
            "SELECT event FROM feedback WHERE status = 'pending' AND (interaction_id = ? OR (pair_id != '' AND pair_id = ?))",
            (interaction_id, pair_id),
        ).fetchall()
        return [events_pb2.FeedbackEvent.FromString(blob) for (blob,) in rows]

    def set_feedback_status(self, fb: events_pb2.FeedbackEvent, status: str) -> None:
        self.conn.execute(
            "UPDATE feedback SET status = ? WHERE user_id = ? AND feedback_id = ?", (status, fb.user_id, fb.feedback_id)
        )

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
            "SELECT user_id, feedback_id, interaction_id, response, label FROM labels WHERE prompt = ? AND kind = ? "
            "AND interaction_id != ? AND response != ? AND label != ? ORDER BY seq DESC LIMIT ?",
            (prompt, kind, interaction_id, response, label, limit),
        ).fetchall()
        return [LabelPartner(*r) for r in rows]

    def insert_label(
        self, fb: events_pb2.FeedbackEvent, it: StoredInteraction, kind: str, label: float, split: str
    ) -> None:
        seq = self.conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM labels").fetchone()[0]
        self.conn.execute(
            "INSERT OR IGNORE INTO labels VALUES (?,?,?,?,?,?,?,?,?)",
            (fb.user_id, fb.feedback_id, seq, it.interaction_id, kind, it.prompt, it.response, label, split),
        )

    def insert_demonstration(self, fb: events_pb2.FeedbackEvent, it: StoredInteraction, demonstration: str) -> None:
        self.conn.execute(
            "INSERT OR IGNORE INTO demonstrations VALUES (?,?,?,?,?,?)",
            (fb.user_id, fb.feedback_id, it.interaction_id, it.prompt, demonstration, time.time()),
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
