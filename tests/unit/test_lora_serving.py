"""LoRA adapter versions served unmerged on the base in memory (flywheel.policy.lora): each row gets exactly
what the adapter merged into the base (PEFT's merge_and_unload) gives, also when a swap's drain runs rows
of two versions in one forward; adapters that cannot be served so are refused, saying why."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from flywheel.policy import hotswap as hotswap_module
from flywheel.policy.config import EngineConfig
from flywheel.policy.kvbatch import LoadedModel, load_model
from flywheel.policy.lora import AdapterMix, LoraAdapter, UnsupportedAdapter
from flywheel.trainer.adapters import lora_config, save_adapter
from flywheel.trainer.config import TrainerConfig
from tests.unit.test_engine import PROMPTS as QUESTIONS
from tests.unit.test_engine import _first_token_then_result, engine, greedy, ids, slow, v0, v1  # noqa: F401 - fixtures
from tests.unit.test_mixed import _batch, _decode

CONFIG = EngineConfig(device="cpu")
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]


def write_adapter(base: str, out: Path, seed: int, **lora: object) -> Path:
    """An adapter as the trainer saves one (its defaults), its B matrices random so that it changes answers."""
    from peft import get_peft_model

    cfg = lora_config(TrainerConfig(adapter="lora"))
    for k, v in lora.items():
        setattr(cfg, k, v)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(base), cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    save_adapter(peft, AutoTokenizer.from_pretrained(base), out)
    return out


def merged(base: str, adapter: Path, out: Path) -> str:
    """The adapter merged into a copy of the base (PEFT's own merge), saved as whole weights."""
    from peft import PeftModel

    PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), str(adapter)
    ).merge_and_unload().save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return str(out)


def on(base: LoadedModel, adapter: Path, version: int) -> LoadedModel:
    loaded = LoraAdapter.load(adapter, base.model, base.device, base.dtype)
    return dataclasses.replace(base, source=str(adapter), version=version, adapter=loaded)


@pytest.fixture(scope="module")
def adapters(v0, tmp_path_factory):  # noqa: F811
    d = tmp_path_factory.mktemp("adapters")
    a1, a2 = write_adapter(v0, d / "a1", 1), write_adapter(v0, d / "a2", 2, use_rslora=True)
    return a1, a2, merged(v0, a1, d / "m1"), merged(v0, a2, d / "m2")


def test_an_adapter_on_the_base_decodes_as_its_merge_does(v0, adapters):  # noqa: F811
    a1, a2, m1, m2 = adapters
    base = load_model(v0, 0, CONFIG)
    for adapter, whole, version in ((a1, m1, 1), (a2, m2, 2)):
        lm = on(base, adapter, version)
        assert lm.model is base.model and lm.adapter is not None  # nothing of the base is copied
        want = torch.stack(_decode(_batch(load_model(whole, version, CONFIG), PROMPTS), 5))
        got = torch.stack(_decode(_batch(lm, PROMPTS), 5))
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    base_alone = torch.stack(_decode(_batch(base, PROMPTS), 5))  # the base's own forward is untouched
    torch.testing.assert_close(base_alone, torch.stack(_decode(_batch(load_model(v0, 0, CONFIG), PROMPTS), 5)))
    assert not any("forward" in vars(m) for m in base.model.modules())


@pytest.mark.parametrize("old_kind", ["base", "adapter"])
def test_a_drain_runs_each_row_on_its_own_adapter_in_one_forward(v0, adapters, old_kind):  # noqa: F811
    a1, a2, m1, m2 = adapters
    base = load_model(v0, 0, CONFIG)
    old = base if old_kind == "base" else on(base, a1, 1)
    new = on(base, a2, 2)
    want_old = torch.stack(_decode(_batch(load_model(v0 if old_kind == "base" else m1, 1, CONFIG), PROMPTS), 6))
    new_prompts = [[14, 15], [16, 17, 18, 19]]
    want_new = torch.stack(_decode(_batch(load_model(m2, 2, CONFIG), new_prompts), 3))

    mixed = _batch(old, PROMPTS)  # 2 steps on old, adopt new (1 step of old rows alone), then 3 together
    got = _decode(mixed, 2)
    mix = AdapterMix(old, new)
    mixed.adopt(mix)
    got += _decode(mixed, 1)
    mixed.merge(_batch(new, new_prompts))
    together = torch.stack(_decode(mixed, 3))
    torch.testing.assert_close(torch.cat([torch.stack(got), together[:, :3]]), want_old, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(together[:, 3:], want_new, atol=1e-4, rtol=1e-4)
    mixed.filter(mixed.seqs[3:])
    assert mixed.mix is None
    assert not any("forward" in vars(m) for m in base.model.modules())  # every Linear back to its own forward


def test_adapters_it_cannot_serve_unmerged_are_refused_saying_why(v0, adapters, tmp_path):  # noqa: F811
    a1 = adapters[0]
    base = load_model(v0, 0, CONFIG)
    for field, value in (("use_dora", True), ("modules_to_save", ["lm_head"]), ("bias", "all")):
        d = tmp_path / field
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes((a1 / "adapter_model.safetensors").read_bytes())
        cfg = json.loads((a1 / "adapter_config.json").read_text()) | {field: value}
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        with pytest.raises(UnsupportedAdapter, match=f"adapter_config {field}="):
            LoraAdapter.load(d, base.model, base.device, base.dtype)

    # Non-finite matrices (the adapter's smoke test: no forward of the whole model at a swap).
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan"
    bad.mkdir()
    tensors = load_file(a1 / "adapter_model.safetensors")
    first = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[first][0, 0] = float("nan")
    save_file(tensors, bad / "adapter_model.safetensors")
    (bad / "adapter_config.json").write_text((a1 / "adapter_config.json").read_text())
    with pytest.raises(ValueError, match=r"hold non-finite values"):
        LoraAdapter.load(bad, base.model, base.device, base.dtype)

    # An adapter trained on a base of another width does not fit this base's Linears.
    cfg = AutoConfig.from_pretrained(v0)
    cfg.intermediate_size *= 2
    wide = AutoModelForCausalLM.from_config(cfg)
    wide.save_pretrained(tmp_path / "wide")
    AutoTokenizer.from_pretrained(v0).save_pretrained(tmp_path / "wide")
    other = write_adapter(str(tmp_path / "wide"), tmp_path / "other", 3)
    with pytest.raises(ValueError, match=r"do not fit a Linear of .*: is it for another base\?"):
        LoraAdapter.load(other, base.model, base.device, base.dtype)


def test_the_engine_swaps_adapters_in_and_out_while_it_answers(v0, v1, adapters, slow, monkeypatch):  # noqa: F811
    a1, a2, m1, m2 = adapters

    def answers(e) -> list[list[int]]:
        return [ids(asyncio.run(e.generate(greedy(q, 60)))) for q in QUESTIONS[:3]]

    want = {}
    for path, version in ((m1, 1), (m2, 2), (v1, 3)):
        with engine(path, version) as ref:
            want[version] = answers(ref)
    in_memory = lambda: pytest.fail("the base is in memory: nothing to read")  # noqa: E731
    with engine(v0) as e:
        base = e.serving_model
        assert base is not None
        e.load_adapter(str(a1), 1, in_memory)
        assert e.serving_model.model is base.model and answers(e) == want[1]  # type: ignore[union-attr]

        async def swap_while_answering():  # to adapter 2: the answers in flight finish on adapter 1
            started = [asyncio.Event() for _ in range(3)]
            inflight = [
                asyncio.create_task(_first_token_then_result(e, greedy(q, 60), s))
                for q, s in zip(QUESTIONS[:3], started, strict=True)
            ]
            await asyncio.gather(*[s.wait() for s in started])
            await asyncio.to_thread(e.load_adapter, str(a2), 2, in_memory)
            fresh = [asyncio.create_task(e.generate(greedy(q, 60))) for q in QUESTIONS[:3]]
            await until_mixed(e)
            return await asyncio.gather(*inflight), await asyncio.gather(*fresh)

        old, fresh = asyncio.run(swap_while_answering())
        assert [r.version for r in old] == [1, 1, 1] and [ids(r) for r in old] == want[1]
        assert [r.version for r in fresh] == [2, 2, 2] and [ids(r) for r in fresh] == want[2]

        e.load_version(v0, 0)  # back to the base: the very LoadedModel in memory, nothing read
        assert e.serving_model is base
        e.load_adapter(str(a1), 1, in_memory)
        with monkeypatch.context() as m:  # a whole version after an adapter: a copy of the base's tree
            m.setattr(hotswap_module, "load_model", lambda *a: pytest.fail("from_pretrained on the hot path"))
            e.load_version(v1, 3)
        assert e.serving_model.adapter is None and e.serving_model.model is not base.model  # type: ignore[union-attr]
        assert answers(e) == want[3]
    with engine(None) as e:  # nothing served yet: the base is loaded first
        e.load_adapter(str(a1), 1, lambda: (v0, 0))
        assert e.info().version == 1 and answers(e) == want[1]


async def until_mixed(e) -> None:
    """Until new rows run in the same batch as the rows still on the previous version (one forward)."""
    for _ in range(2000):
        snap = await asyncio.to_thread(e.snapshot)
        if any(b.old_version is not None and b.rows > b.old_rows for b in snap.batches):
            return
        await asyncio.sleep(0.002)
    raise AssertionError(f"no mixed batch: {snap}")


def test_requests_pinned_to_an_adapter_variant_run_beside_the_serving_version(v0, adapters, slow):  # noqa: F811
    """A GeneratePair candidate without a second engine: rows pinned to an adapter on the serving weights
    answer exactly as that adapter, in their own batch, while the serving version answers the others; a
    swap meanwhile leaves them be. Nothing of the base is copied and nothing counts as a drain."""
    a1, a2, m1, m2 = adapters
    with engine(m1, 1) as ref:
        want = [ids(asyncio.run(ref.generate(greedy(q, 60)))) for q in QUESTIONS[:2]]
    with engine(v0) as e:
        base_answers = [ids(asyncio.run(e.generate(greedy(q, 60)))) for q in QUESTIONS[:2]]
        variant = e.adapter_variant(str(a1), 1)
        assert variant.model is e.serving_model.model and e.info().version == 0  # type: ignore[union-attr]

        async def side_by_side():
            pinned = [asyncio.create_task(e.generate(greedy(q, 60), on=variant)) for q in QUESTIONS[:2]]
            served = [asyncio.create_task(e.generate(greedy(q, 60))) for q in QUESTIONS[:2]]
            for _ in range(2000):
                snap = await asyncio.to_thread(e.snapshot)
                if sorted(b.version for b in snap.batches) == [0, 1]:
                    break
                await asyncio.sleep(0.002)
            assert sorted(b.version for b in snap.batches) == [0, 1] and not snap.draining
            await asyncio.to_thread(e.load_adapter, str(a2), 2, lambda: (v0, 0))  # not held up by the pinned rows
            return await asyncio.gather(*pinned), await asyncio.gather(*served)

        pinned, served = asyncio.run(side_by_side())
        assert [r.version for r in pinned] == [1, 1] and [ids(r) for r in pinned] == want
        assert [r.version for r in served] == [0, 0] and [ids(r) for r in served] == base_answers
