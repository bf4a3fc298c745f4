"""The model store: atomic publish, verification, retention (services/flywheel/core/modelstore.py)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from flywheel.core import errors, modelstore
from flywheel.core.modelstore import Manifest, ModelStore, ModelStoreConfig, verify_digests
from flywheel.v1 import events_pb2


def _files(**contents: str):
    """A write_fn that writes small text files (fast stand-in for a checkpoint)."""

    def write(d: Path) -> None:
        for name, text in contents.items():
            (d / name).parent.mkdir(parents=True, exist_ok=True)
            (d / name).write_text(text)

    return write


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "models")


@pytest.fixture(scope="module")
def tiny_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=32)
    return GPT2LMHeadModel(cfg).eval()


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, "a": 1, "b": 2}
    t = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]")


def test_publish_and_load_real_model(store: ModelStore, tiny_model: GPT2LMHeadModel) -> None:
    tok = _tiny_tokenizer()

    def write(d: Path) -> None:
        tiny_model.save_pretrained(d, safe_serialization=True)
        tok.save_pretrained(d)
        (d / "optim").mkdir()
        torch.save({"step": 3}, d / "optim" / "state.pt")

    m = store.publish("policy", write, parent=None, metrics={"kl": 0.5})
    assert m.version == 0 and m.path == store.root / "policy" / "v000000"
    assert {"model.safetensors", "config.json", "tokenizer.json", "optim/state.pt"} <= set(m.files)
    assert m.files["model.safetensors"]["size"] == (m.path / "model.safetensors").stat().st_size
    path = store.load_path("policy")
    assert path == m.path
    loaded = GPT2LMHeadModel.from_pretrained(path).eval()
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(loaded(ids).logits, tiny_model(ids).logits)
    assert PreTrainedTokenizerFast.from_pretrained(path)("a b").input_ids == tok("a b").input_ids
    assert store.get("policy", 0) == m  # manifest round-trips through manifest.json
    assert Manifest.from_json(m.to_json()) == m


def test_tampered_file_is_refused(store: ModelStore, tiny_model: GPT2LMHeadModel) -> None:
    m = store.publish("policy", lambda d: tiny_model.save_pretrained(d), parent=None)
    f = m.path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes
    f.write_bytes(bytes(data))
    with pytest.raises(errors.IntegrityError, match="'model.safetensors' has sha256"):
        store.load_path("policy")


def test_a_sharded_checkpoint_is_hashed_file_by_file_and_any_tampered_shard_refused(
    store: ModelStore, tiny_model: GPT2LMHeadModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(modelstore, "MAX_SHARD_SIZE", "20KB")
    tok = _tiny_tokenizer()
    m = store.publish("policy", lambda d: modelstore.save_pretrained(tiny_model, tok, d), parent=None)
    shards = sorted(f for f in m.files if f.endswith(".safetensors"))
    assert len(shards) >= 3 and "model.safetensors.index.json" in m.files
    assert {f: modelstore.sha256_file(m.path / f) for f in m.files} == {f: d["sha256"] for f, d in m.files.items()}
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(GPT2LMHeadModel.from_pretrained(m.path)(ids).logits, tiny_model(ids).logits)
    f = m.path / shards[len(shards) // 2]
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(errors.IntegrityError, match=f"'{shards[len(shards) // 2]}' has sha256"):
        store.verify("policy", 0)


def test_missing_resized_and_extra_files_are_refused(store: ModelStore) -> None:
    m = store.publish("p", _files(**{"a.txt": "a", "sub/b.txt": "b"}), parent=None)
    store.verify("p", 0)
    (m.path / "sub" / "b.txt").unlink()
    with pytest.raises(errors.IntegrityError, match="'sub/b.txt' is missing"):
        store.verify("p", 0)
    (m.path / "sub" / "b.txt").write_text("bb")
    with pytest.raises(errors.IntegrityError, match="'sub/b.txt' has 2 bytes"):
        store.verify("p", 0)
    (m.path / "sub" / "b.txt").write_text("b")
    (m.path / "evil.py").write_text("x")
    with pytest.raises(errors.IntegrityError, match="unexpected file.*evil.py"):
        store.verify("p", 0)


def test_interrupted_publish_leaves_nothing_and_next_works(store: ModelStore) -> None:
    store.publish("p", _files(a="0"), parent=None)

    def crash(d: Path) -> None:
        (d / "model.safetensors").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        store.publish("p", crash, parent=0)
    leftovers = [p.name for p in (store.root / "p").iterdir() if p.name != ".lock"]
    assert leftovers == ["v000000"]
    # A publisher killed mid-write leaves a .tmp dir: never listed, cleaned up later.
    killed = store.root / "p" / ".tmp-otherhost-1-abc"
    killed.mkdir()
    (killed / "model.safetensors").write_text("half")
    assert [m.version for m in store.list_versions("p")] == [0]
    m1 = store.publish("p", _files(a="1"), parent=0)
    assert m1.version == 1 and store.latest("p").version == 1
    assert killed.exists()  # another host's, recent: kept until stale
    assert store.clean_tmp("p", older_than_s=0) == 1 and not killed.exists()


def test_dead_local_publisher_tmp_is_cleaned(store: ModelStore) -> None:
    import socket
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = store.root / "p" / f".tmp-{socket.gethostname()}-{proc.stdout.strip()}-x"
    dead.mkdir(parents=True)
    store.publish("p", _files(a="0"), parent=None)  # publish cleans dead publishers' dirs
    assert not dead.exists()


def test_versions_increase_and_not_found_lists_known(store: ModelStore) -> None:
    versions = [store.publish("p", _files(a=str(i)), parent=i - 1 if i else None).version for i in range(3)]
    assert versions == [0, 1, 2]
    assert [m.parent for m in store.list_versions("p")] == [None, 0, 1]
    with pytest.raises(errors.NotFound, match=r"known versions: \[0, 1, 2\]"):
        store.get("p", 9)
    with pytest.raises(errors.FailedPrecondition, match="already exists"):
        store.publish("p", _files(a="x"), parent=None, version=1)
    assert store.publish("p", _files(a="x"), parent=2, version=10).version == 10
    assert store.publish("p", _files(a="y"), parent=10).version == 11
    with pytest.raises(errors.NotFound):
        store.load_path("other")


def test_promote_and_metrics_update(store: ModelStore) -> None:
    store.publish("p", _files(a="0"), parent=None, metrics={"loss": 1.0})
    m = store.mark_promoted("p", 0, gate="manual_promote", metrics={"win_rate": 0.6})
    again = store.get("p", 0)
    assert again.promoted and again.gate == "manual_promote"
    assert again.metrics == {"loss": 1.0, "win_rate": 0.6} == m.metrics
    store.update("p", 0, extra={"trained_on": "run-1"})
    assert store.get("p", 0).extra == {"trained_on": "run-1"}
    store.verify("p", 0)  # manifest rewrites do not break verification
    assert store.latest("p", promoted_only=True).version == 0


def test_retention_keeps_last_promoted_and_starter(store: ModelStore) -> None:
    for i in range(8):
        store.publish("p", _files(a=str(i)), parent=i - 1 if i else None)
    store.mark_promoted("p", 2)
    deleted = store.retain("p", keep_last=3)
    assert deleted == [1, 3, 4]
    assert [m.version for m in store.list_versions("p")] == [0, 2, 5, 6, 7]
    assert not (store.root / "p" / "v000001").exists()
    assert [p.name for p in (store.root / "p").glob(".tmp-*")] == []
    assert store.publish("p", _files(a="8"), parent=7).version == 8  # numbering continues
    with pytest.raises(errors.InvalidArgument):
        store.retain("p", keep_last=0)


def test_concurrent_publishes_get_distinct_versions(store: ModelStore) -> None:
    results: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def publish(i: int) -> None:
        start.wait()
        v = store.publish("p", _files(a=str(i)), parent=None).version
        with lock:
            results.append(v)

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(8))
    for v in range(8):
        store.verify("p", v)


def test_model_update_round_trip(store: ModelStore, tmp_path: Path) -> None:
    m = store.publish("policy", _files(**{"config.json": "{}", "model.safetensors": "w"}), parent=None)
    m = store.mark_promoted("policy", 0, metrics={"gate.reward_mean": 0.25})
    up = store.to_update(m, reason="gate")
    assert up.uri == m.path.resolve().as_uri() and up.uri.startswith("file://")
    assert (up.model, up.version, up.reason) == ("policy", 0, "gate")
    assert {f.path: f.sha256 for f in up.files} == {k: v["sha256"] for k, v in m.files.items()}
    assert dict(up.metrics) == {"gate.reward_mean": 0.25}
    assert abs(up.created_at.ToNanoseconds() / 1e9 - m.created_at) < 1e-3
    wire = events_pb2.ModelUpdate.FromString(up.SerializeToString())
    assert store.from_update(wire) == m.path
    # A consumer whose store has the version at another mount point finds it by model/version.
    wire.uri = "file:///nonexistent/policy/v000000"
    assert store.from_update(wire) == store.version_path("policy", 0)
    (m.path / "model.safetensors").write_text("x")
    with pytest.raises(errors.IntegrityError, match="model.safetensors"):
        store.from_update(wire)
    with pytest.raises(errors.IntegrityError, match="lists no files"):
        verify_digests(m.path, [])


def test_config_from_env(monkeypatch, tmp_path: Path) -> None:
    from flywheel.core.config import ConfigError, load

    monkeypatch.setenv("FLYWHEEL_MODEL_STORE", str(tmp_path / "s"))
    cfg = load(ModelStoreConfig)
    assert cfg.store().root == tmp_path / "s" and os.path.isdir(tmp_path / "s")
    with pytest.raises(ConfigError, match="ModelStoreConfig.keep_last"):
        ModelStoreConfig(keep_last=0)


def test_published_version_is_readable_by_others(store: ModelStore) -> None:
    m = store.publish("p", _files(a="0"), parent=None)
    store.mark_promoted("p", 0)
    assert m.path.stat().st_mode & 0o055 == 0o055
    assert (m.path / "manifest.json").stat().st_mode & 0o044 == 0o044


def test_sha256_files_hashes_shards_in_threads_and_the_rest_inline(tmp_path: Path) -> None:
    import hashlib

    big = modelstore.PARALLEL_HASH_BYTES
    data = {"a.safetensors": os.urandom(big), "b.safetensors": os.urandom(big + 1), "config.json": b"{}"}
    for name, b in data.items():
        (tmp_path / name).write_bytes(b)
    fd = os.memfd_create("copy") if hasattr(os, "memfd_create") else os.open(tmp_path / "copy", os.O_RDWR | os.O_CREAT)
    seen: set[str] = set()
    real = modelstore.sha256_file

    def spy(path: Path, copy_to: int | None = None) -> str:
        seen.add(f"{path.name}:{threading.current_thread() is threading.main_thread()}")
        return real(path, copy_to)

    try:
        modelstore.sha256_file = spy
        got = modelstore.sha256_files(tmp_path, list(data), copy_to={"b.safetensors": fd})
        copied = os.pread(fd, big + 2, 0)
    finally:
        modelstore.sha256_file = real
        os.close(fd)
    assert got == {n: hashlib.sha256(b).hexdigest() for n, b in data.items()}
    assert copied == data["b.safetensors"]
    threaded = (os.cpu_count() or 1) > 1
    assert seen == {f"a.safetensors:{not threaded}", f"b.safetensors:{not threaded}", "config.json:True"}
    with pytest.raises(OSError):
        modelstore.sha256_files(tmp_path, ["a.safetensors", "b.safetensors", "missing.json"])
