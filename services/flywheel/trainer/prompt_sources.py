"""Where the trainer's prompts come from: the PromptSource protocol, a fixed pool (with its
held-out gate split) or Kafka.

A prompt source hands out prompts and keeps a consumed position that the trainer's checkpoint
saves (`position`, `seek`) and then commits (`commit`), so a restart neither repeats nor skips
work. `KafkaPrompts` reads served prompts (and demonstrations for PPO-ptx) and tops up from
the pool when traffic is thin. A take that used live prompts is a `trainer take prompts` span
linked to the trace of each answer whose prompt it took (core/tracing.py).
"""

from __future__ import annotations

import contextlib
import logging
import random
from typing import Any, Protocol

from opentelemetry import trace

from flywheel.core import errors, tracing

log = logging.getLogger(__name__)
SERVICE = "trainer"  # the tracer: the trainer service reads the prompts
MAX_LINKS = 128  # links of one take span (OpenTelemetry's default span limit)

FALLBACK_PROMPTS = [
    "how do I reset my password?",
    "where is my order?",
    "how can I get a refund?",
    "how do I bake bread?",
    "how do I change a flat tire?",
    "I need an invoice for my purchase.",
    "hello, how are you today?",
    "what can you help me with?",
]


class PromptSource(Protocol):
    """Prompts to train on, with a consumed position the trainer's checkpoint saves and commits."""

    def take(self, n: int) -> list[str]:
        """The next `n` prompts (advances the position)."""
        ...

    def demonstrations(self) -> list[tuple[str, str]]:
        """(prompt, answer) pairs users demonstrated, for PPO-ptx; empty when there are none."""
        ...

    def position(self) -> dict[str, int]:
        """The consumed position now, to save in a checkpoint."""
        ...

    def seek(self, position: dict[str, int]) -> None:
        """Continue from a saved position ({} for the beginning)."""
        ...

    def commit(self, position: dict[str, int]) -> None:
        """Record a saved position as durable (Kafka: the consumer group's offsets)."""
        ...

    def lag(self) -> int:
        """Prompts waiting upstream (-1 when unknown)."""
        ...

    def close(self) -> None: ...


def default_pool() -> list[str]:
    """The policy corpus' prompts when that module is there, else a small built-in list."""
    try:
        from flywheel.policy import corpus

        return list(corpus.prompts()) or list(FALLBACK_PROMPTS)
    except Exception:  # the policy package is optional for the trainer
        return list(FALLBACK_PROMPTS)


def split_pool(pool: list[str], n_heldout: int, seed: int) -> tuple[list[str], list[str]]:
    """(training prompts, held-out gate prompts): a seeded split keeping at least 3/4 for training.

    A pool too small to spare any (fewer than 4 prompts) is used for both, which the gate's
    verdict then cannot tell from overfitting: give a larger pool for a meaningful gate.
    """
    order = list(dict.fromkeys(pool))
    random.Random(seed).shuffle(order)
    k = min(n_heldout, len(order) // 4)
    if k == 0:
        return order, order
    return order[k:], order[:k]


class PoolPrompts:
    """PromptSource over a fixed list; its cursor is a consumed offset like a Kafka one."""

    def __init__(self, pool: list[str]) -> None:
        if not pool:
            raise errors.InvalidArgument("the prompt pool is empty: set FLYWHEEL_TRAINER_PROMPT_POOL")
        self.pool, self.cursor = list(pool), 0

    def take(self, n: int) -> list[str]:
        out = [self.pool[(self.cursor + i) % len(self.pool)] for i in range(n)]
        self.cursor += n
        return out

    def demonstrations(self) -> list[tuple[str, str]]:
        return []

    def position(self) -> dict[str, int]:
        return {"pool": self.cursor}

    def seek(self, position: dict[str, int]) -> None:
        self.cursor = int(position.get("pool", 0))

    def commit(self, position: dict[str, int]) -> None:
        pass

    def lag(self) -> int:
        return 0

    def close(self) -> None:
        pass


class KafkaPrompts(PoolPrompts):
    """Prompts of served answers (flywheel.interactions), topped up from the pool when traffic is thin.

    The partitions are assigned, not group-balanced (one trainer is active at a time): the
    trainer's checkpoint holds the offsets and is the source of truth; they are also committed
    to the consumer group after each checkpoint, for lag dashboards and a trainer with no state.
    With ptx on, demonstrations ("demonstration" PreferencePairs) are read the same way.
    """

    def __init__(
        self,
        kafka: Any,
        topic: str,
        pool: list[str],
        group: str,
        model: str,
        preferences_topic: str | None = None,
        poll_timeout_ms: int = 200,
    ) -> None:
        from kafka import KafkaConsumer, TopicPartition

        super().__init__(pool)
        self.topic, self.model, self.poll_timeout_ms = topic, model, poll_timeout_ms
        self.prefs_topic = preferences_topic
        try:
            self.consumer = KafkaConsumer(
                **kafka.client_options(), group_id=group, enable_auto_commit=False, auto_offset_reset="earliest"
            )
            tps = []
            for t in filter(None, [topic, preferences_topic]):
                parts = self.consumer.partitions_for_topic(t)
                if not parts:
                    raise errors.Unavailable(
                        f"topic {t!r} does not exist on {kafka.bootstrap!r}: create the topics first"
                    )
                tps += [TopicPartition(t, p) for p in sorted(parts)]
        except errors.FlywheelError:
            raise
        except Exception as e:
            raise errors.Unavailable(f"cannot read prompts from Kafka at {kafka.bootstrap!r}: {e}") from e
        self.tps = tps
        self.consumer.assign(tps)
        self._demos: list[tuple[str, str]] = []

    def take(self, n: int) -> list[str]:
        from kafka.errors import KafkaError

        from flywheel.v1 import events_pb2

        live: list[str] = []
        links: list[Any] = []
        try:
            batches = self.consumer.poll(timeout_ms=self.poll_timeout_ms, max_records=n)
        except KafkaError as e:  # the training loop backs off and retries the step
            raise errors.Unavailable(f"polling prompts from Kafka failed: {e!r}") from e
        for tp, msgs in batches.items():
            for msg in msgs:
                try:
                    if tp.topic == self.topic:
                        ev = events_pb2.Interaction.FromString(msg.value)
                        if ev.prompt and (not ev.model or ev.model == self.model):
                            live.append(ev.prompt)
                            context = tracing.span_context_of(msg.headers) if len(links) < MAX_LINKS else None
                            if context is not None:
                                links.append(trace.Link(context))
                    else:
                        pair = events_pb2.PreferencePair.FromString(msg.value)
                        if pair.source == "demonstration" and pair.prompt and pair.chosen:
                            self._demos = (self._demos + [(pair.prompt, pair.chosen)])[-256:]
                except Exception:  # an undecodable record is skipped, never fatal
                    continue
        if links:
            with tracing.span(SERVICE, "trainer take prompts", links=links) as span:
                span.set_attribute("flywheel.live_prompts", len(live))
        return live[:n] + (super().take(n - len(live)) if len(live) < n else [])

    def demonstrations(self) -> list[tuple[str, str]]:
        return list(self._demos)

    def position(self) -> dict[str, int]:
        pos = {f"{tp.topic}:{tp.partition}": int(self.consumer.position(tp)) for tp in self.tps}
        return {**pos, "pool": self.cursor}

    def seek(self, position: dict[str, int]) -> None:
        super().seek(position)
        for tp in self.tps:
            key = f"{tp.topic}:{tp.partition}"
            if key in position:
                self.consumer.seek(tp, int(position[key]))

    def commit(self, position: dict[str, int]) -> None:
        from kafka.structs import OffsetAndMetadata

        offsets = {
            tp: OffsetAndMetadata(int(position[f"{tp.topic}:{tp.partition}"]), "", -1)
            for tp in self.tps
            if f"{tp.topic}:{tp.partition}" in position
        }
        try:
            self.consumer.commit(offsets)
        except Exception as e:  # lag reporting only: the checkpoint holds the truth
            log.warning("committing trainer offsets failed: %s", e)

    def lag(self) -> int:
        try:
            ends = self.consumer.end_offsets([tp for tp in self.tps if tp.topic == self.topic])
            return int(sum(max(0, end - self.consumer.position(tp)) for tp, end in ends.items()))
        except Exception:
            return -1

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.consumer.close(autocommit=False)


def ptx_examples(data: str, seed: int = 0) -> list[tuple[str, str]]:
    """PPO-ptx's (prompt, answer) examples from `trainer.ptx_data` ("" : none here, users' demonstrations
    come from Kafka; "corpus": the built-in starter's training corpus; else a JSONL file)."""
    if not data:
        return []
    if data == "corpus":
        from flywheel.policy import corpus

        return [(e.prompt, e.answer) for e in corpus.generate(2000, seed)]
    import json
    from pathlib import Path

    path = Path(data).expanduser()
    if not path.is_file():
        raise errors.InvalidArgument(f"trainer.ptx_data: no file {path}; use '', 'corpus' or a JSONL file")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out.append((str(row["prompt"]), str(row["answer"])))
        except (ValueError, KeyError, TypeError) as e:
            raise errors.InvalidArgument(f"trainer.ptx_data {path} line {n}: need {{prompt, answer}} ({e})") from e
    if not out:
        raise errors.InvalidArgument(f"trainer.ptx_data {path} has no examples")
    return out
