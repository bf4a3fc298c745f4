"""Sessions: a short-lived signed credential an application mints server-side for one end user.

A browser must never hold an API key (it could act as any of the key's users). The application
instead asks the feedback service for a session (gRPC Feedback.CreateSession or HTTP
`POST /sessions`, with its API key) and hands the browser only that. `authorization: Bearer
<session>` then acts as the key with the user pinned (core.auth.Caller.scoped_user_id): naming
another user is PERMISSION_DENIED, naming none gives the session's user, and a session makes no
admin calls and mints no sessions (docs/SECURITY.md, 'Sessions').

Text: `fws1.<base64url payload>.<base64url HMAC-SHA256>`. The payload is compact JSON with the API
key's name (null when minted without keys configured), a keyed fingerprint of that key's value (so
rotating a key ends its sessions), the user_id, and the issue and expiry times in unix seconds. The
MAC key is derived from auth.hmac_key with a domain label, so neither a feedback token nor anything
else signed with auth.hmac_key can pass for a session (or the reverse). Every refusal is
errors.Unauthenticated with its reason: malformed, bad signature, expired N s ago, or minted for a
key that no longer exists. Verification checks the MAC (constant time) before reading any claim.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import json
import time
from typing import Any

from flywheel.core import errors

PREFIX = "fws1."
_DOMAIN = b"flywheel session v1"
_FP_LEN = 8  # bytes of the API key's keyed fingerprint in the payload
_MAX_TEXT = 4096  # longer bearer text is malformed without decoding it
_FIELDS = frozenset({"k", "kf", "u", "iat", "exp"})
_B64_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
MINT_HINT = "mint a new one (Feedback.CreateSession or POST /sessions on the feedback service)"


@dataclasses.dataclass(frozen=True)
class SessionClaims:
    """What a verified session vouches for."""

    key_name: str | None  # the API key that minted it; None: minted while no keys were configured
    key_fingerprint: str  # hex; "" when key_name is None
    user_id: str
    issued_at: int
    expires_at: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    if not text or any(c not in _B64_CHARS for c in text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _malformed(why: str) -> errors.Unauthenticated:
    return errors.Unauthenticated(
        f"malformed session ({why}): send the `session` text CreateSession returned, unchanged"
    )


class SessionSigner:
    """Mints and verifies sessions with a key derived from auth.hmac_key."""

    def __init__(self, hmac_key: bytes) -> None:
        if len(hmac_key) < 16:
            raise ValueError("session key must be at least 16 bytes")
        self._key = hmac.new(hmac_key, _DOMAIN, hashlib.sha256).digest()

    def key_fingerprint(self, api_key: str) -> str:
        """A keyed fingerprint of an API key's value: sessions end when their key's value changes."""
        return hmac.new(self._key, b"api-key\0" + api_key.encode(), hashlib.sha256).digest()[:_FP_LEN].hex()

    def _mac(self, payload: str) -> bytes:
        return hmac.new(self._key, payload.encode(), hashlib.sha256).digest()

    def mint(
        self, key_name: str | None, api_key: str | None, user_id: str, ttl_s: int, now: float | None = None
    ) -> tuple[str, int]:
        """The session text and its expiry (unix seconds) for `user_id`, valid for `ttl_s` seconds."""
        if ttl_s <= 0:
            raise ValueError("session ttl_s must be positive")
        issued = int(time.time() if now is None else now)
        expires = issued + int(ttl_s)
        fp = self.key_fingerprint(api_key) if key_name is not None and api_key is not None else ""
        claims: dict[str, Any] = {"k": key_name, "kf": fp, "u": user_id, "iat": issued, "exp": expires}
        payload = _b64(json.dumps(claims, separators=(",", ":"), ensure_ascii=True).encode())
        return f"{PREFIX}{payload}.{_b64(self._mac(payload))}", expires

    def verify(self, text: str, now: float | None = None) -> SessionClaims:
        """The session's claims, or errors.Unauthenticated saying why it is refused. Never raises
        anything else, whatever `text` holds."""
        if not isinstance(text, str) or not text.startswith(PREFIX):
            raise _malformed("it does not start with 'fws1.'")
        if len(text) > _MAX_TEXT:
            raise _malformed(f"{len(text)} characters, more than any session")
        parts = text[len(PREFIX) :].split(".")
        if len(parts) != 2:
            raise _malformed("expected fws1.<payload>.<signature>")
        payload, sig = parts
        try:
            mac = _unb64(sig)
            _unb64(payload)
        except (ValueError, binascii.Error):
            raise _malformed("not base64url") from None
        if not hmac.compare_digest(mac, self._mac(payload)):
            raise errors.Unauthenticated(
                "session signature is invalid (tampered with, or signed with another auth.hmac_key): " + MINT_HINT
            )
        claims = self._claims(payload)
        t = time.time() if now is None else now
        if t >= claims.expires_at:
            raise errors.Unauthenticated(
                f"session expired {int(t - claims.expires_at)} s ago "
                f"(it lived {claims.expires_at - claims.issued_at} s): {MINT_HINT}"
            )
        return claims

    @staticmethod
    def _claims(payload: str) -> SessionClaims:
        """The claims of a payload whose MAC matched (so this process wrote it; checked anyway)."""
        try:
            data = json.loads(_unb64(payload))
        except (ValueError, UnicodeDecodeError, binascii.Error):
            raise _malformed("payload is not JSON") from None
        ok = (
            isinstance(data, dict)
            and set(data) == _FIELDS
            and (data["k"] is None or isinstance(data["k"], str))
            and isinstance(data["kf"], str)
            and isinstance(data["u"], str)
            and all(type(data[f]) is int for f in ("iat", "exp"))
        )
        if not ok:
            raise _malformed("payload fields")
        return SessionClaims(data["k"], data["kf"], data["u"], data["iat"], data["exp"])


def is_session(token: str | None) -> bool:
    """Whether a bearer token is a session (by its prefix; API keys may not start with it)."""
    return token is not None and token.startswith(PREFIX)
