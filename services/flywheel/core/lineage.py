"""Where a model version came from, as its manifests in the model store record it
(`flywheel models lineage`): the parent chain back to the starter, each version's reward
version, and the Kafka offset ranges it was trained on.

A policy version's manifest (trainer/checkpoints.py) names its ancestors (`extra.lineage`), the
reward version that scored its rollouts (`extra.reward_version`) and, per "topic:partition" of
its prompt source, the offsets [from, to) consumed since the checkpoint before
(`extra.offsets`). A reward version's manifest (reward/trainer.py) has the dataset cursor
(`extra.pair_seq`) and the flywheel.preferences offsets of the pairs it took in. Retention
deletes old unpromoted versions: the chain still names them (from a descendant's
`extra.lineage`), marked as deleted.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flywheel.core import errors
from flywheel.core.modelstore import Manifest, ModelStore


@dataclasses.dataclass
class Link:
    """One version of a chain; `manifest` None where retention deleted it."""

    model: str
    version: int
    manifest: Manifest | None

    @property
    def offsets(self) -> dict[str, list[int | None]]:
        return dict(self.manifest.extra.get("offsets") or {}) if self.manifest else {}

    @property
    def reward_version(self) -> int | None:
        v = self.manifest.extra.get("reward_version") if self.manifest else None
        return int(v) if v is not None and int(v) >= 0 else None

    def to_dict(self) -> dict[str, Any]:
        m = self.manifest
        out: dict[str, Any] = {"model": self.model, "version": self.version, "deleted": m is None}
        if m is not None:
            out |= {"parent": m.parent, "created_at": m.created_at, "promoted": m.promoted, "gate": m.gate}
            out |= {"kind": m.kind, "reward_version": self.reward_version, "offsets": self.offsets}
            for key in ("trainer_step", "pair_seq", "source", "starter"):
                if key in m.extra:
                    out[key] = m.extra[key]
        return out


def chain(store: ModelStore, model: str, version: int) -> list[Link]:
    """`version` and its ancestors, newest first; NotFound when `version` itself is missing."""
    links = [Link(model, version, store.get(model, version))]
    ancestors: list[int] = []  # the newest manifest's record of its ancestors, oldest first
    seen = {version}
    while True:
        last = links[-1]
        if last.manifest is not None:
            ancestors = [int(v) for v in last.manifest.extra.get("lineage", [])]
            parent = last.manifest.parent
        else:  # deleted: its place in the ancestors of the last version still there
            i = ancestors.index(last.version) if last.version in ancestors else 0
            parent = ancestors[i - 1] if i > 0 else None
        if parent is None or parent in seen:
            return links
        seen.add(parent)
        try:
            links.append(Link(model, parent, store.get(model, parent)))
        except errors.NotFound:
            links.append(Link(model, parent, None))


def lineage(store: ModelStore, model: str, version: int, reward_model: str) -> dict[str, Any]:
    """The chain of `model` `version` and each reward version it names (with its own offsets)."""
    links = chain(store, model, version)
    rewards: dict[int, dict[str, Any]] = {}
    for link in links:
        rv = link.reward_version
        if rv is not None and rv not in rewards and model != reward_model:
            try:
                rewards[rv] = Link(reward_model, rv, store.get(reward_model, rv)).to_dict()
            except errors.NotFound:
                rewards[rv] = Link(reward_model, rv, None).to_dict()
    return {"chain": [link.to_dict() for link in links], "rewards": [rewards[v] for v in sorted(rewards)]}


def ranges_text(offsets: dict[str, list[int | None]]) -> str:
    """'topic:0 [10, 42) pool [0, 64)'; '-' when none are recorded."""
    if not offsets:
        return "-"
    return " ".join(f"{key} [{'?' if lo is None else lo}, {hi})" for key, (lo, hi) in offsets.items())


def format_text(data: dict[str, Any]) -> str:
    """The human-readable `flywheel models lineage` output."""
    lines = []
    for d in [*data["chain"], *data["rewards"]]:
        head = f"{d['model']} v{d['version']}"
        if d["deleted"]:
            lines.append(f"{head} (deleted by retention; its offsets are gone with its manifest)")
            continue
        flags = []
        if d["promoted"]:
            flags.append(f"promoted ({d['gate']})" if d["gate"] else "promoted")
        elif d["gate"]:
            flags.append(f"gate: {d['gate']}")
        if d["parent"] is None:
            flags.append("starter")
        if d["reward_version"] is not None:
            flags.append(f"reward v{d['reward_version']}")
        if "pair_seq" in d:
            flags.append(f"pairs up to seq {d['pair_seq']}")
        lines.append(f"{head} {', '.join(flags)}".rstrip() + f"\n    trained on: {ranges_text(d['offsets'])}")
    return "\n".join(lines)
