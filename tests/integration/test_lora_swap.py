"""LoRA adapter versions on the policy service (real Kafka, real gRPC): an adapter for the serving base
is swapped in and answers report it; one for another base is refused (counted, reported) while the
service keeps serving. An adapter is served unmerged, on the very module tree of the base in memory, and
answers what its merge into the base answers. GeneratePair against an adapter candidate follows the same
rule: on the served base, or refused naming both bases."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from flywheel.core import bus, errors
from flywheel.core.auth import AuthConfig
from flywheel.core.config import KafkaConfig
from flywheel.core.modelstore import BaseRef, Manifest, ModelStore
from flywheel.testing import wait_for
from flywheel.trainer.config import TrainerConfig
from flywheel.trainer.loop import build_trainer
from flywheel.trainer.prompt_sources import FALLBACK_PROMPTS, PoolPrompts
from flywheel.v1 import policy_pb2
from tests.integration.test_policy_service import (
    ADMIN,
    ADMIN_TOKEN,
    HMAC_KEY,
    Running,
    counter,
    fresh_topics,
    gen,
    make_config,
    make_store,
    perturbed,
)
from tests.unit.test_lora_serving import write_adapter
from tests.unit.test_lora_trainer import TargetReward
from tests.unit.test_starter import tiny_starter

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]


def adapter_on(store: ModelStore, base_version: int, seed: int) -> Callable[[Path], None]:
    """A LoRA adapter on the store's `base_version`, saved as the trainer saves one (test_lora_serving's)."""

    def write(d: Path) -> None:
        write_adapter(str(store.load_path("policy", base_version)), d, seed)

    return write


def trained_adapter(store: ModelStore) -> Manifest:
    """One PPO step of the LoRA trainer on the store's starter, checkpointed: an adapter version."""
    cfg = TrainerConfig(
        adapter="lora", algo="ppo", group_size=1, batch_size=4, max_new_tokens=8, lr=1e-2, prompt_source="pool"
    )
    reward = TargetReward()
    t = build_trainer(cfg, store, reward, PoolPrompts(FALLBACK_PROMPTS), FALLBACK_PROMPTS)
    t.setup()
    try:
        t.train_step()
        return t.checkpointer.save(t.state)
    finally:
        t.active.release()


def merged_greedy(store: ModelStore, version: int, prompt: str, n: int) -> list[int]:
    """The greedy answer of adapter `version` merged into its base by PEFT itself."""
    from peft import PeftModel

    m = store.get("policy", version)
    assert m.base is not None
    base = AutoModelForCausalLM.from_pretrained(store.load_path("policy", m.base.version))
    model = PeftModel.from_pretrained(base, str(store.load_path("policy", version))).merge_and_unload()
    tok = AutoTokenizer.from_pretrained(store.load_path("policy", m.base.version))
    enc = tok(prompt, return_tensors="pt")
    return list(model.generate(**enc, do_sample=False, max_new_tokens=n)[0, enc.input_ids.shape[1] :].tolist())


@pytest.mark.parametrize("swap_worker", [True, False], ids=["worker-process", "threads"])
def test_adapter_versions_swap_in_on_their_base_and_are_refused_on_another(
    kafka_bootstrap: str, tmp_path: Path, swap_worker: bool
) -> None:
    store = make_store(tmp_path / "store")
    topics = fresh_topics()
    config = make_config(kafka_bootstrap, topics, tmp_path / "store", tmp_path / "state", swap_worker=swap_worker)
    running = Running(config)
    kafka = KafkaConfig(bootstrap=kafka_bootstrap)
    base0 = BaseRef.of(store.get("policy", 0))

    def announce(version: int) -> None:
        with bus.Producer(kafka) as prod:
            prod.send_sync(topics.policy_updates, "policy", store.to_update(store.get("policy", version), "gate"))

    def serving(v: int) -> Callable[[], bool]:
        return lambda: running.stub.Generate(gen("hi", n=4)).policy_version == v

    try:
        v1 = trained_adapter(store)
        assert v1.kind == "adapter" and v1.version == 1 and v1.base == base0
        engine = running.service.engine
        tree0 = engine.serving_model.model  # type: ignore[union-attr]
        announce(v1.version)
        wait_for(serving(1), 60, "answers from adapter version 1")
        assert engine.serving_model.model is tree0 and engine.serving_model.adapter is not None  # type: ignore[union-attr]
        answer = running.stub.Generate(gen("where is my order?", n=12, logprobs=True))
        assert [t.id for t in answer.tokens] == merged_greedy(store, 1, "where is my order?", 12)
        assert running.service.swapper.serving_base() == base0
        # An adapter for another base: refused with the reason, counted, and version 1 keeps serving.
        v2 = store.publish("policy", perturbed(tiny_starter(), 2), parent=0)
        base2 = BaseRef.of(v2)
        v3 = store.publish("policy", adapter_on(store, 2, 3), parent=2, extra={"base": base2.to_dict()})
        refused = counter("flywheel_policy_updates_refused_total", reason="wrong_base")
        announce(v3.version)
        wait_for(
            lambda: counter("flywheel_policy_updates_refused_total", reason="wrong_base") > refused, 30, "the refusal"
        )
        info = running.stub.GetInfo(policy_pb2.GetInfoRequest())
        assert info.policy_version == 1
        assert f"adapter version 3 applies to base {base2}, but this replica serves {base0}" in info.last_swap_error
        assert running.stub.Generate(gen("where is my order?", n=4)).policy_version == 1
        # Its base first, then the adapter: served.
        announce(2)
        wait_for(serving(2), 60, "answers from version 2")
        tree2 = engine.serving_model.model  # type: ignore[union-attr]
        announce(3)
        wait_for(serving(3), 60, "answers from adapter version 3")
        assert running.stub.GetInfo(policy_pb2.GetInfoRequest()).last_swap_error == ""
        assert engine.serving_model.model is tree2 and running.service.swapper.serving_base() == base2  # type: ignore[union-attr]
        # A replica that starts now: the topic's last announcement is adapter v3, applied onto its base.
        late = Running(make_config(kafka_bootstrap, topics, tmp_path / "store", tmp_path / "late", swap_worker=False))
        try:
            assert late.stub.Generate(gen("hi", n=4)).policy_version == 3
            swapper = late.service.swapper
            assert swapper.serving_base() == base2
            with pytest.raises(errors.FailedPrecondition, match=r"adapter version 1 applies to base policy v0"):
                swapper.load_from_store(1)  # from the store (start-up without Kafka): the same rule
            swapper.load_from_store(0)
            swapper.load_from_store(1)
            assert late.stub.Generate(gen("hi", n=4)).policy_version == 1
        finally:
            late.close()
    finally:
        running.close()


def test_generate_pair_against_an_adapter_candidate_runs_it_on_the_serving_weights(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Side B from an adapter version (the configured candidate): the adapter's deltas on the serving engine's
    own weights, no second engine. An adapter for another base than the served one is refused with both bases
    named, and nothing is loaded for it."""
    store = make_store(tmp_path / "store")
    base0 = BaseRef.of(store.get("policy", 0))
    v1 = store.publish("policy", adapter_on(store, 0, 1), parent=0, extra={"base": base0.to_dict()})
    v2 = store.publish("policy", perturbed(tiny_starter(), 2), parent=0)
    base2 = BaseRef.of(v2)
    v3 = store.publish("policy", adapter_on(store, 2, 3), parent=2, extra={"base": base2.to_dict()})
    assert (v1.kind, v3.kind) == ("adapter", "adapter")
    config = make_config(kafka_bootstrap, fresh_topics(), tmp_path / "store", tmp_path / "state")
    config.policy = dataclasses.replace(config.policy, pair_candidate_version=1)
    config.auth = AuthConfig(hmac_key=HMAC_KEY, admin_token=ADMIN_TOKEN)
    running = Running(config)
    service = running.service
    prompt = "where is my order?"

    def pair(version: int, metadata: tuple = ()) -> policy_pb2.GeneratePairResponse:
        req = policy_pb2.GeneratePairRequest(request=gen(prompt, n=12, logprobs=True), candidate_version=version)
        return running.stub.GeneratePair(req, metadata=metadata)

    try:
        r = pair(0)  # the configured candidate: any caller
        assert (r.a.policy_version, r.b.policy_version) == (0, 1)
        assert service.candidate_loaded == 1
        # No second engine: side B ran on the serving engine's own weights with the adapter's deltas.
        variant, serving = service._variant, service.engine.serving_model
        assert service._candidate is None and variant is not None and serving is not None
        assert variant.model is serving.model and variant.adapter is not None and variant.base is serving
        # Side B's tokens are the merged weights' greedy answer (and not the base's: side A).
        ids_b = [t.id for t in r.b.tokens]
        assert ids_b == merged_greedy(store, 1, prompt, 12) and ids_b != [t.id for t in r.a.tokens]
        assert pair(1, ADMIN).b.policy_version == 1 and service._variant is variant  # cached

        # An adapter for another base: refused naming both, the cached candidate untouched.
        with pytest.raises(grpc.RpcError) as e:
            pair(3, ADMIN)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"adapter version 3 applies to base {base2}, but this replica serves {base0}" in e.value.details()
        assert service._variant is variant
        with pytest.raises(errors.FailedPrecondition, match=r"adapter version 3 applies to base policy v2"):
            service.swapper.variant(3)  # the one rule, as the swap applies it

        # A whole-weights candidate is a second engine, which the adapter candidate then replaces.
        assert pair(2, ADMIN).b.policy_version == 2 and service.candidate_loaded == 2
        assert service._candidate is not None and service._variant is None
        assert pair(1, ADMIN).b.tokens == r.b.tokens
        assert service._candidate is None and service.candidate_loaded == 1

        # The replica now serves base v2: the cached adapter candidate on v0 is refused at the next pair,
        # and adapter v3 (on v2) answers side B.
        service.swapper.load_from_store(2)
        with pytest.raises(grpc.RpcError) as e:
            pair(1, ADMIN)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"adapter version 1 applies to base {base0}, but this replica serves {base2}" in e.value.details()
        r3 = pair(3, ADMIN)
        assert (r3.a.policy_version, r3.b.policy_version) == (2, 3)
        assert [t.id for t in r3.b.tokens] == merged_greedy(store, 3, prompt, 12)
    finally:
        running.close()
