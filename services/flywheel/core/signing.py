"""Ed25519 signatures on model versions: Kafka and the model store are not the root of trust.

A pod that can write to Kafka or to the model store (a compromised policy pod) could otherwise
announce, or overwrite, weights that every replica then serves. So a version counts only if the
process that published it (the trainer, the reward trainer) signed it with a private key that no
consumer holds: consumers hold public keys only, and cannot forge what they verify.

Two things are signed, each over a canonical JSON form (sorted keys, no spaces) behind a domain
tag, so that one kind of signature is never accepted for the other:

- "manifest": a version's `manifest.json` as a whole (model, version, parent, every file's sha256
  and size, metrics, promotion, extra such as the lineage or the base model), except the signature.
  A service that loads from the store (start-up, GeneratePair's candidate) checks it.
- "announcement": a ModelUpdate (model, version, parent, every file's path, sha256 and size,
  metrics, created_at and reason). Its uri is not signed: it depends on where each pod mounts the
  store, and is checked against the consumer's own store root instead (`ModelStore.locate`).

Keys are configured in `ModelStoreConfig` (signing_key, trusted_keys, require_signed). Key files:

    python -m flywheel.core.signing keygen DIR          # DIR/model-signing.key (0600) and .pub
    python -m flywheel.core.signing public KEY          # a private key's public key, in base64
    python -m flywheel.core.signing sign MODEL VERSION  # sign a version already in the store (a starter)
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from flywheel.core import errors

log = logging.getLogger(__name__)

DOMAIN = b"flywheel model signature v1\n"
KINDS = ("manifest", "announcement")
KEY_FILE, PUB_FILE = "model-signing.key", "model-signing.pub"


def canonical(kind: str, fields: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: the domain tag, the kind, then `fields` as canonical JSON."""
    if kind not in KINDS:
        raise ValueError(f"unknown signature kind {kind!r}")
    body = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return DOMAIN + kind.encode() + b"\n" + body.encode()


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    """A short, stable name of a public key (it travels with each signature)."""
    return hashlib.sha256(raw_public(key)).hexdigest()[:16]


def public_b64(key: Ed25519PublicKey) -> str:
    """The raw public key in base64: the form `model_store.trusted_keys` takes in an env variable."""
    return base64.b64encode(raw_public(key)).decode()


def _raw32(text: str) -> bytes | None:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == 32 else None


def _key_material(value: str) -> bytes:
    """PEM bytes or a raw 32-byte key from PEM text, base64 of the raw key, or a file holding either."""
    v = value.strip()
    if v.startswith("-----BEGIN"):
        return v.encode()
    raw = _raw32(v)
    if raw is not None:
        return raw
    path = Path(v).expanduser()
    if not path.is_file():
        raise ValueError("neither PEM text, a base64 32-byte key, nor a readable file")
    data = path.read_bytes()
    return data if data.lstrip().startswith(b"-----BEGIN") else (_raw32(data.decode(errors="replace")) or data)


def load_private_key(value: str) -> Ed25519PrivateKey:
    """An Ed25519 private key (see `_key_material` for the forms); ValueError says what is wrong."""
    data = _key_material(value)
    if len(data) == 32:
        return Ed25519PrivateKey.from_private_bytes(data)
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"a {type(key).__name__}, not an Ed25519 private key")
    path = Path(value.strip()).expanduser()
    if not value.strip().startswith("-----BEGIN") and path.is_file() and path.stat().st_mode & 0o077:
        log.warning("the model signing key %s is readable by other users: chmod 600 it", path)
    return key


def load_public_key(value: str) -> Ed25519PublicKey:
    """An Ed25519 public key: PEM text, base64 of the raw 32 bytes, or a file holding either."""
    data = _key_material(value)
    if len(data) == 32:
        return Ed25519PublicKey.from_public_bytes(data)
    key = serialization.load_pem_public_key(data)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"a {type(key).__name__}, not an Ed25519 public key")
    return key


@dataclass(frozen=True)
class Signature:
    key_id: str
    value: bytes  # 64 bytes

    def to_json(self) -> dict[str, str]:
        return {"key_id": self.key_id, "ed25519": base64.b64encode(self.value).decode()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Signature | None:
        if not data:
            return None
        try:
            return cls(str(data["key_id"]), base64.b64decode(str(data["ed25519"]), validate=True))
        except (KeyError, TypeError, binascii.Error, ValueError):
            return cls(str(data.get("key_id", "")), b"")  # malformed: fails as a bad signature


class Signer:
    """Signs with the publisher's private key."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public_key = key.public_key()
        self.key_id = key_id(self.public_key)

    def sign(self, kind: str, fields: Mapping[str, Any]) -> Signature:
        return Signature(self.key_id, self._key.sign(canonical(kind, fields)))


class Verifier:
    """Checks signatures against the trusted public keys.

    `required`: an unsigned version, or one signed by a key not trusted here, is refused. Not
    required (a dev store without keys): those pass, but a signature by a trusted key must match.
    """

    def __init__(self, keys: Iterable[Ed25519PublicKey] = (), required: bool = False) -> None:
        self.keys = {key_id(k): k for k in keys}
        self.required = required
        if required and not self.keys:
            raise ValueError("signatures are required but no public key is trusted")

    def check(self, kind: str, fields: Mapping[str, Any], sig: Signature | None, what: str) -> None:
        """Return if `sig` signs `fields` (or is allowed to be missing); else IntegrityError whose
        reason (unsigned, unknown_key, bad_signature) labels the refusal's metric."""
        if sig is None or not sig.key_id:
            if self.required:
                raise errors.IntegrityError(
                    f"{what} is unsigned; this service accepts only versions signed by the trainer "
                    "(model_store.require_signed): publish it where model_store.signing_key is set, or sign "
                    "a version already in the store there (python -m flywheel.core.signing sign MODEL VERSION)",
                    reason="unsigned",
                )
            return
        key = self.keys.get(sig.key_id)
        if key is None:
            if self.required:
                trusted = ", ".join(sorted(self.keys))
                raise errors.IntegrityError(
                    f"{what} is signed by key {sig.key_id!r}, which is not trusted here "
                    f"(model_store.trusted_keys: {trusted})",
                    reason="unknown_key",
                )
            return
        try:
            key.verify(sig.value, canonical(kind, fields))
        except InvalidSignature:
            raise errors.IntegrityError(
                f"{what}: the signature by key {sig.key_id!r} does not match its contents (changed after signing)",
                reason="bad_signature",
            ) from None

    def settings(self) -> dict[str, Any]:
        """What `from_settings` rebuilds it from (sent to the policy's swap worker process)."""
        return {"keys": [public_b64(k) for k in self.keys.values()], "required": self.required}

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> Verifier:
        return cls([load_public_key(k) for k in settings.get("keys", [])], bool(settings.get("required")))


# ---------------------------------------------------------------------------- command line
def keygen(directory: Path) -> Ed25519PublicKey:
    """A new key pair in `directory`: the private key readable by its owner only."""
    directory.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(directory / KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub = key.public_key()
    (directory / PUB_FILE).write_bytes(
        pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return pub


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flywheel.core.signing", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("keygen", help=f"write DIR/{KEY_FILE} (0600) and DIR/{PUB_FILE}").add_argument("dir", type=Path)
    sub.add_parser("public", help="print a private key's public key in base64").add_argument("key")
    s = sub.add_parser("sign", help="sign a version in the store (FLYWHEEL_MODEL_STORE_ROOT, _SIGNING_KEY)")
    s.add_argument("model")
    s.add_argument("version", type=int)
    args = p.parse_args(argv)
    if args.cmd == "keygen":
        pub = keygen(args.dir)
        print(f"wrote {args.dir / KEY_FILE} and {args.dir / PUB_FILE}; public key (model_store.trusted_keys):")
        print(public_b64(pub))
    elif args.cmd == "public":
        print(public_b64(load_private_key(args.key).public_key()))
    else:
        from flywheel.core.config import load
        from flywheel.core.modelstore import ModelStoreConfig

        try:
            m = load(ModelStoreConfig).store().sign(args.model, args.version)
        except errors.FlywheelError as e:
            print(f"error: {e.message}", file=sys.stderr)
            return 1
        print(f"signed {m.model} version {m.version} with key {m.signature['key_id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
