"""Lineage on a real ModelStore: the trainer's checkpoints record the offset ranges they trained
on, the reward trainer records its pairs' flywheel.preferences offsets, and `flywheel models
lineage` walks the chain back to the starter, past versions retention deleted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flywheel import cli
from flywheel.core.lineage import chain, format_text, lineage
from flywheel.core.modelstore import ModelStore
from flywheel.reward.config import RewardModelConfig, TrainConfig
from flywheel.reward.store import PreferenceStore
from flywheel.reward.trainer import OnlineTrainer
from flywheel.testing import tiny_policy, tiny_reward_model
from flywheel.trainer.config import TrainerConfig
from flywheel.trainer.loop import build_trainer
from flywheel.trainer.prompt_sources import FALLBACK_PROMPTS, PoolPrompts
from flywheel.v1 import events_pb2

pytestmark = pytest.mark.timeout(180)


class ConstantReward:
    version = 3  # the reward version the checkpoints name

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [0.5] * len(prompts)


def test_checkpoints_record_contiguous_offset_ranges_and_the_cli_prints_the_chain(tmp_path: Path, capsys) -> None:
    torch.set_num_threads(1)
    cfg = TrainerConfig(
        init_path=str(tiny_policy(tmp_path / "init")),
        algo="ppo",
        group_size=1,
        batch_size=4,
        max_new_tokens=4,
        prompt_source="pool",
        gate_prompts=4,
        checkpoint_every=1000,
        reward_norm="none",
    )
    store = ModelStore(tmp_path / "store")
    t = build_trainer(cfg, store, ConstantReward(), PoolPrompts(FALLBACK_PROMPTS), FALLBACK_PROMPTS)
    t.setup()
    versions = []
    for steps in (2, 1, 1):
        for _ in range(steps):
            t.train_step()
        versions.append(t.checkpoint().version)
    ms = [store.get("policy", v) for v in versions]
    ranges = [m.extra["offsets"]["pool"] for m in ms]
    assert ranges[0][0] == 0 and ranges[0][1] > 0
    assert ranges[1][0] == ranges[0][1] and ranges[2][0] == ranges[1][1]  # each starts where the last ended
    assert ranges[1][1] - ranges[1][0] == ranges[2][1] - ranges[2][0] == (ranges[0][1] - ranges[0][0]) // 2
    assert all(m.extra["reward_version"] == 3 for m in ms)

    links = chain(store, "policy", versions[-1])
    assert [link.version for link in links] == [versions[2], versions[1], versions[0], 0]
    assert cli.main(["models", "--store", str(store.root), "lineage", "policy", str(versions[-1]), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["version"] for d in data["chain"]] == [versions[2], versions[1], versions[0], 0]
    assert data["chain"][0]["offsets"] == {"pool": ranges[2]} and data["chain"][-1]["parent"] is None
    assert [d["version"] for d in data["rewards"]] == [3] and data["rewards"][0]["deleted"]  # no reward model here
    assert cli.main(["models", "lineage", "--store", str(store.root), "policy", str(versions[-1])]) == 0
    text = capsys.readouterr().out
    assert f"policy v{versions[2]} " in text and f"pool [{ranges[2][0]}, {ranges[2][1]})" in text
    assert "reward v3 (deleted by retention" in text and "starter" in text


def test_a_version_retention_deleted_stays_in_the_chain(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")

    def publish(v: int, parent: int | None, lineage_: list[int], offsets: dict) -> None:
        extra = {"lineage": lineage_, "offsets": offsets, "reward_version": 1}
        store.publish("policy", lambda d: (d / "w").write_text(str(v)), parent=parent, version=v, extra=extra)

    publish(0, None, [], {})
    publish(1, 0, [0], {"t:0": [0, 5]})
    publish(2, 1, [0, 1], {"t:0": [5, 9]})
    publish(3, 2, [0, 1, 2], {"t:0": [9, 12]})
    store.mark_promoted("policy", 3)
    assert store.retain("policy", keep_last=1) == [1, 2]
    data = lineage(store, "policy", 3, "reward")
    assert [(d["version"], d["deleted"]) for d in data["chain"]] == [(3, False), (2, True), (1, True), (0, False)]
    text = format_text(data)
    assert "policy v3 promoted (gate), reward v1\n    trained on: t:0 [9, 12)" in text
    assert "policy v2 (deleted by retention" in text
    with pytest.raises(Exception, match="policy version 9 is not in the model store"):
        lineage(store, "policy", 9, "reward")


def pair(i: int) -> events_pb2.PreferencePair:
    return events_pb2.PreferencePair(
        pair_id=f"p{i}", prompt=f"prompt {i}", chosen=f"good answer {i}", rejected=f"bad {i}", weight=1.0
    )


def test_reward_versions_record_the_preferences_offsets_of_their_new_pairs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    store = ModelStore(tmp_path / "store")
    store.publish("reward", lambda d: tiny_reward_model(d), parent=None, version=0, extra={"pair_seq": 0})
    dataset = PreferenceStore(tmp_path / "join.sqlite")

    def arrive(ids: range, first_offset: int) -> None:
        with dataset.transaction() as tx:
            for i in ids:
                tx.insert_pair(pair(i), "train", published=True)
        dataset.set_pair_offsets([(f"p{i}", 0, first_offset + k) for k, i in enumerate(ids)])

    train = TrainConfig(min_pairs=1, batch_size=4, max_steps_per_round=2, publish_every_steps=1000)
    rt = OnlineTrainer(train, RewardModelConfig(max_length=32), store, dataset, None, "t.flywheel.preferences")
    rt.resume()
    arrive(range(0, 6), first_offset=100)
    dataset.set_pair_offsets([("p0", 0, 999)])  # a copy sent again later keeps the first place
    assert rt.run_round()
    arrive(range(6, 9), first_offset=106)
    assert rt.run_round()
    first, second = (store.get("reward", v) for v in (1, 2))
    assert first.extra["offsets"] == {"t.flywheel.preferences:0": [100, 106]} and first.extra["pair_seq"] == 6
    assert second.extra["offsets"] == {"t.flywheel.preferences:0": [106, 109]} and second.parent == 1
    data = lineage(store, "reward", 2, "reward")
    assert [d["version"] for d in data["chain"]] == [2, 1, 0] and data["rewards"] == []
    dataset.close()


@pytest.mark.kafka
def test_checkpoints_record_the_interactions_offsets_the_trainer_consumed(
    tmp_path: Path, kafka_bootstrap: str, topics_config
) -> None:
    from flywheel.core import bus
    from flywheel.core.config import KafkaConfig
    from flywheel.trainer.prompt_sources import KafkaPrompts

    torch.set_num_threads(1)
    kafka = KafkaConfig(bootstrap=kafka_bootstrap)
    bus.ensure_topics(kafka, topics_config)
    producer = bus.Producer(kafka)
    for i in range(6):
        it = events_pb2.Interaction(interaction_id=f"i{i}", prompt=f"how do I do thing {i}?", model="policy")
        producer.send_sync(topics_config.interactions, it.interaction_id, it)
    producer.close()
    cfg = TrainerConfig(
        init_path=str(tiny_policy(tmp_path / "init")),
        algo="ppo",
        group_size=1,
        batch_size=4,
        max_new_tokens=4,
        prompt_source="kafka",
        gate_prompts=4,
        checkpoint_every=1000,
        reward_norm="none",
        poll_timeout_ms=2000,
    )
    prompts = KafkaPrompts(kafka, topics_config.interactions, FALLBACK_PROMPTS, "lineage-test", "policy")
    t = build_trainer(cfg, ModelStore(tmp_path / "store"), ConstantReward(), prompts, FALLBACK_PROMPTS)
    t.setup()
    key = f"{topics_config.interactions}:0"
    seen: list[list[int]] = []
    while not seen or seen[-1][1] < 6:  # a poll may return fewer records than asked for
        t.train_step()
        seen.append(t.checkpoint().extra["offsets"][key])
    assert seen[0][0] == 0 and seen[-1][1] == 6
    assert all(a[1] == b[0] for a, b in zip(seen, seen[1:], strict=False))  # contiguous, nothing twice
    prompts.close()
