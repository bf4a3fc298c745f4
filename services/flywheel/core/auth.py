"""Feedback tokens and caller identity.

A feedback token proves that a caller really received an answer: the policy service signs
(kind, interaction_id or pair_id, policy_version, user_id, issued, expiry) with HMAC-SHA256 and the feedback
service checks it before it accepts a rating (docs/ARCHITECTURE.md, 'Feedback tokens').
Callers identify themselves with `authorization: Bearer <token>` in gRPC metadata or the HTTP
header of the same name; the token is an API key, the admin token, or a session (core/sessions.py:
an API key's caller pinned to one end user, what a browser holds instead of the key).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import logging
import re
import secrets
import struct
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from flywheel.core import errors
from flywheel.core.config import require, setting
from flywheel.core.sessions import PREFIX as SESSION_PREFIX
from flywheel.core.sessions import SessionClaims, SessionSigner, is_session

log = logging.getLogger(__name__)

_TOKEN_VERSION = 2  # 2: the MAC binds the subject's kind (an answer or a pair); 1 did not
_KINDS = ("answer", "pair")
_FP_LEN = 6  # bytes of keyed fingerprint per bound field, only to tell *which* binding failed
# version, policy_version, issued, expiry, fp(interaction), fp(user), full HMAC-SHA256
_TOKEN_LAYOUT = struct.Struct(f">Bqqq{_FP_LEN}s{_FP_LEN}s32s")


class ProcessKey:
    """A random key made on first use and shared by everything in this process; used when no
    auth.hmac_key is set."""

    def __init__(self) -> None:
        self._key: bytes | None = None
        self._lock = threading.Lock()

    def get(self) -> bytes:
        with self._lock:
            if self._key is None:
                self._key = secrets.token_bytes(32)
                log.warning(
                    "FLYWHEEL_AUTH_HMAC_KEY is not set: feedback tokens are signed with a random per-process key, "
                    "so only this process can verify them and they die with it. Set FLYWHEEL_AUTH_HMAC_KEY "
                    "(the same value on policy and feedback) for anything beyond a single-process dev run."
                )
            return self._key


PROCESS_KEY = ProcessKey()


def _sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def process_key() -> bytes:
    """The process's random key (`PROCESS_KEY`)."""
    return PROCESS_KEY.get()


@dataclasses.dataclass
class AuthConfig:
    """Keys for feedback tokens and for callers."""

    SECTION: ClassVar[str] = "auth"

    hmac_key: str = setting(
        "",
        "Secret that signs feedback tokens (16+ bytes); policy and feedback need the same value. "
        "Empty: a random per-process key with a warning, fine only for a single-process dev run.",
        alias="FLYWHEEL_HMAC_KEY",
    )
    token_ttl_s: int = setting(
        7 * 24 * 3600, "How long a feedback token stays valid, in seconds.", alias="FLYWHEEL_TOKEN_TTL_S"
    )
    api_keys: list[str] = setting(
        [],
        "Caller API keys, comma-separated, each `key` or `name:key`. Empty: callers need no key.",
        alias="FLYWHEEL_API_KEYS",
    )
    admin_token: str = setting(
        "",
        "Bearer token for admin calls (Promote, Rollback, Pause, ...). Empty: admin calls are refused.",
        alias="FLYWHEEL_ADMIN_TOKEN",
    )
    require_api_key: bool = setting(
        True,
        "When api_keys is set, refuse callers without a key. False: anonymous callers are allowed too, "
        "and a key only names its caller (an unknown key is still refused).",
        alias="FLYWHEEL_REQUIRE_API_KEY",
    )
    service_token: str = setting(
        "",
        "Bearer token the trainer sends to the reward service (the same value on both; 16+ characters). Only "
        "its calls (and the admin's) move the reward-normalization statistics the trainer reads from "
        "Reward.GetInfo. Empty: no caller moves them; GetInfo reports each version's held-out statistics.",
    )
    admin_token_sha256: str = setting(
        "",
        "Hex SHA-256 of the admin token: this service recognises the admin without holding the token (the Helm "
        "chart gives the policy only this). When admin_token is set too, it must be that token's hash.",
    )
    session_ttl_s: int = setting(
        3600,
        "How long a session (Feedback.CreateSession, POST /sessions) lives when the request sets no ttl_s, in "
        "seconds. Sessions are signed with hmac_key: policy and feedback need the same one.",
    )
    session_max_ttl_s: int = setting(
        86400, "The longest ttl_s a session may ask for, in seconds (a longer one is refused with the limit)."
    )

    def __post_init__(self) -> None:
        n = type(self).__name__
        require(
            not self.hmac_key or len(self.hmac_key.encode()) >= 16,
            n,
            "hmac_key",
            "<hidden>",
            "use at least 16 bytes, e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`",
        )
        require(self.token_ttl_s > 0, n, "token_ttl_s", self.token_ttl_s, "use a positive number of seconds")
        require(self.session_ttl_s > 0, n, "session_ttl_s", self.session_ttl_s, "use a positive number of seconds")
        require(
            self.session_max_ttl_s >= self.session_ttl_s,
            n,
            "session_max_ttl_s",
            self.session_max_ttl_s,
            f"use at least session_ttl_s ({self.session_ttl_s}): the default must be allowed",
        )
        names = [name for name, _ in self.named_keys()]
        require(len(set(names)) == len(names), n, "api_keys", names, "give every key its own name (name:key)")
        require(
            "anonymous" not in names,
            n,
            "api_keys",
            names,
            "rename the key called 'anonymous': that is the namespace of callers without a key (Caller.scoped_user_id)",
        )
        for name, key in self.named_keys():
            require(bool(key), n, "api_keys", name, "an entry has an empty key: write `key` or `name:key`")
            require(
                not key.startswith(SESSION_PREFIX),
                n,
                "api_keys",
                name,
                f"a key may not start with {SESSION_PREFIX!r}: that prefix marks a session; pick another key",
            )
        require(
            not self.admin_token or len(self.admin_token) >= 16,
            n,
            "admin_token",
            "<hidden>",
            "use at least 16 characters",
        )
        require(
            self.admin_token not in {k for _, k in self.named_keys()},
            n,
            "admin_token",
            "<hidden>",
            "the admin token must differ from every API key",
        )
        require(
            not self.service_token or len(self.service_token) >= 16,
            n,
            "service_token",
            "<hidden>",
            "use at least 16 characters",
        )
        require(
            not self.service_token
            or (self.service_token != self.admin_token and self.service_token not in {k for _, k in self.named_keys()}),
            n,
            "service_token",
            "<hidden>",
            "the service token must differ from the admin token and from every API key",
        )
        self._check_admin_token_sha256(n)

    def _check_admin_token_sha256(self, n: str) -> None:
        digest = self.admin_token_sha256.strip().lower()
        if not digest:
            return
        require(
            re.fullmatch(r"[0-9a-f]{64}", digest) is not None,
            n,
            "admin_token_sha256",
            "<hidden>",  # a token pasted here by mistake must not reach a log
            'use the 64 hex digits of the token\'s SHA-256, e.g. `printf %s "$TOKEN" | sha256sum`',
        )
        require(
            not self.admin_token or _sha256_hex(self.admin_token) == digest,
            n,
            "admin_token_sha256",
            "<hidden>",
            "it is not the SHA-256 of admin_token: set only one of them, or the hash of this admin token",
        )
        others = [k for _, k in self.named_keys()] + ([self.service_token] if self.service_token else [])
        require(
            all(_sha256_hex(k) != digest for k in others),
            n,
            "admin_token_sha256",
            "<hidden>",
            "it is the hash of an API key or of the service token: the admin token must differ from them",
        )

    def named_keys(self) -> list[tuple[str, str]]:
        """(name, key) per API key; an unnamed key is called key1, key2, ... by position."""
        out = []
        for i, entry in enumerate(self.api_keys, 1):
            name, sep, key = entry.strip().partition(":")
            out.append((name.strip(), key.strip()) if sep else (f"key{i}", name.strip()))
        return out

    def signer(self) -> TokenSigner:
        """The TokenSigner for this config (the per-process key when hmac_key is empty)."""
        return TokenSigner(self.key_bytes(), self.token_ttl_s)

    def key_bytes(self) -> bytes:
        """hmac_key's bytes; the per-process key when it is empty (with its warning, on first use)."""
        return self.hmac_key.encode() if self.hmac_key else process_key()


# ---------------------------------------------------------------------------- feedback tokens


@dataclasses.dataclass(frozen=True)
class TokenClaims:
    """What a verified feedback token vouches for."""

    interaction_id: str  # the subject: an answer's interaction_id, or a pair's pair_id
    user_id: str
    policy_version: int
    issued_at: int  # unix seconds
    expires_at: int  # unix seconds


_MAC_PREFIX = '["flywheel-feedback", '
_json_str = json.encoder.encode_basestring_ascii  # what json.dumps uses for a str (ensure_ascii=True)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenSigner:
    """Issues and verifies feedback tokens: HMAC-SHA256, url-safe, about 90 characters."""

    def __init__(self, key: bytes, ttl_s: int) -> None:
        if len(key) < 16:
            raise ValueError("feedback token key must be at least 16 bytes")
        if ttl_s <= 0:
            raise ValueError("feedback token ttl_s must be positive")
        self._key = key
        self.ttl_s = int(ttl_s)

    def _fingerprint(self, kind: str, value: str) -> bytes:
        return hmac.new(self._key, f"fp\0{kind}\0{value}".encode(), hashlib.sha256).digest()[:_FP_LEN]

    def _mac(
        self, version: int, kind: str, subject: str, policy_version: int, user_id: str, issued: int, expiry: int
    ) -> bytes:
        # JSON array: unambiguous framing of arbitrary strings (no separator injection). Byte for
        # byte what json.dumps([...]) writes (tested), without building a JSONEncoder per call:
        # this runs once per feedback event. Version 1 tokens (before kinds) framed no kind.
        bound_kind = f"{_json_str(kind)}, " if version >= 2 else ""
        msg = (
            f"{_MAC_PREFIX}{version}, {bound_kind}{_json_str(subject)}, {int(policy_version)!r}, "
            f"{_json_str(user_id)}, {int(issued)!r}, {int(expiry)!r}]"
        )
        return hmac.new(self._key, msg.encode(), hashlib.sha256).digest()

    def issue(
        self, subject: str, policy_version: int, user_id: str, now: float | None = None, kind: str = "answer"
    ) -> str:
        """A token that lets `user_id` give feedback on `subject` until now + ttl: an answer's
        interaction_id (kind "answer") or a GeneratePair's pair_id (kind "pair"). The kind is signed:
        a pair's token never passes for an answer's, nor the other way round."""
        if kind not in _KINDS:
            raise ValueError(f"token kind {kind!r}: use one of {_KINDS}")
        issued = int(time.time() if now is None else now)
        expiry = issued + self.ttl_s
        raw = _TOKEN_LAYOUT.pack(
            _TOKEN_VERSION,
            int(policy_version),
            issued,
            expiry,
            self._fingerprint(kind, subject),
            self._fingerprint("user", user_id),
            self._mac(_TOKEN_VERSION, kind, subject, int(policy_version), user_id, issued, expiry),
        )
        return _b64(raw)

    def verify(
        self, token: str, subject: str, user_id: str, now: float | None = None, kind: str = "answer"
    ) -> TokenClaims:
        """The token's claims, or errors.PermissionDenied saying exactly why it is refused.

        A version 1 token (issued before tokens named their kind) is still accepted for either kind
        until it expires: a rolling upgrade keeps outstanding tokens working."""
        if kind not in _KINDS:
            raise ValueError(f"token kind {kind!r}: use one of {_KINDS}")
        try:
            raw = _unb64(token.strip())
            version, policy_version, issued, expiry, fp_i, fp_u, mac = _TOKEN_LAYOUT.unpack(raw)
        except (ValueError, struct.error, AttributeError, TypeError):
            raise errors.PermissionDenied(
                "malformed feedback token: pass the feedback_token of the response unchanged"
            ) from None
        if version not in (1, _TOKEN_VERSION):
            raise errors.PermissionDenied(f"malformed feedback token: unknown token version {version}")
        # One HMAC for a good token (the hot path of feedback intake); the fingerprints are
        # computed only on refusal, to say precisely why.
        if hmac.compare_digest(mac, self._mac(version, kind, subject, policy_version, user_id, issued, expiry)):
            t = time.time() if now is None else now
            if t >= expiry:
                raise errors.PermissionDenied(
                    f"feedback token has expired ({int(t - expiry)} s ago; tokens live {expiry - issued} s)"
                )
            return TokenClaims(subject, user_id, policy_version, issued, expiry)
        expected_fp = self._fingerprint("interaction" if version == 1 else kind, subject)
        if not hmac.compare_digest(fp_i, expected_fp):
            other = "pair" if kind == "answer" else "answer"
            if version >= 2 and hmac.compare_digest(fp_i, self._fingerprint(other, subject)):
                raise errors.PermissionDenied(
                    "feedback token is a pair's (from GeneratePair): send it with pair_id and a preference"
                    if other == "pair"
                    else "feedback token is an answer's: send it with interaction_id, not as a pair's"
                )
            name = "pair_id" if kind == "pair" else "interaction_id"
            raise errors.PermissionDenied(f"feedback token was issued for another {kind}, not {name} {subject!r}")
        if not hmac.compare_digest(fp_u, self._fingerprint("user", user_id)):
            raise errors.PermissionDenied(f"feedback token was issued for another user, not user_id {user_id!r}")
        raise errors.PermissionDenied("feedback token signature is invalid (tampered, or signed with another key)")


# ---------------------------------------------------------------------------- caller identity


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who is calling: an API key's name, "admin" or "anonymous"; with `session_user`, a session
    minted with that key (or with none) for one end user."""

    who: str
    is_admin: bool = False
    # Whose end users this caller speaks for (`scoped_user_id`): its API key's name, "anonymous" for a
    # caller without a key while keys are configured; None (no keys configured, or the admin): global ids.
    namespace: str | None = None
    # A session's end user (core/sessions.py): the only user this caller may act for. None: not a session.
    session_user: str | None = None

    def scoped_user_id(self, user_id: str) -> str:
        """The id of end user `user_id` as this caller names it: what feedback tokens bind, events carry
        and per-user rate limits key on. With API keys configured a key's users live in its namespace,
        "<key name>:<user_id>", so one key can neither give feedback as another key's users (their
        tokens bind the other namespace) nor spend their rate limits. Unambiguous: a key's name never
        holds ':' (`AuthConfig.named_keys` splits at the first) and "anonymous" is no key's name. Without
        keys, and for the admin (trusted to act for any user: it names them in full), the id is unchanged.
        Limits on user_id apply to the id the caller sent, not to this longer one.

        A session is pinned to its user: an empty or equal `user_id` is the session's user, another one
        is errors.PermissionDenied. Every route turns its user into the bound one here, so none can
        let a browser act for someone else."""
        return self._scoped(self.end_user(user_id))

    def end_user(self, user_id: str | None) -> str:
        """The user a request that names `user_id` acts for, before scoping: a session's own user
        (PermissionDenied for another one), else `user_id` unchanged."""
        if self.session_user is None:
            return user_id or ""
        if user_id and user_id != self.session_user:
            raise errors.PermissionDenied(
                f"this session is for user {self.session_user!r}, not {user_id[:80]!r}: leave the user id out "
                "(the session's user is used) or mint a session for that user"
            )
        return self.session_user

    def default_user(self) -> str:
        """The user of a request that names none: a session's user, else the caller's name."""
        return self.session_user if self.session_user is not None else self.who

    def _scoped(self, user_id: str) -> str:
        return user_id if self.namespace is None else f"{self.namespace}:{user_id}"


ANONYMOUS = Caller("anonymous")
ANONYMOUS_WITH_KEYS = Caller("anonymous", namespace="anonymous")  # keys configured, require_api_key false


def bearer_token(metadata: Any) -> str | None:
    """The token of `authorization: Bearer <token>`, from gRPC metadata or HTTP headers.

    Accepts a sequence of (key, value) pairs (gRPC invocation metadata, grpc.aio.Metadata) or a
    headers mapping (dict, aiohttp's CIMultiDict); the header name is matched case-insensitively.
    """
    if not metadata:
        return None
    pairs: Iterable[Any] = metadata.items() if isinstance(metadata, Mapping) else metadata
    for pair in pairs:
        try:
            key, value = pair[0], pair[1]
        except (TypeError, IndexError, KeyError):
            continue
        if not isinstance(key, str) or key.lower() != "authorization":
            continue
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        scheme, _, token = str(value).strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


class Authenticator:
    """Maps a bearer token to a Caller; call it from a servicer with the request's metadata."""

    def __init__(self, config: AuthConfig) -> None:
        self.config = config
        self._keys = config.named_keys()
        self._admin = config.admin_token.encode()
        # Only the hash configured (the chart's policy): a bearer is the admin when its SHA-256 matches.
        digest = config.admin_token_sha256.strip()
        self._admin_sha256 = bytes.fromhex(digest) if digest and not self._admin else b""
        self._session_signer: SessionSigner | None = None  # made on first use (it may read the process key)

    def _match_key(self, token: str) -> str | None:
        found = None
        for name, key in self._keys:  # check every key: timing must not reveal which one matched
            if hmac.compare_digest(token.encode(), key.encode()):
                found = name
        return found

    def _is_admin(self, token: str) -> bool:
        if self._admin_sha256:
            return hmac.compare_digest(hashlib.sha256(token.encode()).digest(), self._admin_sha256)
        return bool(self._admin) and hmac.compare_digest(token.encode(), self._admin)

    def caller(self, metadata: Any) -> Caller:
        """The caller, or errors.Unauthenticated when a key is required but missing or unknown.

        With no API keys configured any bearer token is ignored (OpenAI clients always send one),
        except a session (`fws1.`), which is verified: it pins the user, keys or not.
        """
        token = bearer_token(metadata)
        if token is not None and self._is_admin(token):
            return Caller("admin", is_admin=True)
        if is_session(token):
            return self.session_caller(self.sessions().verify(str(token)))
        if not self._keys:
            return ANONYMOUS
        if token is None:
            if self.config.require_api_key:
                raise errors.Unauthenticated(
                    "an API key is required: send metadata `authorization: Bearer <key>` (one of FLYWHEEL_AUTH_API_KEYS)"
                )
            return ANONYMOUS_WITH_KEYS
        name = self._match_key(token)
        if name is None:
            raise errors.Unauthenticated("unknown API key: use one of the keys in FLYWHEEL_AUTH_API_KEYS")
        return Caller(name, namespace=name)

    def require_admin(self, metadata: Any) -> Caller:
        """The admin caller; Unauthenticated without a valid token, PermissionDenied for a caller's key
        or a session."""
        token = bearer_token(metadata)
        if token is None:
            raise errors.Unauthenticated(
                "this call needs the admin token: send `authorization: Bearer <FLYWHEEL_ADMIN_TOKEN>`"
            )
        if self._is_admin(token):
            return Caller("admin", is_admin=True)
        if is_session(token):
            self.caller(metadata)  # a forged or expired session: Unauthenticated with its reason
            raise errors.PermissionDenied("a session may not make admin calls: use the admin token")
        if not (self._admin or self._admin_sha256):
            raise errors.PermissionDenied("admin calls are disabled: set FLYWHEEL_AUTH_ADMIN_TOKEN on this service")
        name = self._match_key(token)
        if name is not None:
            raise errors.PermissionDenied(f"API key {name!r} may not make admin calls: use the admin token")
        raise errors.Unauthenticated("invalid admin token: send the value of FLYWHEEL_ADMIN_TOKEN")

    # ------------------------------------------------------------------ sessions (core/sessions.py)
    def sessions(self) -> SessionSigner:
        """The session signer over auth.hmac_key (the per-process key when it is empty)."""
        if self._session_signer is None:
            self._session_signer = SessionSigner(self.config.key_bytes())
        return self._session_signer

    def session_caller(self, claims: SessionClaims) -> Caller:
        """The caller a verified session acts as; Unauthenticated when its key no longer exists."""
        if claims.key_name is None:
            if self._keys:
                raise errors.Unauthenticated(
                    "this session was minted while no API keys were configured; keys are now: mint a new one "
                    "with an API key"
                )
            return Caller("anonymous", session_user=claims.user_id)
        key = dict(self._keys).get(claims.key_name)
        if key is None:
            raise errors.Unauthenticated(
                f"this session was minted for API key {claims.key_name!r}, which no longer exists here: mint a "
                "new one with a current key"
            )
        if not hmac.compare_digest(self.sessions().key_fingerprint(key), claims.key_fingerprint):
            raise errors.Unauthenticated(
                f"this session was minted with an earlier value of API key {claims.key_name!r} (the key was "
                "changed since): mint a new one with the current key"
            )
        return Caller(claims.key_name, namespace=claims.key_name, session_user=claims.user_id)

    def mint_session(self, caller: Caller, user_id: str, ttl_s: int = 0) -> tuple[str, int]:
        """A session for `user_id` made by `caller` (an API key's caller, or anyone while no keys are
        configured), living ttl_s seconds (0: auth.session_ttl_s): its text and expiry. A session cannot
        mint one (a browser could renew itself forever), nor can the admin (it has no key namespace)."""
        cfg = self.config
        if caller.session_user is not None:
            raise errors.PermissionDenied("a session cannot mint sessions: mint them server-side with the API key")
        if caller.is_admin:
            raise errors.PermissionDenied(
                "the admin token cannot mint sessions: a session acts for one API key's users; use that key"
            )
        if self._keys and caller.namespace in (None, "anonymous"):
            raise errors.Unauthenticated(
                "minting a session needs an API key: send `authorization: Bearer <key>` (one of FLYWHEEL_AUTH_API_KEYS)"
            )
        if not user_id:
            raise errors.InvalidArgument("user_id is required: the end user the session is for")
        if ttl_s < 0 or ttl_s > cfg.session_max_ttl_s:
            raise errors.InvalidArgument(
                f"ttl_s = {ttl_s}: use 1..{cfg.session_max_ttl_s} seconds (auth.session_max_ttl_s), or 0 for "
                f"the default ({cfg.session_ttl_s} s)"
            )
        key = dict(self._keys).get(caller.who) if caller.namespace is not None else None
        name = caller.who if key is not None else None
        return self.sessions().mint(name, key, user_id, ttl_s or cfg.session_ttl_s)
