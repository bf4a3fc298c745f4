"""The sequences the engine decodes: one `Batch` per model whose forward runs them.

Normally there is one batch, on the serving model. During a hot swap's drain there are two
(the old version's answers finish in their own forwards), or one whose first rows run on the
old weights in the new model's forward (`Batch.adopt`, `flywheel.policy.mixed`).
"""

from __future__ import annotations

import dataclasses

from flywheel.policy.kvbatch import Batch, LoadedModel
from flywheel.policy.metrics import METRICS
from flywheel.policy.sequence import Sequence


@dataclasses.dataclass(frozen=True)
class BatchSnapshot:
    """One running batch: the version its forward runs, and the rows still on an older one."""

    version: int
    rows: int
    old_version: int | None = None  # rows finishing on these weights in this batch's forward (a drain)
    old_rows: int = 0


class RunningBatches:
    """The running batches by model, and the model new sequences start on.

    Owned by the scheduler thread; `serving`, `running` and `draining` are read from any thread.
    """

    def __init__(self) -> None:
        self.serving: LoadedModel | None = None  # replaced only at a switch, between two steps
        self.by_model: dict[int, Batch] = {}  # id(LoadedModel) -> its batch
        self.running = 0  # lowered as each answer finishes, so info() is exact once a caller has its result
        self.draining = False  # sequences of a previous version still run

    def __bool__(self) -> bool:
        return bool(self.by_model)

    def sequences(self) -> list[Sequence]:
        return [s for b in self.by_model.values() for s in b.seqs]

    def add(self, batch: Batch) -> None:
        """A freshly prefilled batch joins the batch of its model."""
        key = id(batch.model)
        if key in self.by_model:
            self.by_model[key].merge(batch)
        else:
            self.by_model[key] = batch

    def drop_cancelled(self) -> None:
        for batch in self.by_model.values():
            if any(s.cancelled for s in batch.seqs):
                for s in batch.seqs:
                    if s.cancelled and not s.done:
                        s.done = True
                        METRICS.requests.labels("cancelled").inc()
                batch.filter([s for s in batch.seqs if not s.cancelled])
        self.drop_empty()

    def drop_finished(self) -> None:
        for batch in self.by_model.values():
            if any(s.done for s in batch.seqs):
                batch.filter([s for s in batch.seqs if not s.done])
        self.drop_empty()

    def drop_empty(self) -> None:
        for key in [k for k, b in self.by_model.items() if not b.seqs]:
            del self.by_model[key]  # the last reference to an old model goes here
        self.running = sum(len(b.seqs) for b in self.by_model.values())
        cur = self.serving
        # Rows on another copy of the weights than the serving one, or finishing on the previous version
        # in the serving batch. Rows of another adapter on the serving weights (a GeneratePair candidate,
        # `Engine.adapter_variant`) hold no copy of the weights.
        self.draining = any(
            b.mix is not None or b.model is not cur and (cur is None or b.model.model is not cur.model)
            for b in self.by_model.values()
        )

    def clear(self) -> None:
        self.by_model.clear()
        self.running, self.draining = 0, False

    def snapshot(self) -> tuple[BatchSnapshot, ...]:
        return tuple(
            BatchSnapshot(b.model.version, len(b.seqs), b.mix.old.version, b.old_rows)
            if b.mix is not None
            else BatchSnapshot(b.model.version, len(b.seqs))
            for b in self.by_model.values()
        )
