"""trainer.adapter = lora on the tiny Llama: only the adapter trains, the reference is the base with
the adapter off, checkpoints are adapter versions that peft alone loads, resume is exact."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from flywheel import cli
from flywheel.core import errors
from flywheel.core.config import ConfigError
from flywheel.core.modelstore import BaseRef, ModelStore
from flywheel.testing import tiny_policy
from flywheel.trainer import state
from flywheel.trainer.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, as_model
from flywheel.trainer.config import TrainerConfig
from flywheel.trainer.loop import Trainer, build_trainer
from flywheel.trainer.prompt_sources import FALLBACK_PROMPTS, PoolPrompts
from flywheel.trainer.rollout import encode_prompts

pytestmark = pytest.mark.timeout(120)


class TargetReward:
    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [sum(w == "help" for w in r.split()) / max(1, len(r.split())) for r in responses]


@pytest.fixture(scope="module")
def init_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_policy(tmp_path_factory.mktemp("tiny") / "init", seed=0)


def make(store: Path, init_path: Path, **kw: object) -> Trainer:
    torch.set_num_threads(1)
    opts: dict = dict(
        init_path=str(init_path),
        adapter="lora",
        algo="ppo",
        group_size=1,
        adaptive_kl=False,
        temperature=0.7,
        batch_size=4,
        max_new_tokens=8,
        lr=1e-2,
        prompt_source="pool",
        missing_eos_penalty=None,
        reward_norm="running",
        gate_prompts=4,
        gate_kl_budget=1e9,
        gate_patience=0,
        checkpoint_every=1000,
        auto_promote=False,
    )
    opts.update(kw)
    cfg = TrainerConfig(**opts)
    t = build_trainer(cfg, ModelStore(store), TargetReward(), PoolPrompts(FALLBACK_PROMPTS), FALLBACK_PROMPTS)
    t.setup()
    return t


def logits(model: torch.nn.Module, t: Trainer) -> torch.Tensor:
    ids, mask = encode_prompts(t.state.tokenizer, FALLBACK_PROMPTS[:3], 16)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_lora_settings_are_validated_with_what_to_change() -> None:
    with pytest.raises(ConfigError, match=r"TrainerConfig.adapter = 'qlora': use none \(whole weights\) or lora"):
        TrainerConfig(adapter="qlora")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"lora_rank = 0: use 1 or more"):
        TrainerConfig(lora_rank=0)
    with pytest.raises(ConfigError, match=r"lora_dropout = 1.0: use a probability in \[0, 1\)"):
        TrainerConfig(lora_dropout=1.0)
    with pytest.raises(ConfigError, match=r"lora_target_modules = \[\]: list module names, e.g. q_proj"):
        TrainerConfig(lora_target_modules=[])
    assert TrainerConfig().adapter == "none"  # whole weights stay the default


def test_unknown_target_modules_say_which_exist(tmp_path: Path, init_path: Path) -> None:
    with pytest.raises(
        errors.FailedPrecondition, match=r"linear layers are named .*q_proj.*: set FLYWHEEL_TRAINER_LORA"
    ):
        make(tmp_path / "store", init_path, lora_target_modules=["c_attn"])


def test_a_lora_step_moves_only_the_adapter_and_the_reference_is_the_base(tmp_path: Path, init_path: Path) -> None:
    t = make(tmp_path / "store", init_path)
    st = t.state
    assert st.adapter is not None
    trainable = {n for n, p in st.policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    in_optimizer = {id(p) for g in st.optimizer.param_groups for p in g["params"]}
    want = {id(p) for p in st.policy.parameters() if p.requires_grad} | {id(p) for p in st.value_head.parameters()}
    assert in_optimizer == want  # no frozen base weight has optimizer state
    before = {n: p.detach().clone() for n, p in st.policy.named_parameters()}
    base = AutoModelForCausalLM.from_pretrained(init_path, dtype=torch.float32)
    for _ in range(2):
        t.train_step()
    moved = {n for n, p in st.policy.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= trainable, moved - trainable
    assert any("lora_B" in n for n in moved)  # the adapter is no longer a no-op
    with as_model(st.reference) as ref:  # the adapter off: exactly the base's function
        torch.testing.assert_close(logits(ref, t), logits(base, t))
    assert not torch.allclose(logits(st.policy, t), logits(base, t))
    from peft.tuners.lora import LoraLayer

    assert not any(m.disable_adapters for m in st.policy.modules() if isinstance(m, LoraLayer))  # back on


def test_an_adapter_version_holds_only_the_adapter_and_peft_alone_loads_it(tmp_path: Path, init_path: Path) -> None:
    from peft import PeftModel

    t = make(tmp_path / "store", init_path)
    t.train_step()
    m = t.checkpointer.save(t.state)
    store = t.checkpointer.store
    v0 = store.get("policy", 0)
    assert m.kind == "adapter" and v0.kind == "full"
    assert m.base == BaseRef.of(v0) and m.base.model == "policy" and m.base.version == 0
    assert {ADAPTER_WEIGHTS, ADAPTER_CONFIG} <= set(m.files) and not any(f.startswith("model") for f in m.files)
    assert m.bytes < v0.bytes
    print(f"bytes per version: adapter {m.bytes}, full {v0.bytes} ({m.bytes / v0.bytes:.1%})")
    update = store.to_update(m, "gate")
    assert update.adapter and update.base.version == 0 and update.base.files_sha256 == m.base.files_sha256
    # Interop: peft alone, from the store's directories, gives the trainer's logits.
    base = AutoModelForCausalLM.from_pretrained(store.load_path("policy", 0), dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(store.load_path("policy", m.version))).eval()
    t.state.policy.eval()
    torch.testing.assert_close(logits(loaded, t), logits(t.state.policy, t))
    # `flywheel models list` shows each version's kind, base and bytes.
    out = _models_list(store)
    assert f"policy v0 parent=- kind=full bytes={v0.bytes} " in out
    assert f"policy v{m.version} parent=v0 kind=adapter base=policy:v0 bytes={m.bytes} " in out


def _models_list(store: ModelStore) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        cli._models_list(argparse.Namespace(store=str(store.root), model="policy"))
    return buf.getvalue()


def test_a_passing_adapter_checkpoint_is_announced_as_one_and_measured_as_the_serving_version(
    tmp_path: Path, init_path: Path
) -> None:
    announced: list = []
    kw: dict = dict(auto_promote=True, gate_max_repeat=1.0, gate_min_distinct2=0.0, gate_max_tokens=100)
    kw |= dict(gate_margin=-1e9, gate_max_surprising_increase=1.0)
    t = make(tmp_path / "store", init_path, **kw)
    t.promoter.announce = announced.append
    for _ in range(2):
        t.train_step()
        m = t.checkpoint()  # the second gate measures adapter version 1 as the serving version (merged)
        assert m.gate == "passed" and m.promoted, m.gate
    assert [u.version for u in announced] == [1, 2] and t.serving_version == 2
    assert all(u.adapter and u.base.version == 0 and u.base.model == "policy" for u in announced)


def test_resume_restores_the_adapter_and_its_optimizer_exactly(tmp_path: Path, init_path: Path) -> None:
    t = make(tmp_path / "store", init_path)
    for _ in range(2):
        t.train_step()
    t.checkpointer.save(t.state)
    adapter = {n: p.detach().clone() for n, p in t.state.policy.named_parameters() if p.requires_grad}
    opt = t.state.optimizer.state_dict()
    assert state.load_state(t.dir).adapter  # state.pt holds the adapter's tensors
    t.active.release()
    again = make(tmp_path / "store", init_path)  # new objects, from the store and state.pt only
    st = again.state
    assert st.adapter is not None and st.step == 2
    got = {n: p.detach() for n, p in st.policy.named_parameters() if p.requires_grad}
    assert got.keys() == adapter.keys() and all(torch.equal(got[n], adapter[n]) for n in adapter)
    back = st.optimizer.state_dict()
    assert back["param_groups"] == opt["param_groups"]
    assert back["state"].keys() == opt["state"].keys()
    for i, s in opt["state"].items():
        assert all(torch.equal(back["state"][i][k], v) for k, v in s.items())


def test_resume_with_another_adapter_setting_is_refused(tmp_path: Path, init_path: Path) -> None:
    t = make(tmp_path / "store", init_path)
    t.train_step()
    t.checkpointer.save(t.state)
    t.active.release()
    with pytest.raises(errors.FailedPrecondition, match=r"written with trainer.adapter = lora, the config says none"):
        make(tmp_path / "store", init_path, adapter="none")
    with pytest.raises(errors.FailedPrecondition, match=r"trained with \(rank, alpha, targets\) = \(16"):
        make(tmp_path / "store", init_path, lora_rank=8)


def test_a_restart_sets_the_adapter_of_that_version_or_a_fresh_one(tmp_path: Path, init_path: Path) -> None:
    t = make(tmp_path / "store", init_path)
    t.train_step()
    m = t.checkpointer.save(t.state)
    saved = {n: p.detach().clone() for n, p in t.state.policy.named_parameters() if p.requires_grad}
    t.train_step()
    t.promoter.request_restart(m.version, "rollback")
    t.apply_restart()
    now = {n: p.detach() for n, p in t.state.policy.named_parameters() if p.requires_grad}
    assert all(torch.equal(now[n], saved[n]) for n in saved) and t.state.version == m.version
    t.promoter.request_restart(0, "rollback")
    t.apply_restart()
    assert all(float(p.detach().abs().sum()) == 0 for n, p in t.state.policy.named_parameters() if "lora_B" in n)


def test_retention_keeps_every_base_a_kept_version_applies_to(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")

    def full(name: str, v: int) -> BaseRef:
        return BaseRef.of(store.publish(name, lambda d: (d / "w").write_bytes(bytes([v])), parent=None))

    def adapter(name: str, base: BaseRef) -> None:
        store.publish(name, lambda d: (d / "a").write_bytes(b"a"), parent=None, extra={"base": base.to_dict()})

    bases = [full("lm", v) for v in range(3)]  # v0 (the starter), v1, v2
    adapter("lm", bases[1])  # v3: an adapter on v1
    full("lm", 4)  # v4
    assert store.retain("lm", keep_last=2) == [2]  # v1 stays: kept v3 applies to it
    assert store.get("lm", 3).kind == "adapter" and store.get("lm", 3).base == bases[1]
    others = [full("other", v) for v in range(4)]
    adapter("tuned", others[2])  # another model's version applies to other v2
    assert store.retain("other", keep_last=1) == [1]


def test_a_signed_adapter_announcement_covers_its_base(tmp_path: Path) -> None:
    from flywheel.core import signing
    from flywheel.core.modelstore import ModelStoreConfig

    signing.keygen(tmp_path / "keys")
    store = ModelStoreConfig(
        root=str(tmp_path / "store"), signing_key=str(tmp_path / "keys" / signing.KEY_FILE)
    ).store()
    v0 = store.publish("policy", lambda d: (d / "w").write_bytes(b"w"), parent=None)
    v1 = store.publish(
        "policy", lambda d: (d / "a").write_bytes(b"a"), parent=0, extra={"base": BaseRef.of(v0).to_dict()}
    )
    u = store.to_update(v1, "gate")
    store.locate(u)  # signed, base included
    u.base.version = 7  # a base changed on the way
    with pytest.raises(errors.IntegrityError, match="signature") as e:
        store.locate(u)
    assert e.value.reason == "bad_signature"


def test_sigkill_then_restart_resumes_a_lora_trainer_exactly(tmp_path: Path, init_path: Path) -> None:
    """test_trainer_loop's SIGKILL test with trainer.adapter = lora: the restarted process redoes the
    uncommitted steps with the same prompts and the same weights (adapter, dropout RNG, optimizer)."""
    import os
    import signal
    import subprocess
    import sys

    from flywheel.testing import wait_for
    from tests.unit.test_trainer_loop import RUNNER, _lines

    runner = RUNNER.replace("epochs=2)", 'epochs=2, adapter="lora")')
    assert runner != RUNNER
    script = tmp_path / "runner.py"
    script.write_text(runner)

    def spawn(store: Path, log: Path, halt_after: int = 0) -> subprocess.Popen:
        args = [sys.executable, str(script), str(store), str(init_path), str(log), "6", str(halt_after)]
        return subprocess.Popen(args, env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE)

    ref_log, run_log = tmp_path / "ref.jsonl", tmp_path / "run.jsonl"
    ref = spawn(tmp_path / "ref_store", ref_log)
    victim = spawn(tmp_path / "store", run_log, halt_after=3)

    def victim_did_step_3() -> bool:
        assert victim.poll() is None, victim.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
        return any(x["step"] == 3 for x in _lines(run_log))

    wait_for(victim_did_step_3, 90, "the victim's step 3")
    os.kill(victim.pid, signal.SIGKILL)  # step 3 done, not checkpointed (checkpoint_every=2)
    victim.wait()
    killed_at = len(_lines(run_log))
    restart = spawn(tmp_path / "store", run_log)
    assert restart.wait(90) == 0, restart.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
    assert ref.wait(90) == 0, ref.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
    want, after = _lines(ref_log), _lines(run_log)[killed_at:]
    assert [x["step"] for x in after] == [3, 4, 5, 6]
    assert [(x["cursor"], x["hash"]) for x in after] == [(x["cursor"], x["hash"]) for x in want[2:]]
    kinds = [m.kind for m in ModelStore(tmp_path / "store").list_versions("policy")]
    assert kinds == ["full", "adapter", "adapter", "adapter"]  # the starter, then one adapter per checkpoint


@pytest.mark.parametrize("adapter", ["lora", "none"])
def test_gradient_checkpointing_takes_the_same_steps(tmp_path: Path, init_path: Path, adapter: str) -> None:
    """Activations recomputed in the backward pass (trainer.gradient_checkpointing) change memory, not the update."""
    runs = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        t = make(
            tmp_path / f"store-{checkpointing}",
            init_path,
            adapter=adapter,
            lora_dropout=0.0,
            seed=0,
            gradient_checkpointing=checkpointing,
        )
        assert t.state.policy.is_gradient_checkpointing is checkpointing
        for _ in range(2):
            t.train_step()
        runs.append({n: p.detach().clone() for n, p in t.state.policy.named_parameters() if p.requires_grad})
        t.active.release()
    assert runs[0].keys() == runs[1].keys()
    for n, p in runs[0].items():
        torch.testing.assert_close(runs[1][n], p, atol=1e-5, rtol=1e-4, msg=n)


def test_a_bfloat16_base_trains_its_adapter_in_float32(tmp_path: Path, init_path: Path) -> None:
    """trainer.base_dtype = bfloat16 (auto picks it on CUDA): the frozen base in bf16, the adapter and value
    head in float32 (mixed precision), and the adapter version saved in float32."""
    with pytest.raises(ConfigError, match=r"base_dtype = 'bfloat16': bfloat16 is for the frozen base"):
        TrainerConfig(base_dtype="bfloat16")
    t = make(tmp_path / "store", init_path, base_dtype="bfloat16")
    params = dict(t.state.policy.named_parameters())
    assert {p.dtype for n, p in params.items() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for n, p in params.items() if p.requires_grad} == {torch.float32}
    before = {n: p.detach().clone() for n, p in params.items() if p.requires_grad}
    m = t.train_step()
    assert all(torch.isfinite(torch.tensor(v)) for k, v in m.items() if k in ("kl", "pg_loss", "value_loss"))
    assert any(not torch.equal(p, before[n]) for n, p in params.items() if "lora_B" in n)
    manifest = t.checkpointer.save(t.state)
    from safetensors.torch import load_file

    saved = load_file(str(ModelStore(tmp_path / "store").load_path("policy", manifest.version) / ADAPTER_WEIGHTS))
    assert {v.dtype for v in saved.values()} == {torch.float32}
    t.active.release()
