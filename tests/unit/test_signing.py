"""Signed versions and announcements: Kafka and the model store are not the root of trust
(services/flywheel/core/signing.py, core/modelstore.py)."""

from __future__ import annotations

import base64
import contextlib
import json
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from flywheel.core import errors, signing
from flywheel.core.config import ConfigError
from flywheel.core.modelstore import MANIFEST, ModelStore, ModelStoreConfig
from flywheel.v1 import events_pb2


def _write(d: Path) -> None:
    (d / "weights.bin").write_bytes(b"w" * 100)
    (d / "config.json").write_text("{}")


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, str]:
    """Two key pairs: the trainer's (a PEM file) and another one (base64), with their public keys."""
    pub = signing.keygen(tmp_path / "keys")
    other = signing.Signer(signing.load_private_key(base64.b64encode(b"\x07" * 32).decode()))
    return {
        "private": str(tmp_path / "keys" / signing.KEY_FILE),
        "public": signing.public_b64(pub),
        "public_pem": str(tmp_path / "keys" / signing.PUB_FILE),
        "other_private": base64.b64encode(b"\x07" * 32).decode(),
        "other_public": signing.public_b64(other.public_key),
    }


@pytest.fixture
def trainer(tmp_path: Path, keys: dict[str, str]) -> ModelStore:
    return ModelStoreConfig(root=str(tmp_path / "store"), signing_key=keys["private"]).store()


@pytest.fixture
def consumer(tmp_path: Path, keys: dict[str, str]) -> ModelStore:
    """A policy replica's view: the trainer's public key only."""
    return ModelStoreConfig(root=str(tmp_path / "store"), trusted_keys=[keys["public"]]).store()


@contextlib.contextmanager
def refused(reason: str, match: str) -> Iterator[None]:
    """An IntegrityError matching `match` whose reason (the refusal metric's label) is `reason`."""
    with pytest.raises(errors.IntegrityError, match=match) as e:
        yield
    assert e.value.reason == reason, e.value.message


# ---------------------------------------------------------------------------- keys and config
def test_keygen_writes_a_private_key_only_its_owner_reads_and_every_form_loads(keys: dict[str, str]) -> None:
    assert stat.S_IMODE(Path(keys["private"]).stat().st_mode) == 0o600
    pem_text = Path(keys["private"]).read_text()
    assert pem_text.startswith("-----BEGIN PRIVATE KEY-----")
    from_file, from_text = signing.load_private_key(keys["private"]), signing.load_private_key(pem_text)
    assert signing.public_b64(from_file.public_key()) == signing.public_b64(from_text.public_key()) == keys["public"]
    for form in (keys["public"], keys["public_pem"], Path(keys["public_pem"]).read_text()):
        assert signing.public_b64(signing.load_public_key(form)) == keys["public"]
    assert signing.main(["public", keys["private"]]) == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"signing_key": "/nowhere/key.pem"}, "signing_key = '(hidden)': neither PEM text"),
        ({"trusted_keys": ["c2hvcnQ="]}, "trusted_keys = 'c2hvcnQ=': neither PEM text"),
        ({"require_signed": True}, "require_signed = True: set FLYWHEEL_MODEL_STORE_TRUSTED_KEYS"),
    ],
)
def test_bad_key_settings_name_the_field_and_the_fix(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        ModelStoreConfig(root=str(tmp_path), **kwargs)
    assert message in str(e.value)


def test_signatures_are_required_exactly_when_a_key_is_configured(tmp_path: Path, keys: dict[str, str]) -> None:
    root = str(tmp_path)
    assert not ModelStoreConfig(root=root).verifier().required  # a dev store: nothing to verify with
    assert ModelStoreConfig(root=root, trusted_keys=[keys["public"]]).verifier().required
    assert ModelStoreConfig(root=root, signing_key=keys["private"]).verifier().required
    assert not ModelStoreConfig(root=root, trusted_keys=[keys["public"]], require_signed=False).verifier().required


def test_config_from_env_takes_comma_separated_keys(monkeypatch, tmp_path: Path, keys: dict[str, str]) -> None:
    from flywheel.core.config import load

    monkeypatch.setenv("FLYWHEEL_MODEL_STORE_TRUSTED_KEYS", f"{keys['public']},{keys['other_public']}")
    monkeypatch.setenv("FLYWHEEL_MODEL_STORE_ROOT", str(tmp_path))
    cfg = load(ModelStoreConfig)
    assert cfg.trusted_keys == [keys["public"], keys["other_public"]] and cfg.require_signed is None
    assert sorted(cfg.verifier().keys) == sorted(
        signing.key_id(signing.load_public_key(k)) for k in (keys["public"], keys["other_public"])
    )


# ---------------------------------------------------------------------------- versions in the store
def test_a_signed_version_verifies_and_any_change_to_its_manifest_is_refused(
    trainer: ModelStore, consumer: ModelStore
) -> None:
    m = trainer.publish("policy", _write, parent=None, metrics={"kl": 0.5}, extra={"base_model": "tiny"})
    assert m.signature["key_id"] == trainer.signer.key_id  # type: ignore[union-attr]
    assert consumer.verify("policy", 0) == m.path
    p = m.path / MANIFEST  # type: ignore[operator]
    good = p.read_text()
    for key, value in (("promoted", True), ("extra", {"base_model": "evil"}), ("parent", 7)):
        data = json.loads(good)
        data[key] = value
        p.write_text(json.dumps(data))
        with refused("bad_signature", "signature by key .* does not match its contents"):
            consumer.verify("policy", 0)
    data = json.loads(good)
    data["files"]["weights.bin"]["sha256"] = "0" * 64  # a manifest rewritten to match planted weights
    p.write_text(json.dumps(data))
    with refused("bad_signature", "does not match"):
        consumer.verify("policy", 0)
    data.pop("signature")
    p.write_text(json.dumps(data))
    with refused("unsigned", "policy version 0 in the model store is unsigned"):
        consumer.load_path("policy", 0)


def test_the_trainer_re_signs_its_updates_and_no_one_else_can_change_a_signed_manifest(
    trainer: ModelStore, consumer: ModelStore
) -> None:
    trainer.publish("policy", _write, parent=None)
    trainer.mark_promoted("policy", 0, metrics={"gate.reward_mean": 1.5})
    assert consumer.verify("policy", 0)
    with pytest.raises(errors.FailedPrecondition, match="is signed and this process has no signing key"):
        consumer.update("policy", 0, promoted=False)
    assert consumer.get("policy", 0).promoted


def test_unsigned_or_other_key_versions_are_refused_where_required_and_pass_where_not(
    tmp_path: Path, keys: dict[str, str], consumer: ModelStore
) -> None:
    ModelStore(tmp_path / "store").publish("policy", _write, parent=None)  # a keyless pod's starter
    other = ModelStoreConfig(root=str(tmp_path / "store"), signing_key=keys["other_private"]).store()
    other.publish("policy", _write, parent=0)
    with refused("unsigned", "unsigned; this service accepts only versions signed by the trainer"):
        consumer.verify("policy", 0)
    with refused("unknown_key", f"signed by key '{other.signer.key_id}', which is not trusted here"):  # type: ignore[union-attr]
        consumer.verify("policy", 1)
    lax = ModelStoreConfig(root=str(tmp_path / "store"), trusted_keys=[keys["public"]], require_signed=False).store()
    assert lax.verify("policy", 0) and lax.verify("policy", 1)  # not required: unsigned, unknown key pass


def test_a_starter_published_without_the_key_is_signed_by_whoever_holds_it(
    tmp_path: Path, keys: dict[str, str], consumer: ModelStore, monkeypatch
) -> None:
    ModelStore(tmp_path / "store").publish("policy", _write, parent=None, version=0)
    monkeypatch.setenv("FLYWHEEL_MODEL_STORE_ROOT", str(tmp_path / "store"))
    monkeypatch.setenv("FLYWHEEL_MODEL_STORE_SIGNING_KEY", keys["private"])
    (consumer.version_path("policy", 0) / "weights.bin").write_bytes(b"x" * 100)
    assert signing.main(["sign", "policy", "0"]) == 1  # files that do not match the manifest: not signed
    (consumer.version_path("policy", 0) / "weights.bin").write_bytes(b"w" * 100)
    assert signing.main(["sign", "policy", "0"]) == 0
    assert consumer.verify("policy", 0)


# ---------------------------------------------------------------------------- announcements
def test_a_signed_announcement_verifies_and_every_signed_field_is_covered(
    trainer: ModelStore, consumer: ModelStore
) -> None:
    m = trainer.publish("policy", _write, parent=None, metrics={"kl": 0.5})
    u = trainer.to_update(m, "gate")
    assert len(u.signature) == 64 and u.signing_key_id == trainer.signer.key_id  # type: ignore[union-attr]
    assert consumer.from_update(u) == m.path
    for change in (
        lambda x: setattr(x, "version", 1),
        lambda x: setattr(x, "parent", 3),
        lambda x: setattr(x, "reason", "rollback"),
        lambda x: x.metrics.__setitem__("kl", 0.0),
        lambda x: setattr(x.files[0], "sha256", "0" * 64),
        lambda x: setattr(x.files[0], "size", 1),
        lambda x: x.created_at.FromSeconds(1),
    ):
        bad = events_pb2.ModelUpdate()
        bad.CopyFrom(u)
        change(bad)
        with refused("bad_signature", "the announcement of policy version .*: the signature .* does not match"):
            consumer.from_update(bad)
    stripped = events_pb2.ModelUpdate()
    stripped.CopyFrom(u)
    stripped.ClearField("signature")
    stripped.ClearField("signing_key_id")
    with refused("unsigned", "the announcement of policy version 0 is unsigned"):
        consumer.locate(stripped)


def test_an_announcement_signed_by_another_key_is_refused(tmp_path: Path, keys: dict[str, str]) -> None:
    other = ModelStoreConfig(root=str(tmp_path / "store"), signing_key=keys["other_private"]).store()
    u = other.to_update(other.publish("policy", _write, parent=None), "gate")
    consumer = ModelStoreConfig(root=str(tmp_path / "store"), trusted_keys=[keys["public"]]).store()
    with refused("unknown_key", "which is not trusted here"):
        consumer.from_update(u)


def test_a_file_uri_outside_the_store_root_is_refused_through_symlinks_and_dotdot(
    tmp_path: Path, trainer: ModelStore, consumer: ModelStore
) -> None:
    m0 = trainer.publish("policy", _write, parent=None)
    trainer.publish("policy", _write, parent=0)
    outside = tmp_path / "elsewhere" / "v000000"
    outside.mkdir(parents=True)
    _write(outside)  # the same bytes: only the uri check can tell
    link = trainer.root / "policy" / "link"
    link.symlink_to(outside)
    dotdot = f"{trainer.root}/policy/../../elsewhere/v000000"
    for uri, reason, match in (
        (outside.as_uri(), "outside_store", "outside the model store"),
        (f"file://{dotdot}", "outside_store", "outside the model store"),
        (link.as_uri(), "outside_store", "outside the model store"),
        (trainer.version_path("policy", 1).as_uri(), "bad_uri", "not to the announced version's"),
    ):
        u = trainer.to_update(m0, "gate")  # the uri is not signed: each pod mounts the store elsewhere
        u.uri = uri
        with refused(reason, match):
            consumer.from_update(u)
    u = trainer.to_update(m0, "gate")
    u.uri = "file:///mnt/other-mount/policy/v000000"  # not here: looked up by model and version
    assert consumer.from_update(u) == m0.path
    u.uri = "http://evil.example/policy"
    with pytest.raises(errors.InvalidArgument, match="only file:// is supported"):
        consumer.from_update(u)


# ---------------------------------------------------------------------------- flywheel up
def test_flywheel_up_makes_one_key_per_run_signs_the_starters_and_hands_out_the_public_key(
    tmp_path: Path, monkeypatch
) -> None:
    from flywheel.loop.supervisor import Supervisor, UpConfig, sign_starters

    monkeypatch.delenv("FLYWHEEL_MODEL_STORE_SIGNING_KEY", raising=False)
    store = tmp_path / "run" / "models"
    for name in ("policy", "reward"):
        ModelStore(store).publish(name, _write, parent=None, version=0)  # copied from the cache: unsigned
    key, public = sign_starters(store, tmp_path / "run")
    assert stat.S_IMODE(Path(key).stat().st_mode) == 0o600 and Path(key).parent == tmp_path / "run" / "keys"
    consumer = ModelStoreConfig(root=str(store), trusted_keys=[public]).store()
    assert consumer.verify("policy", 0) and consumer.verify("reward", 0)
    assert sign_starters(store, tmp_path / "run") == (key, public)  # the same key for the same run directory
    monkeypatch.setenv("FLYWHEEL_MODEL_STORE_SIGNING_KEY", key)  # set in the user's shell: not for every child
    sup = Supervisor(UpConfig(run_dir=tmp_path / "run", store=str(store), progress=False))
    sup.signing_key, sup.public_key = key, public
    env = sup.env()
    assert env["FLYWHEEL_MODEL_STORE_TRUSTED_KEYS"] == public and "FLYWHEEL_MODEL_STORE_SIGNING_KEY" not in env
    # Each child gets only the secrets it uses.
    secrets = {
        name: {k for k in sup.child_env(name, env) if k.startswith("FLYWHEEL_AUTH_") or k.endswith("SIGNING_KEY")}
        for name in ("policy", "feedback", "reward", "trainer")
    }
    assert secrets == {
        "policy": {"FLYWHEEL_AUTH_HMAC_KEY", "FLYWHEEL_AUTH_ADMIN_TOKEN_SHA256"},
        "feedback": {"FLYWHEEL_AUTH_HMAC_KEY"},
        "reward": {"FLYWHEEL_AUTH_SERVICE_TOKEN", "FLYWHEEL_MODEL_STORE_SIGNING_KEY"},
        "trainer": {"FLYWHEEL_AUTH_ADMIN_TOKEN", "FLYWHEEL_AUTH_SERVICE_TOKEN", "FLYWHEEL_MODEL_STORE_SIGNING_KEY"},
    }
