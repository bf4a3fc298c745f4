"""The preference join: each feedback kind -> its pairs, duplicates, orphans, restart."""

from __future__ import annotations

import pytest

from flywheel.reward.config import JoinConfig
from flywheel.reward.join import PreferenceJoin
from flywheel.reward.store import JoinWrites, PreferenceStore
from flywheel.v1 import events_pb2 as ev


def interaction(iid: str, prompt: str = "q", response: str = "", pair: str = "", side: str = "", v: int = 1):
    return ev.Interaction(
        interaction_id=iid,
        prompt=prompt,
        response=response or f"answer {iid}",
        pair_id=pair,
        pair_side=side,
        policy_version=v,
    )


def fb(fid: str, kind: int, iid: str = "", pair: str = "", **kw) -> ev.FeedbackEvent:
    return ev.FeedbackEvent(feedback_id=fid, kind=kind, interaction_id=iid, pair_id=pair, **kw)


class Harness:
    def __init__(self, path, **cfg) -> None:
        self.published: list[ev.PreferencePair] = []
        self.store = PreferenceStore(path / "join.sqlite")
        self.join = PreferenceJoin(JoinConfig(**cfg), self.store, self.published.extend)

    def apply(self, *msgs) -> None:
        for m in msgs:
            if isinstance(m, ev.Interaction):
                self.join.on_interaction(m)
            else:
                self.join.on_feedback(m)
            self.join.flush()

    def pairs(self):
        return self.store.pairs_after(0, split=None)


@pytest.fixture
def h(tmp_path) -> Harness:
    return Harness(tmp_path, heldout_percent=0)


def test_preference_makes_one_pair_chosen_by_side(h: Harness) -> None:
    h.apply(
        interaction("a", pair="P", side="A"),
        interaction("b", pair="P", side="B"),
        fb("f1", ev.FEEDBACK_KIND_PREFERENCE, pair="P", preference=ev.PREFERENCE_B),
    )
    (p,) = h.pairs()
    assert (p.chosen, p.rejected, p.weight, p.source) == ("answer b", "answer a", 1.0, "preference")
    (msg,) = h.published
    assert msg.chosen_interaction_id == "b" and msg.rejected_interaction_id == "a" and msg.pair_id == p.pair_id
    assert list(msg.source_feedback_ids) == ["f1"]


def test_tie_makes_two_half_weight_pairs_each_way(h: Harness) -> None:
    h.apply(
        interaction("a", pair="P", side="A"),
        interaction("b", pair="P", side="B"),
        fb("f1", ev.FEEDBACK_KIND_PREFERENCE, pair="P", preference=ev.PREFERENCE_TIE),
    )
    got = sorted((p.chosen, p.rejected, p.weight, p.source) for p in h.pairs())
    assert got == [("answer a", "answer b", 0.5, "tie"), ("answer b", "answer a", 0.5, "tie")]


def test_thumbs_make_labels_and_lower_weight_pairs_on_the_same_prompt(h: Harness) -> None:
    h.apply(
        interaction("a", "q"),
        interaction("b", "q"),
        interaction("c", "other"),
        fb("f1", ev.FEEDBACK_KIND_THUMBS, "a", value=1),
        fb("f2", ev.FEEDBACK_KIND_THUMBS, "c", value=-1),
    )
    assert h.pairs() == []  # different prompts do not pair
    h.apply(fb("f3", ev.FEEDBACK_KIND_THUMBS, "b", value=-1), fb("f4", ev.FEEDBACK_KIND_THUMBS, "b", value=-1))
    got = [(p.chosen, p.rejected, p.weight, p.source) for p in h.pairs()]
    assert got == [("answer a", "answer b", 0.5, "thumbs")] * 2  # f4 is a second user's 'down' on b: more evidence
    assert len({p.pair_id for p in h.pairs()}) == 2
    labels = sorted((x.response, x.label) for x in h.store.labels())
    assert labels == [("answer a", 1.0), ("answer b", 0.0), ("answer b", 0.0), ("answer c", 0.0)]


def test_ratings_make_pairs_with_a_margin_from_the_gap(h: Harness) -> None:
    h.apply(
        interaction("a"),
        interaction("b"),
        interaction("c"),
        fb("f1", ev.FEEDBACK_KIND_RATING, "a", value=1, rating_scale=3),
        fb("f2", ev.FEEDBACK_KIND_RATING, "b", value=3, rating_scale=3),
        fb("f3", ev.FEEDBACK_KIND_RATING, "c", value=2, rating_scale=3),
    )
    got = sorted((p.chosen, p.rejected, p.margin) for p in h.pairs())
    assert got == [("answer b", "answer a", 1.0), ("answer b", "answer c", 0.5), ("answer c", "answer a", 0.5)]
    assert all(p.weight == 0.5 and p.source == "rating" for p in h.pairs())
    assert sorted(x.label for x in h.store.labels()) == [0.0, 0.5, 1.0]


def test_demonstration_makes_a_pair_and_a_supervised_example(h: Harness) -> None:
    h.apply(interaction("a", "q", "meh"), fb("f1", ev.FEEDBACK_KIND_DEMONSTRATION, "a", demonstration="great"))
    (p,) = h.pairs()
    assert (p.prompt, p.chosen, p.rejected, p.source) == ("q", "great", "meh", "demonstration")
    assert h.published[0].chosen_interaction_id == "" and h.published[0].rejected_interaction_id == "a"
    assert h.store.supervised_examples() == [("q", "great")]


def test_invalid_feedback_is_dropped_not_joined(h: Harness) -> None:
    h.apply(
        interaction("a"),
        fb("f1", ev.FEEDBACK_KIND_THUMBS, "a", value=5),
        fb("f2", ev.FEEDBACK_KIND_RATING, "a", value=4, rating_scale=3),
    )
    assert h.pairs() == [] and h.store.labels() == []
    assert h.store.feedback_status("f1") == h.store.feedback_status("f2") == "invalid"


def test_a_preference_outside_the_enum_is_invalid_not_a_vote_for_b(h: Harness) -> None:
    h.apply(
        interaction("a", pair="P", side="A"),
        interaction("b", pair="P", side="B"),
        fb("f1", ev.FEEDBACK_KIND_PREFERENCE, pair="P", preference=7),  # a forged record: open enums take any number
    )
    assert h.pairs() == []
    assert h.store.feedback_status("f1") == "invalid"


def test_duplicates_change_nothing(h: Harness) -> None:
    msgs = [
        interaction("a", pair="P", side="A"),
        interaction("b", pair="P", side="B"),
        fb("f1", ev.FEEDBACK_KIND_PREFERENCE, pair="P", preference=ev.PREFERENCE_A),
        interaction("c"),
        interaction("d"),
        fb("f2", ev.FEEDBACK_KIND_THUMBS, "c", value=1),
        fb("f3", ev.FEEDBACK_KIND_THUMBS, "d", value=-1),
    ]
    h.apply(*msgs)
    before = [(p.pair_id, p.seq) for p in h.pairs()]
    assert len(before) == 2 and len(h.published) == 2
    h.apply(*msgs, *msgs)  # redelivery
    assert [(p.pair_id, p.seq) for p in h.pairs()] == before and len(h.published) == 2
    assert len(h.store.labels()) == 2


def test_feedback_before_its_interaction_waits_then_joins_or_expires(h: Harness) -> None:
    h.apply(
        fb("f1", ev.FEEDBACK_KIND_PREFERENCE, pair="P", preference=ev.PREFERENCE_A),
        fb("f2", ev.FEEDBACK_KIND_DEMONSTRATION, "x", demonstration="better"),
        interaction("a", pair="P", side="A"),
    )
    assert h.pairs() == [] and h.store.pending_count() == 2
    h.apply(interaction("b", pair="P", side="B"))  # the pair is complete: f1 joins
    assert [p.source for p in h.pairs()] == ["preference"] and h.store.pending_count() == 1
    assert h.join.expire() == 0  # not waited long enough yet
    import time

    assert h.join.expire(now=time.time() + 301) == 1  # orphan_wait_s = 300 by default
    assert h.store.feedback_status("f2") == "orphaned"
    h.apply(interaction("x"))  # too late: an expired orphan stays dropped
    assert [p.source for p in h.pairs()] == ["preference"]


def test_restart_keeps_state_and_republishes_unacknowledged_pairs(tmp_path) -> None:
    h1 = Harness(tmp_path, heldout_percent=0)
    h1.join.publish = None  # Kafka down: pairs are stored but not acknowledged
    h1.apply(
        interaction("a", pair="P", side="A"),
        fb("f1", ev.FEEDBACK_KIND_PREFERENCE, pair="P", preference=ev.PREFERENCE_A),
    )
    h1.apply(interaction("b", pair="P", side="B"))
    assert len(h1.pairs()) == 1 and h1.published == []
    h1.store.close()
    h2 = Harness(tmp_path, heldout_percent=0)  # restart on the same file
    assert h2.join.flush() == 1 and len(h2.published) == 1
    h2.apply(
        interaction("b", pair="P", side="B"),
        fb("f1", ev.FEEDBACK_KIND_PREFERENCE, pair="P", preference=ev.PREFERENCE_A),
    )
    assert len(h2.pairs()) == 1 and len(h2.published) == 1


def test_heldout_split_is_deterministic_and_near_the_configured_share(tmp_path) -> None:
    h = Harness(tmp_path, heldout_percent=10)
    for i in range(400):
        h.apply(
            interaction(f"{i}a", pair=f"P{i}", side="A"),
            interaction(f"{i}b", pair=f"P{i}", side="B"),
            fb(f"f{i}", ev.FEEDBACK_KIND_PREFERENCE, pair=f"P{i}", preference=ev.PREFERENCE_A),
        )
    held = h.store.count_pairs("heldout")
    assert 20 <= held <= 60 and h.store.count_pairs("train") == 400 - held
    h2 = Harness(tmp_path / "again", heldout_percent=10)
    for i in range(400):
        h2.apply(
            interaction(f"{i}a", pair=f"P{i}", side="A"),
            interaction(f"{i}b", pair=f"P{i}", side="B"),
            fb(f"f{i}", ev.FEEDBACK_KIND_PREFERENCE, pair=f"P{i}", preference=ev.PREFERENCE_A),
        )
    assert [p.pair_id for p in h2.store.pairs_after(0, "heldout")] == [
        p.pair_id for p in h.store.pairs_after(0, "heldout")
    ]


# ---------------------------------------------------------------------- a poll at a time
def poll(*msgs) -> list:
    from flywheel.core import bus

    return [bus.Record("t", 0, i, None, m, {}, 0) for i, m in enumerate(msgs)]


def preferences(n: int, start: int = 0) -> list:
    out = []
    for i in range(start, start + n):
        out += [interaction(f"{i}a", pair=f"P{i}", side="A"), interaction(f"{i}b", pair=f"P{i}", side="B")]
        out.append(fb(f"f{i}", ev.FEEDBACK_KIND_PREFERENCE, pair=f"P{i}", preference=ev.PREFERENCE_A))
    return out


def test_a_poll_is_one_transaction_and_one_publish(h: Harness) -> None:
    calls: list[list] = []
    h.join.publish = calls.append
    statements: list[str] = []
    h.store.conn.set_trace_callback(statements.append)
    h.join.handle_batch(poll(*preferences(40)))
    assert [len(c) for c in calls] == [40]  # every pair of the poll in one publish call
    assert statements.count("COMMIT") == 2  # the poll's effects, then the pairs marked published
    assert h.store.count_pairs() == 40 and h.store.unpublished_pairs() == []
    h.join.handle_batch(poll(*preferences(40)))  # the poll redelivered: nothing new, nothing sent
    assert len(calls) == 1 and h.store.count_pairs() == 40


def test_a_poll_joins_like_the_same_records_one_at_a_time(tmp_path) -> None:
    msgs = preferences(5) + [
        interaction("c", "q2"),
        interaction("d", "q2"),
        fb("t1", ev.FEEDBACK_KIND_THUMBS, "c", value=1),
        fb("t2", ev.FEEDBACK_KIND_THUMBS, "d", value=-1),
        fb("late", ev.FEEDBACK_KIND_PREFERENCE, pair="L", preference=ev.PREFERENCE_B),  # before its interactions
        interaction("la", pair="L", side="A"),
        interaction("lb", pair="L", side="B"),
    ]
    one, many = Harness(tmp_path / "one"), Harness(tmp_path / "many")
    one.apply(*msgs)
    many.join.handle_batch(poll(*msgs))
    key = lambda h: [(p.pair_id, p.chosen, p.rejected, p.weight, p.split) for p in h.pairs()]  # noqa: E731
    assert key(many) == key(one) and len(key(one)) == 7
    assert sorted(p.pair_id for p in many.published) == sorted(p.pair_id for p in one.published)


def test_a_failing_record_rolls_back_its_whole_poll(h: Harness, monkeypatch) -> None:
    real = JoinWrites.insert_feedback

    def fails_on_f3(tx: JoinWrites, event: ev.FeedbackEvent) -> bool:
        if event.feedback_id == "f3":
            raise RuntimeError("boom")
        return real(tx, event)

    monkeypatch.setattr(JoinWrites, "insert_feedback", fails_on_f3)
    with pytest.raises(RuntimeError):
        h.join.handle_batch(poll(*preferences(5)))
    assert h.store.count_interactions() == 0 and h.pairs() == [] and h.published == []
    monkeypatch.undo()
    h.join.handle_batch(poll(*preferences(5)))  # redone (record by record by the consumer, or as a poll)
    assert len(h.pairs()) == 5 and len(h.published) == 5


def test_pairs_whose_publish_failed_are_sent_again_as_the_same_bytes(h: Harness) -> None:
    sent: list[list[bytes]] = []

    def kafka_down_once(pairs) -> None:
        sent.append([p.SerializeToString() for p in pairs])
        if len(sent) == 1:
            raise ConnectionError("Kafka did not acknowledge")

    h.join.publish = kafka_down_once
    with pytest.raises(ConnectionError):
        h.join.handle_batch(poll(*preferences(3)))
    assert len(h.pairs()) == 3  # durable before the publish; the consumer does not commit the poll
    h.join.handle_batch(poll(*preferences(3)))  # redelivered
    assert len(sent) == 2 and sent[1] == sent[0] and len(h.pairs()) == 3


def test_concurrent_flushes_send_each_pair_once(h: Harness) -> None:
    import threading
    import time

    h.join.publish = None
    h.join.handle_batch(poll(*preferences(10)))  # stored, not sent
    sent: list[str] = []

    def slow(pairs) -> None:
        time.sleep(0.2)
        sent.extend(p.pair_id for p in pairs)

    h.join.publish = slow
    threads = [threading.Thread(target=h.join.flush) for _ in range(3)]  # start-up flush vs the consumer's
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(sent) == 10 and len(set(sent)) == 10


# ---------------------------------------------------------------------- one vote per user, per-user ids
def duplicates(reason: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("flywheel_reward_feedback_duplicates_total", {"reason": reason}) or 0.0


def test_a_users_second_thumbs_on_an_answer_is_ignored_and_counted(h: Harness) -> None:
    """First wins: alice's second thumbs on answer b (another feedback_id, another value) reached the
    topic by some other route than the feedback service; it makes no label and no pair."""
    before = duplicates("repeated_vote")
    h.apply(
        interaction("a", "q"),
        interaction("b", "q"),
        fb("f1", ev.FEEDBACK_KIND_THUMBS, "a", value=1, user_id="bob"),
        fb("f2", ev.FEEDBACK_KIND_THUMBS, "b", value=-1, user_id="alice"),
        fb("f3", ev.FEEDBACK_KIND_THUMBS, "b", value=1, user_id="alice"),  # her second vote on b
        fb("f4", ev.FEEDBACK_KIND_RATING, "b", value=1, rating_scale=3, user_id="alice"),  # another kind: counts
    )
    assert sorted((x.response, x.label) for x in h.store.labels()) == [
        ("answer a", 1.0),
        ("answer b", 0.0),
        ("answer b", 0.0),
    ]
    assert [(p.chosen, p.rejected, p.source) for p in h.pairs()] == [("answer a", "answer b", "thumbs")]
    assert h.store.feedback_status("f3", "alice") == "repeated_vote"
    assert h.store.feedback_status("f2", "alice") == h.store.feedback_status("f4", "alice") == "joined"
    assert duplicates("repeated_vote") == before + 1
    before_redelivered = duplicates("redelivered")
    h.apply(fb("f2", ev.FEEDBACK_KIND_THUMBS, "b", value=-1, user_id="alice"))  # redelivered: a duplicate too
    assert duplicates("redelivered") == before_redelivered + 1 and len(h.store.labels()) == 3


def test_a_users_second_preference_on_a_pair_is_ignored(h: Harness) -> None:
    h.apply(
        interaction("a", pair="P", side="A"),
        interaction("b", pair="P", side="B"),
        fb("f1", ev.FEEDBACK_KIND_PREFERENCE, pair="P", preference=ev.PREFERENCE_A, user_id="alice"),
        fb("f2", ev.FEEDBACK_KIND_PREFERENCE, pair="P", preference=ev.PREFERENCE_B, user_id="alice"),
        fb("f3", ev.FEEDBACK_KIND_PREFERENCE, pair="P", preference=ev.PREFERENCE_B, user_id="bob"),
    )
    assert sorted((p.chosen, p.source) for p in h.pairs()) == [("answer a", "preference"), ("answer b", "preference")]
    assert h.store.feedback_status("f2", "alice") == "repeated_vote"


def test_a_repeated_vote_waiting_for_its_interaction_is_ignored_too(h: Harness) -> None:
    h.apply(
        fb("f1", ev.FEEDBACK_KIND_DEMONSTRATION, "x", demonstration="better", user_id="alice"),
        fb("f2", ev.FEEDBACK_KIND_DEMONSTRATION, "x", demonstration="best", user_id="alice"),
        interaction("x", "q", "meh"),
    )
    assert h.store.supervised_examples() == [("q", "better")] and len(h.pairs()) == 1
    assert h.store.pending_count() == 0 and h.store.feedback_status("f2", "alice") == "repeated_vote"


def test_one_users_feedback_id_never_shadows_anothers(h: Harness) -> None:
    """feedback_ids are chosen by clients: mallory sending "f1" first must not drop alice's "f1"."""
    h.apply(
        interaction("a", pair="P", side="A"),
        interaction("b", pair="P", side="B"),
        interaction("c", "q"),
        fb("f1", ev.FEEDBACK_KIND_PREFERENCE, pair="P", preference=ev.PREFERENCE_A, user_id="mallory"),
        fb("f1", ev.FEEDBACK_KIND_PREFERENCE, pair="P", preference=ev.PREFERENCE_A, user_id="alice"),
        fb("f2", ev.FEEDBACK_KIND_THUMBS, "c", value=1, user_id="mallory"),
        fb("f2", ev.FEEDBACK_KIND_THUMBS, "c", value=1, user_id="alice"),
    )
    pairs = h.pairs()
    assert [(p.chosen, p.rejected) for p in pairs] == [("answer a", "answer b")] * 2  # two users' choices
    assert len({p.pair_id for p in pairs}) == 2 and [list(m.source_feedback_ids) for m in h.published] == [["f1"]] * 2
    assert len(h.store.labels()) == 2
    assert h.store.feedback_status("f1", "alice") == h.store.feedback_status("f1", "mallory") == "joined"


V0_SCHEMA = """
CREATE TABLE interactions (
  interaction_id TEXT PRIMARY KEY, pair_id TEXT, side TEXT, prompt TEXT, response TEXT,
  policy_version INTEGER, user_id TEXT, created_at REAL);
CREATE INDEX interactions_pair ON interactions(pair_id);
CREATE TABLE feedback (
  feedback_id TEXT PRIMARY KEY, interaction_id TEXT, pair_id TEXT, status TEXT NOT NULL,
  received_at REAL NOT NULL, event BLOB NOT NULL);
CREATE INDEX feedback_pending ON feedback(status, interaction_id, pair_id);
CREATE TABLE pairs (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, pair_id TEXT UNIQUE NOT NULL, split TEXT NOT NULL,
  published INTEGER NOT NULL, source TEXT, weight REAL, margin REAL, message BLOB NOT NULL);
CREATE TABLE labels (
  feedback_id TEXT PRIMARY KEY, seq INTEGER, interaction_id TEXT, kind TEXT, prompt TEXT, response TEXT,
  label REAL NOT NULL, split TEXT NOT NULL);
CREATE INDEX labels_prompt ON labels(prompt, kind);
CREATE INDEX labels_seq ON labels(seq);
CREATE TABLE demonstrations (
  feedback_id TEXT PRIMARY KEY, interaction_id TEXT, prompt TEXT, demonstration TEXT, created_at REAL);
"""


def test_a_store_from_before_per_user_ids_is_migrated_on_open(tmp_path) -> None:
    """A version 0 store (feedback keyed by feedback_id alone) keeps its feedback, labels and
    demonstrations under each event's user; its votes hold; a second open changes nothing."""
    import sqlite3

    db = tmp_path / "join.sqlite"
    conn = sqlite3.connect(db)
    conn.executescript(V0_SCHEMA)
    thumbs = fb("f1", ev.FEEDBACK_KIND_THUMBS, "a", value=1, user_id="alice")
    demo = fb("f2", ev.FEEDBACK_KIND_DEMONSTRATION, "a", demonstration="great", user_id="bob")
    waiting = fb("f3", ev.FEEDBACK_KIND_THUMBS, "z", value=-1, user_id="carol")
    rows = [("f1", "a", "", "joined", 1.0, thumbs), ("f2", "a", "", "joined", 2.0, demo)]
    rows.append(("f3", "z", "", "pending", 3.0, waiting))
    conn.executemany("INSERT INTO feedback VALUES (?,?,?,?,?,?)", [(*r[:5], r[5].SerializeToString()) for r in rows])
    conn.execute("INSERT INTO interactions VALUES ('a','','','q','meh',1,'alice',1.0)")
    conn.execute("INSERT INTO labels VALUES ('f1', 1, 'a', 'thumbs', 'q', 'meh', 1.0, 'train')")
    conn.execute("INSERT INTO demonstrations VALUES ('f2', 'a', 'q', 'great', 2.0)")
    conn.commit()
    conn.close()

    h = Harness(tmp_path, heldout_percent=0)
    assert h.store.conn.execute("PRAGMA user_version").fetchone()[0] == 1
    assert h.store.feedback_status("f1", "alice") == "joined" and h.store.feedback_status("f3", "carol") == "pending"
    assert h.store.feedback_status("f1", "bob") is None
    assert [(x.response, x.label) for x in h.store.labels()] == [("meh", 1.0)]
    assert h.store.supervised_examples() == [("q", "great")]
    h.apply(
        fb("f1", ev.FEEDBACK_KIND_THUMBS, "a", value=1, user_id="alice"),  # redelivered: nothing new
        fb("f9", ev.FEEDBACK_KIND_THUMBS, "a", value=-1, user_id="alice"),  # her second vote: ignored
        fb("f1", ev.FEEDBACK_KIND_THUMBS, "a", value=-1, user_id="dave"),  # another user's "f1": counts
        interaction("z", "q", "other"),  # carol's pending thumbs joins, against alice's and dave's labels
    )
    assert h.store.feedback_status("f9", "alice") == "repeated_vote"
    assert sorted((x.response, x.label) for x in h.store.labels()) == [("meh", 0.0), ("meh", 1.0), ("other", 0.0)]
    assert [(p.chosen, p.rejected) for p in h.pairs()] == [("meh", "other")]
    h.store.close()
    again = PreferenceStore(tmp_path / "join.sqlite")  # already migrated: opens as it is
    assert len(again.labels()) == 3 and again.feedback_status("f3", "carol") == "joined"
    again.close()
