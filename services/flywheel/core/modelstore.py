"""Versioned, self-verifying checkpoints in a directory (the model store).

Layout (docs/ARCHITECTURE.md, 'Kafka carries pointers, not weights')::

    <root>/<model>/v000003/            save_pretrained safetensors, tokenizer, extra files
    <root>/<model>/v000003/manifest.json   version, parent, sha256 + size per file, metrics, ...
    <root>/<model>/v000004/            an adapter version: adapter_model.safetensors and
                                       adapter_config.json (PEFT's layout) and the tokenizer; its
                                       manifest's extra["base"] names the full version it applies to
    <root>/<model>/.tmp-*              a publish in progress (or interrupted): never listed
    <root>/<model>/.lock               serialises version numbering between publishers

A version directory appears only by an atomic rename of a complete, hashed, fsynced temp
directory, so a reader sees either the whole version or nothing. Consumers call `verify` (or
`from_update` with a ModelUpdate) before `from_pretrained`.

Neither the store nor Kafka is trusted (flywheel.core.signing): a store with a signing key signs
each manifest and announcement it writes; `verify`, `locate` and `from_update` check the signature
(`ModelStoreConfig.require_signed`), a `file://` uri that leads outside the store's root, and every
file's sha256 and size, and refuse with an IntegrityError whose `reason` labels the refusal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, ClassVar
from urllib.parse import unquote, urlparse

from flywheel.core import errors
from flywheel.core.config import require, setting
from flywheel.core.signing import Signature, Signer, Verifier, load_private_key, load_public_key
from flywheel.v1 import events_pb2

MANIFEST = "manifest.json"
_VERSION_DIR = re.compile(r"^v(\d{6,})$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_MANIFEST_TMP = re.compile(rf"^\.{re.escape(MANIFEST)}\..*\.tmp$")  # leftover of an interrupted rewrite
_STALE_TMP_S = 24 * 3600.0  # a .tmp-* dir this old is abandoned even if its owner cannot be checked
_HOST = socket.gethostname()
# Weights are saved in shards of at most this size, so that hashing a checkpoint (publish and
# every consumer's verify) runs one thread per shard: sha256 is serial within a file, ~2 GB/s
# a core, several times slower than reading the same bytes from the page cache.
MAX_SHARD_SIZE = "512MB"


def save_pretrained(model: Any, tokenizer: Any, out: str | os.PathLike) -> None:
    """A Hugging Face model and its tokenizer as a model-store version's files (safetensors, sharded)."""
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)
    tokenizer.save_pretrained(str(out))


@dataclasses.dataclass
class ModelStoreConfig:
    """Where checkpoints live and how many are kept."""

    SECTION: ClassVar[str] = "model_store"

    root: str = setting(
        "~/.cache/flywheel/models",
        "Model store directory (a local disk or a volume shared by trainer, policy and reward).",
        alias="FLYWHEEL_MODEL_STORE",
    )
    keep_last: int = setting(
        5,
        "Versions kept per model by retention, besides every promoted one and the starter (v0).",
    )
    signing_key: str = setting(
        "",
        "Ed25519 private key that signs the versions this process publishes and their announcements "
        "(trainer and reward trainer only): a PEM file's path, PEM text, or the raw key in base64. Empty: "
        "nothing is signed. `python -m flywheel.core.signing keygen DIR` makes a pair.",
    )
    trusted_keys: list[str] = setting(
        [],
        "Ed25519 public keys whose signatures are accepted, comma-separated: PEM files' paths or raw keys "
        "in base64. The signing key's own is always trusted. While rotating, list the old and the new key.",
    )
    require_signed: bool | None = setting(
        None,
        "Refuse versions and announcements that are unsigned or signed by a key not trusted here. "
        "Empty: required exactly when a key is configured (signing_key or trusted_keys).",
    )

    def __post_init__(self) -> None:
        n = type(self).__name__
        require(bool(self.root.strip()), n, "root", self.root, "set FLYWHEEL_MODEL_STORE_ROOT to a directory")
        require(self.keep_last >= 1, n, "keep_last", self.keep_last, "use 1 or more (the latest is always kept)")
        try:
            self.signer()
        except ValueError as e:
            require(False, n, "signing_key", "(hidden)", f"{e}: give an Ed25519 private key (PEM or base64)")
        for k in self.trusted_keys:
            try:
                load_public_key(k)
            except ValueError as e:
                require(False, n, "trusted_keys", k, f"{e}: give Ed25519 public keys (PEM files or base64)")
        no_keys = not self.signing_key.strip() and not self.trusted_keys
        require(
            not (self.require_signed and no_keys),
            n,
            "require_signed",
            self.require_signed,
            "set FLYWHEEL_MODEL_STORE_TRUSTED_KEYS to the trainer's public key(s) (nothing could be verified)",
        )

    def signer(self) -> Signer | None:
        return Signer(load_private_key(self.signing_key)) if self.signing_key.strip() else None

    def verifier(self) -> Verifier:
        signer = self.signer()
        keys = [load_public_key(k) for k in self.trusted_keys] + ([signer.public_key] if signer else [])
        return Verifier(keys, required=bool(keys) if self.require_signed is None else self.require_signed)

    def store(self) -> ModelStore:
        return ModelStore(Path(self.root).expanduser(), signer=self.signer(), verifier=self.verifier())


def files_digest(files: Mapping[str, Mapping[str, Any]]) -> str:
    """sha256 over a version's (path, sha256, size) list: names its weights exactly, and does not change
    when its manifest is rewritten (promotion, gate verdict, metrics)."""
    rows = [[rel, d["sha256"], int(d["size"])] for rel, d in sorted(files.items())]
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class BaseRef:
    """The full version an adapter version applies to: model, version and `files_digest` of its files."""

    model: str
    version: int
    files_sha256: str

    @classmethod
    def of(cls, m: Manifest) -> BaseRef:
        return cls(m.model, m.version, files_digest(m.files))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BaseRef:
        return cls(str(d["model"]), int(d["version"]), str(d["files_sha256"]))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return f"{self.model} v{self.version} (files sha256 {self.files_sha256[:12]})"


@dataclasses.dataclass
class Manifest:
    """What a version directory holds and where it came from; `manifest.json` on disk."""

    model: str
    version: int
    parent: int | None
    created_at: float  # unix seconds
    files: dict[str, dict[str, Any]]  # relpath -> {"sha256": hex, "size": bytes}
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    promoted: bool = False
    gate: str = ""  # why it was promoted (e.g. "gate", "manual_promote")
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # lineage, trainer config, ...
    signature: dict[str, str] = dataclasses.field(default_factory=dict)  # flywheel.core.signing.Signature
    path: Path | None = dataclasses.field(default=None, compare=False)  # set when read from disk

    @property
    def base(self) -> BaseRef | None:
        """The full version an adapter version applies to; None for full weights."""
        b = self.extra.get("base")
        return BaseRef.from_dict(b) if isinstance(b, dict) else None

    @property
    def kind(self) -> str:
        """ "adapter" (a PEFT adapter over `base`) or "full" (whole weights)."""
        return "adapter" if self.base is not None else "full"

    @property
    def bytes(self) -> int:
        """What the version's files take in the store."""
        return sum(int(d.get("size", 0)) for d in self.files.values())

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data.pop("path")
        return json.dumps(data, indent=2, sort_keys=True)

    def signed_fields(self) -> dict[str, Any]:
        """What its signature covers: everything but the signature, as manifest.json has it."""
        data = json.loads(self.to_json())
        data.pop("signature")
        return data

    @classmethod
    def from_json(cls, text: str, path: Path | None = None) -> Manifest:
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)} - {"path"}
        data = {k: v for k, v in data.items() if k in known}  # newer writers may add keys
        data["metrics"] = {k: float(v) for k, v in (data.get("metrics") or {}).items()}
        return cls(**data, path=path)


def version_dir_name(version: int) -> str:
    return f"v{version:06d}"


def sha256_file(path: Path, copy_to: int | None = None) -> str:
    """sha256 of a file; `copy_to`: a file descriptor that also gets every byte, from the same read."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            if copy_to is not None:
                os.write(copy_to, chunk)
    return h.hexdigest()


PARALLEL_HASH_BYTES = 8 << 20  # smaller files are hashed in the caller's thread: a thread costs more


def sha256_files(root: Path, rels: Iterable[str], copy_to: Mapping[str, int] | None = None) -> dict[str, str]:
    """sha256 of each file under root; big files (shards) one thread each (hashlib and os.write
    release the GIL on big reads); `copy_to`: file descriptors that also get the bytes of the files
    they are named for."""
    rels, copy_to = list(rels), copy_to or {}

    def size(rel: str) -> int:
        try:
            return os.stat(root / rel).st_size
        except OSError:  # sha256_file raises it below
            return 0

    big = [rel for rel in rels if size(rel) >= PARALLEL_HASH_BYTES]
    big = big if len(big) > 1 and (os.cpu_count() or 1) > 1 else []
    out = {}
    with ThreadPoolExecutor(max(1, min(len(big), os.cpu_count() or 1)), thread_name_prefix="sha256") as pool:
        futures = {rel: pool.submit(sha256_file, root / rel, copy_to.get(rel)) for rel in big}
        for rel in rels:
            out[rel] = futures[rel].result() if rel in futures else sha256_file(root / rel, copy_to.get(rel))
    return out


def _walk_files(root: Path) -> list[str]:
    """Every regular file below root as a posix relpath, manifest excluded."""
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_symlink() or p.is_file():
            rel = p.relative_to(root).as_posix()
            if rel != MANIFEST and not _MANIFEST_TMP.match(rel):
                out.append(rel)
    return out


def _owner_is_dead(tmp_name: str) -> bool:
    """True when `.tmp-<host>-<pid>-*` was made on this host by a process that no longer runs."""
    prefix = f".tmp-{_HOST}-"
    if not tmp_name.startswith(prefix):
        return False
    pid_text = tmp_name[len(prefix) :].split("-", 1)[0]
    if not pid_text.isdigit() or int(pid_text) == os.getpid():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write `path` via `write(file)` into a temp file + fsync + rename + directory fsync, so a
    crash leaves the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _write_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode()))


Digests = Callable[[Path, Iterable[str]], dict[str, str]]  # (root, relpaths) -> sha256 of each


def verify_dir(path: Path, expected: dict[str, dict[str, Any]], digests: Digests = sha256_files) -> Path:
    """Check that `path` holds exactly the files in `expected` with their sha256 and size.
    `digests` hashes them (a hot swap's also copies the weights in the same read)."""
    path = Path(path)
    if not path.is_dir():
        raise errors.IntegrityError(f"checkpoint directory {str(path)!r} does not exist", reason="missing")
    for rel, want in sorted(expected.items()):
        f = path / rel
        if not f.is_file():
            raise errors.IntegrityError(f"checkpoint {path}: file {rel!r} is missing", reason="tampered")
        size = f.stat().st_size
        if "size" in want and size != int(want["size"]):
            raise errors.IntegrityError(
                f"checkpoint {path}: file {rel!r} has {size} bytes, manifest says {want['size']}", reason="tampered"
            )
    for rel, got in sorted(digests(path, expected).items()):
        want = expected[rel]["sha256"]
        if got != want:
            raise errors.IntegrityError(
                f"checkpoint {path}: file {rel!r} has sha256 {got[:12]}..., manifest says {want[:12]}...",
                reason="tampered",
            )
    extra = sorted(set(_walk_files(path)) - set(expected))
    if extra:
        raise errors.IntegrityError(
            f"checkpoint {path}: unexpected file(s) not in the manifest: {', '.join(extra)}", reason="tampered"
        )
    return path


def verify_digests(
    path: str | os.PathLike, expected: Iterable[events_pb2.FileDigest], digests: Digests = sha256_files
) -> Path:
    """`verify_dir` with the FileDigest list of a ModelUpdate (a consumer that came from Kafka)."""
    want = {d.path: {"sha256": d.sha256, "size": d.size} for d in expected}
    if not want:
        raise errors.IntegrityError(
            f"checkpoint {path}: the update lists no files, refusing to load unverified", reason="tampered"
        )
    return verify_dir(Path(path), want, digests)


def announcement_fields(u: events_pb2.ModelUpdate) -> dict[str, Any]:
    """What an announcement's signature covers (not its uri: each pod mounts the store elsewhere).
    An adapter's base is covered too (only when it is one, so whole-weight announcements signed
    before adapters existed verify unchanged)."""
    fields: dict[str, Any] = {
        "model": u.model,
        "version": u.version,
        "parent": u.parent,
        "files": [[d.path, d.sha256, d.size] for d in u.files],
        "metrics": dict(u.metrics),
        "created_at_ns": u.created_at.ToNanoseconds(),
        "reason": u.reason,
    }
    if u.adapter:
        fields["base"] = [u.base.model, u.base.version, u.base.files_sha256]
    return fields


def update_base(u: events_pb2.ModelUpdate) -> BaseRef | None:
    """The base an announced adapter applies to; None for whole weights."""
    return BaseRef(u.base.model, u.base.version, u.base.files_sha256) if u.adapter else None


class ModelStore:
    """Checkpoints of named models under one root; safe for several processes on one filesystem.

    `signer`: signs what this process publishes and announces (the trainers); `verifier`: what a
    version must be signed with to load (default: nothing required, the signer's key trusted).
    """

    def __init__(self, root: str | os.PathLike, signer: Signer | None = None, verifier: Verifier | None = None) -> None:
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self.signer = signer
        self.verifier = verifier or Verifier([signer.public_key] if signer else [])

    # ------------------------------------------------------------------ paths and locking

    def model_dir(self, model: str) -> Path:
        if not _NAME.match(model or ""):
            raise errors.InvalidArgument(f"model name {model!r}: use letters, digits, '.', '_' and '-'")
        return self.root / model

    def models(self) -> list[str]:
        """Names of the models that have a folder in the store."""
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _NAME.match(p.name))

    def version_path(self, model: str, version: int) -> Path:
        return self.model_dir(model) / version_dir_name(version)

    @contextlib.contextmanager
    def _lock(self, model: str) -> Iterator[None]:
        """An exclusive flock per model: numbering and manifest rewrites never interleave."""
        d = self.model_dir(model)
        d.mkdir(parents=True, exist_ok=True)
        with open(d / ".lock", "a+") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _versions_on_disk(self, model: str) -> list[int]:
        d = self.model_dir(model)
        if not d.is_dir():
            return []
        out = []
        for p in d.iterdir():
            m = _VERSION_DIR.match(p.name)
            if m and (p / MANIFEST).is_file():
                out.append(int(m.group(1)))
        return sorted(out)

    # ------------------------------------------------------------------ publish

    def publish(
        self,
        model: str,
        write_fn: Callable[[Path], Any],
        parent: int | None,
        metrics: dict[str, float] | None = None,
        version: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Manifest:
        """Write a new version atomically; `write_fn(tmp_dir)` writes its files.

        `version=None` takes max existing + 1 (0 for the first); an explicit version (e.g. 0 for
        the starter) must not exist yet. If write_fn raises, nothing is published.
        """
        d = self.model_dir(model)
        d.mkdir(parents=True, exist_ok=True)
        self.clean_tmp(model)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{_HOST}-{os.getpid()}-", dir=d))
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; readers on a shared volume may be another uid
        try:
            write_fn(tmp)
            if (tmp / MANIFEST).exists():
                raise errors.InvalidArgument(f"write_fn wrote {MANIFEST!r}; that name belongs to the store")
            rels = _walk_files(tmp)
            for rel in rels:
                f = tmp / rel
                if f.is_symlink():
                    raise errors.InvalidArgument(f"write_fn left a symlink {rel!r}; write regular files")
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
            digests = sha256_files(tmp, rels)
            files = {rel: {"sha256": digests[rel], "size": (tmp / rel).stat().st_size} for rel in rels}
            if not files:
                raise errors.InvalidArgument(f"publish of {model!r}: write_fn wrote no files")
            with self._lock(model):
                existing = self._versions_on_disk(model)
                if version is None:
                    v = existing[-1] + 1 if existing else 0
                else:
                    v = int(version)
                    if v < 0 or v in existing or (self.version_path(model, v)).exists():
                        raise errors.FailedPrecondition(
                            f"{model} version {v} already exists (or is negative); known: {existing}"
                        )
                manifest = Manifest(
                    model=model,
                    version=v,
                    parent=parent,
                    created_at=time.time(),
                    files=files,
                    metrics={k: float(x) for k, x in (metrics or {}).items()},
                    extra=dict(extra or {}),
                )
                self._sign(manifest)
                _write_atomic(tmp / MANIFEST, manifest.to_json())
                _fsync_dir(tmp)
                final = self.version_path(model, v)
                os.rename(tmp, final)  # atomic on POSIX; fails if final exists and is non-empty
                _fsync_dir(d)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        manifest.path = final
        return manifest

    def clean_tmp(self, model: str, older_than_s: float = _STALE_TMP_S) -> int:
        """Delete .tmp-* dirs of interrupted publishes; returns how many.

        A dir made on this host by a process that is gone is deleted at once; any other one
        (another host's, or unnamed) only when older than `older_than_s`.
        """
        d = self.model_dir(model)
        n = 0
        if not d.is_dir():
            return 0
        for p in d.glob(".tmp-*"):
            with contextlib.suppress(FileNotFoundError):
                if _owner_is_dead(p.name) or time.time() - p.stat().st_mtime >= older_than_s:
                    shutil.rmtree(p, ignore_errors=True)
                    n += 1
        return n

    # ------------------------------------------------------------------ read

    def get(self, model: str, version: int) -> Manifest:
        """The manifest of one version, or errors.NotFound listing the known versions."""
        p = self.version_path(model, version) / MANIFEST
        try:
            text = p.read_text()
        except FileNotFoundError:
            known = self._versions_on_disk(model)
            raise errors.NotFound(
                f"{model} version {version} is not in the model store {self.root}; known versions: {known or 'none'}"
            ) from None
        try:
            return Manifest.from_json(text, path=p.parent)
        except (ValueError, TypeError) as e:
            raise errors.IntegrityError(f"manifest {p} is unreadable: {e}") from None

    def list_versions(self, model: str) -> list[Manifest]:
        return [self.get(model, v) for v in self._versions_on_disk(model)]

    def latest(self, model: str, promoted_only: bool = False) -> Manifest | None:
        """The newest version (or newest promoted one), None when there is none."""
        for v in reversed(self._versions_on_disk(model)):
            m = self.get(model, v)
            if m.promoted or not promoted_only:
                return m
        return None

    def verify(self, model: str, version: int) -> Path:
        """The version's directory after checking its manifest's signature and every file against it."""
        m = self.get(model, version)
        what = f"{model} version {version} in the model store"
        self.verifier.check("manifest", m.signed_fields(), Signature.from_json(m.signature), what)
        return verify_dir(self.version_path(model, version), m.files)

    def load_path(self, model: str, version: int | None = None) -> Path:
        """A verified directory ready for `from_pretrained` (the latest version when None)."""
        if version is None:
            m = self.latest(model)
            if m is None:
                raise errors.NotFound(f"model {model!r} has no versions in the model store {self.root}")
            version = m.version
        return self.verify(model, version)

    # ------------------------------------------------------------------ update manifests

    def update(
        self,
        model: str,
        version: int,
        *,
        metrics: dict[str, float] | None = None,
        promoted: bool | None = None,
        gate: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Manifest:
        """Merge metrics/extra and set promoted/gate; the manifest is rewritten atomically."""
        with self._lock(model):
            m = self.get(model, version)
            m.metrics.update({k: float(x) for k, x in (metrics or {}).items()})
            m.extra.update(extra or {})
            if promoted is not None:
                m.promoted = promoted
            if gate is not None:
                m.gate = gate
            if self.signer is None and m.signature:
                raise errors.FailedPrecondition(
                    f"{model} version {version} is signed and this process has no signing key "
                    "(model_store.signing_key): only its publisher can change its manifest"
                )
            self._sign(m)
            _write_atomic(self.version_path(model, version) / MANIFEST, m.to_json())
        return m

    def sign(self, model: str, version: int) -> Manifest:
        """Sign a version already in the store (a starter copied or built by a process without the
        key), after checking its files against its manifest: whoever runs this vouches for it."""
        if self.signer is None:
            raise errors.FailedPrecondition("no signing key: set FLYWHEEL_MODEL_STORE_SIGNING_KEY")
        with self._lock(model):
            m = self.get(model, version)
            verify_dir(self.version_path(model, version), m.files)
            self._sign(m)
            _write_atomic(self.version_path(model, version) / MANIFEST, m.to_json())
        return m

    def _sign(self, m: Manifest) -> None:
        if self.signer is not None:
            m.signature = self.signer.sign("manifest", m.signed_fields()).to_json()

    def mark_promoted(
        self, model: str, version: int, gate: str = "gate", metrics: dict[str, float] | None = None
    ) -> Manifest:
        return self.update(model, version, promoted=True, gate=gate, metrics=metrics)

    def retain(self, model: str, keep_last: int) -> list[int]:
        """Delete old versions except the last `keep_last`, every promoted one, version 0, and every
        base that a version kept here or any version of another model applies to (adapters).

        Returns the deleted versions. A version is first renamed to a .tmp-* name, so a reader
        never sees half of one.
        """
        if keep_last < 1:
            raise errors.InvalidArgument(f"keep_last = {keep_last}: use 1 or more (the latest is always kept)")
        deleted = []
        with self._lock(model):
            versions = self._versions_on_disk(model)
            manifests = {v: self.get(model, v) for v in versions}
            keep = set(versions[-keep_last:]) | {0} | {v for v, m in manifests.items() if m.promoted}
            keep |= {b.version for v in keep if (b := manifests[v].base) is not None and b.model == model}
            keep |= self._bases_used_by_other_models(model)
            for v in versions:
                if v in keep:
                    continue
                src = self.version_path(model, v)
                trash = self.model_dir(model) / f".tmp-{_HOST}-{os.getpid()}-deleting-{version_dir_name(v)}"
                os.rename(src, trash)
                shutil.rmtree(trash, ignore_errors=True)
                deleted.append(v)
        return deleted

    def _bases_used_by_other_models(self, model: str) -> set[int]:
        """Versions of `model` that a version of another model in this store applies to."""
        out = set()
        for other in self.models():
            if other != model:
                for m in self.list_versions(other):
                    if m.base is not None and m.base.model == model:
                        out.add(m.base.version)
        return out

    # ------------------------------------------------------------------ announcements

    def to_update(self, manifest: Manifest, reason: str) -> events_pb2.ModelUpdate:
        """The ModelUpdate that announces `manifest` on Kafka (a pointer plus digests, no weights)."""
        path = manifest.path or self.version_path(manifest.model, manifest.version)
        msg = events_pb2.ModelUpdate(
            model=manifest.model,
            version=manifest.version,
            parent=manifest.parent if manifest.parent is not None else 0,
            uri=Path(path).resolve().as_uri(),
            files=[
                events_pb2.FileDigest(path=rel, sha256=d["sha256"], size=int(d["size"]))
                for rel, d in sorted(manifest.files.items())
            ],
            metrics=manifest.metrics,
            reason=reason,
        )
        base = manifest.base
        if base is not None:
            msg.adapter = True
            msg.base.model, msg.base.version, msg.base.files_sha256 = base.model, base.version, base.files_sha256
        msg.created_at.FromNanoseconds(int(manifest.created_at * 1e9))
        if self.signer is not None:
            sig = self.signer.sign("announcement", announcement_fields(msg))
            msg.signature, msg.signing_key_id = sig.value, sig.key_id
        return msg

    def from_update(self, update: events_pb2.ModelUpdate) -> Path:
        """The verified local directory a ModelUpdate points to (signature, uri and its own digests)."""
        return verify_digests(self.locate(update), update.files)

    def locate(self, update: events_pb2.ModelUpdate) -> Path:
        """The local directory a ModelUpdate points to once its signature and uri are checked; its
        files are NOT hashed here (see `from_update`).

        A `file://` uri that exists must resolve (symlinks and '..' too) to the announced version's
        directory in this store: one that leads elsewhere is refused. One that does not exist here
        (the store is mounted at another path) is looked up by model and version in this store.
        """
        sig = Signature(update.signing_key_id, update.signature) if update.signing_key_id else None
        what = f"the announcement of {update.model} version {update.version}"
        self.verifier.check("announcement", announcement_fields(update), sig, what)
        path = self.version_path(update.model, update.version)
        if update.uri:
            parsed = urlparse(update.uri)
            if parsed.scheme not in ("file", ""):
                raise errors.InvalidArgument(
                    f"model update uri {update.uri!r}: only file:// is supported", reason="bad_uri"
                )
            candidate = Path(unquote(parsed.path))
            if candidate.exists():
                self._check_inside(candidate.resolve(), path.resolve(), update.uri)
        if not path.is_dir():
            self.get(update.model, update.version)  # raises NotFound with the known versions
        return path

    def _check_inside(self, real: Path, expected: Path, uri: str) -> None:
        root = self.root.resolve()
        if not real.is_relative_to(root):
            raise errors.IntegrityError(
                f"model update uri {uri!r} leads to {real}, outside the model store {root}", reason="outside_store"
            )
        if real != expected:
            raise errors.IntegrityError(
                f"model update uri {uri!r} leads to {real}, not to the announced version's {expected}",
                reason="bad_uri",
            )
