"""The trainer's state.pt is never unpickled: plain values only, read with weights_only=True
(services/flywheel/trainer/state.py)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from flywheel.core import errors
from flywheel.trainer import state


def _saved(config: dict) -> state.SavedState:
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    head(torch.randn(2, 4)).sum().backward()
    opt.step()
    return state.SavedState(
        step=7,
        version=3,
        serving_version=2,
        value_head=head.state_dict(),
        optimizer=opt.state_dict(),
        kl_ctl={"value": 0.1, "target": 6.0, "horizon": 10000, "floor": 0.0},
        moments={"mean": np.float64(0.25), "var": 1.5, "count": np.int64(40)},  # numpy numbers from a reduction
        rng=state.RngState.capture(),
        offsets={"flywheel.interactions:0": 12},
        metrics={"loss": np.float32(0.5)},
        config=config,
    )


def test_state_round_trips_through_a_plain_file(tmp_path: Path) -> None:
    saved = _saved({"model": "policy", "init_path": Path("/models/init"), "algo": "ppo"})
    state.save_state(tmp_path, saved)
    torch.load(tmp_path / state.STATE_FILE, weights_only=True)  # nothing but plain values in it
    back = state.load_state(tmp_path)
    assert back is not None and (back.step, back.version, back.serving_version) == (7, 3, 2)
    assert all(torch.equal(back.value_head[k], v) for k, v in saved.value_head.items())
    assert back.optimizer["param_groups"] == saved.optimizer["param_groups"]
    exp_avg = saved.optimizer["state"][0]["exp_avg"]
    assert torch.equal(back.optimizer["state"][0]["exp_avg"], exp_avg)
    assert back.moments == {"mean": 0.25, "var": 1.5, "count": 40} and type(back.moments["count"]) is int
    assert back.metrics == {"loss": 0.5} and back.config["init_path"] == "/models/init"
    assert back.offsets == saved.offsets
    random.random()
    back.rng.restore()  # the RNG state came back usable
    saved.rng.restore()
    want = random.random()
    back.rng.restore()
    assert random.random() == want


def test_a_file_written_before_the_rule_with_plain_values_still_loads(tmp_path: Path) -> None:
    saved = _saved({"model": "policy"})
    saved.moments, saved.metrics = {"mean": 0.25, "var": 1.5, "count": 40}, {"loss": 0.5}
    torch.save(saved.to_dict(), tmp_path / state.STATE_FILE)  # what save_state wrote before
    back = state.load_state(tmp_path)
    assert back is not None and back.step == 7


class _RunsCode:
    """What a planted state.pt could hold: unpickling it would call touch(marker)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.marker,))


def test_a_state_file_with_objects_is_refused_and_nothing_in_it_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    data = _saved({"model": "policy"}).to_dict() | {"config": {"x": _RunsCode(marker)}}
    torch.save(data, tmp_path / state.STATE_FILE)
    with pytest.raises(errors.FailedPrecondition) as e:
        state.load_state(tmp_path)
    assert "holds more than tensors and plain values" in e.value.message
    assert "Unsupported global" in e.value.message and "Move it away" in e.value.message
    assert not marker.exists()
    (tmp_path / state.STATE_FILE).write_bytes(b"not a torch file at all")
    with pytest.raises(errors.FailedPrecondition, match="holds more than tensors"):
        state.load_state(tmp_path)
