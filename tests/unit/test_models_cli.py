"""`flywheel models`: the store it opens is the configured one, so `models init` (the chart's
trainer init container) signs the starters with model_store.signing_key and `models verify`
checks signatures as the services do."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from flywheel import cli
from flywheel.core import signing
from flywheel.core.modelstore import ModelStore


def write(d: Path) -> None:
    (d / "weights.bin").write_bytes(b"w")


def test_the_models_store_signs_with_the_configured_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pub = signing.keygen(tmp_path / "keys")
    monkeypatch.setenv("FLYWHEEL_MODEL_STORE_SIGNING_KEY", str(tmp_path / "keys" / signing.KEY_FILE))
    store = cli._models_store(argparse.Namespace(store=str(tmp_path / "models")))
    assert store.root == tmp_path / "models"
    m = store.publish("policy", write, parent=None, version=0)  # what ensure_starter does
    assert m.signature["key_id"] == signing.key_id(pub)


def test_models_verify_checks_the_signature(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pub = signing.keygen(tmp_path / "keys")
    ModelStore(tmp_path / "models").publish("policy", write, parent=None, version=0)  # unsigned
    assert cli.main(["models", "--store", str(tmp_path / "models"), "verify", "policy", "0"]) == 0  # no keys
    monkeypatch.setenv("FLYWHEEL_MODEL_STORE_TRUSTED_KEYS", signing.public_b64(pub))
    assert cli.main(["models", "--store", str(tmp_path / "models"), "verify", "policy", "0"]) == 1
    assert "FAILED: policy version 0 in the model store is unsigned" in capsys.readouterr().err
