"""The swap worker's half of a hot swap: the verified bytes in memfds, mapped by the service
without a copy (the process itself runs in tests/integration/test_policy_service.py)."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flywheel.core import errors
from flywheel.core.modelstore import ModelStore
from flywheel.policy.config import EngineConfig
from flywheel.policy.kvbatch import load_model
from flywheel.policy.reload import map_safetensors, reload_weights
from flywheel.policy.swap_worker import prepare
from tests.unit.test_starter import tiny_starter


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    s = ModelStore(tmp_path / "store")
    for v in (0, 1):
        s.publish("policy", lambda d: shutil.copytree(tiny_starter(), d, dirs_exist_ok=True), parent=None, version=v)
    return s


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def mapped(snap: list[tuple[str, int, int]]) -> dict[str, torch.Tensor]:
    try:
        return map_safetensors(snap)
    finally:
        for _, fd, _ in snap:
            os.close(fd)


def test_the_verified_weights_are_mapped_once_and_become_the_new_parameters(store: ModelStore) -> None:
    fds = open_fds()
    path, snap = prepare(store, store.to_update(store.get("policy", 1), "gate"))
    assert path == store.version_path("policy", 1) and [n for n, _, _ in snap] == ["model.safetensors"]
    weights = mapped(snap)
    want = load_file(path / "model.safetensors")
    assert weights.keys() == want.keys() and all(torch.equal(weights[k], t) for k, t in want.items())
    lo = min(t.data_ptr() for t in weights.values())
    assert max(t.data_ptr() for t in weights.values()) - lo < snap[0][2]  # views of one mapping
    cur = load_model(str(store.version_path("policy", 0)), 0, EngineConfig(device="cpu"))
    new = reload_weights(cur, str(path), 1, weights=weights)
    assert new is not None and new.version == 1
    for name, p in new.model.named_parameters():  # the snapshot's pages themselves: no copy
        assert p.data_ptr() == weights[name].data_ptr(), name
    ids = torch.tensor([[1, 5, 9, 2]])
    copied = reload_weights(cur, str(path), 1)  # read from the files
    with torch.no_grad():
        assert torch.equal(new.model(ids).logits, copied.model(ids).logits)
    del weights, new, p
    assert open_fds() == fds  # the memfds are closed; the mapping went with its last tensor


def test_a_tampered_checkpoint_is_refused_and_nothing_stays_open(store: ModelStore) -> None:
    f = store.version_path("policy", 1) / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    fds = open_fds()
    with pytest.raises(errors.IntegrityError, match="sha256"):
        prepare(store, store.to_update(store.get("policy", 1), "gate"))
    assert open_fds() == fds


def test_an_unaligned_tensor_is_copied_and_an_aligned_one_is_not() -> None:
    a, b = torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([1.5, -2.0], dtype=torch.float32)
    header = {"a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]}}
    header["b"] = {"dtype": "F32", "shape": [2], "data_offsets": [3, 11]}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-aligned; b does not
    blob = struct.pack("<Q", len(text)) + text + a.numpy().tobytes() + b.numpy().tobytes()
    fd = os.memfd_create("t")
    os.write(fd, blob)
    try:
        got = map_safetensors([("t.safetensors", fd, len(blob))])
    finally:
        os.close(fd)
    assert torch.equal(got["a"], a) and torch.equal(got["b"], b)
    assert (
        got["b"].data_ptr() % 4 == 0 and got["b"].untyped_storage().data_ptr() != got["a"].untyped_storage().data_ptr()
    )


def test_weights_copied_into_another_dtype_give_their_pages_back(store: ModelStore) -> None:
    path, snap = prepare(store, store.to_update(store.get("policy", 1), "gate"))
    fd = snap[0][1]
    try:
        weights = map_safetensors(snap)
        before = os.fstat(fd).st_blocks
        cur = load_model(str(store.version_path("policy", 0)), 0, EngineConfig(device="cpu", dtype="bfloat16"))
        new = reload_weights(cur, str(path), 1, weights=weights)
        assert new is not None and {p.dtype for p in new.model.parameters()} == {torch.bfloat16}
        assert os.fstat(fd).st_blocks < before / 2  # two copies of the weights, not three
    finally:
        os.close(fd)


def test_a_helper_process_consumer_metrics_are_exported_as_the_service_own() -> None:
    from prometheus_client import REGISTRY

    from flywheel.core import bus

    labels = {"topic": "t-mirror", "group": "g-mirror"}

    def consumed() -> float:
        return REGISTRY.get_sample_value("flywheel_bus_consumed_total", labels) or 0.0

    def worker(n: float, lag: float) -> list[bus.Sample]:
        return [
            ("flywheel_bus_consumed_total", labels, n),
            ("flywheel_bus_consumer_lag", labels | {"partition": "0"}, lag),
        ]

    seen: dict[tuple, float] = {}
    bus.mirror_consumer_samples(worker(3, 2), seen)
    bus.mirror_consumer_samples(worker(5, 0), seen)
    assert consumed() == 5
    assert REGISTRY.get_sample_value("flywheel_bus_consumer_lag", labels | {"partition": "0"}) == 0
    bus.mirror_consumer_samples(worker(1, 0), {})  # a restarted worker counts from 0: the total goes on
    assert consumed() == 6
    mine = [s for s in bus.consumer_samples() if s[1] == labels]  # and this process's own samples
    assert mine == [("flywheel_bus_consumed_total", labels, 6.0)]
    errors = {"group": "g-mirror", "kind": "poll"}  # the errors its consumer loop survived, too
    bus.mirror_consumer_samples([("flywheel_bus_consumer_errors_total", errors, 2.0)], seen)
    assert REGISTRY.get_sample_value("flywheel_bus_consumer_errors_total", errors) == 2
    assert ("flywheel_bus_consumer_errors_total", errors, 2.0) in bus.consumer_samples()
