"""Feedback tokens and caller identity (services/flywheel/core/auth.py)."""

from __future__ import annotations

import base64
import hashlib
import logging

import grpc.aio
import pytest

from flywheel.core import auth, errors
from flywheel.core.auth import AuthConfig, Authenticator, TokenSigner, bearer_token
from flywheel.core.config import ConfigError, load

KEY = b"0123456789abcdef-test-key"
T0 = 1_700_000_000


@pytest.fixture
def signer() -> TokenSigner:
    return TokenSigner(KEY, ttl_s=3600)


def test_issue_then_verify_returns_claims(signer: TokenSigner) -> None:
    token = signer.issue("int-1", 7, "alice", now=T0)
    assert all(c.isalnum() or c in "-_" for c in token), token  # url-safe, no padding
    claims = signer.verify(token, "int-1", "alice", now=T0 + 10)
    assert (claims.interaction_id, claims.user_id, claims.policy_version) == ("int-1", "alice", 7)
    assert (claims.issued_at, claims.expires_at) == (T0, T0 + 3600)


def test_expired_token_is_refused(signer: TokenSigner) -> None:
    token = signer.issue("int-1", 7, "alice", now=T0)
    signer.verify(token, "int-1", "alice", now=T0 + 3599)
    with pytest.raises(errors.PermissionDenied, match="feedback token has expired"):
        signer.verify(token, "int-1", "alice", now=T0 + 3600)


def test_token_for_another_answer_or_user_is_refused(signer: TokenSigner) -> None:
    token = signer.issue("int-1", 7, "alice", now=T0)
    with pytest.raises(errors.PermissionDenied, match="issued for another answer"):
        signer.verify(token, "int-2", "alice", now=T0)
    with pytest.raises(errors.PermissionDenied, match="issued for another user"):
        signer.verify(token, "int-1", "bob", now=T0)


def _flip(token: str, byte_index: int) -> str:
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[byte_index] ^= 0x01
    return base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()


@pytest.mark.parametrize("byte_index", [-1, -20, 1 + 7, 1 + 8 + 7, 1 + 16 + 7])  # mac, mac, version, issued, expiry
def test_tampered_token_is_refused(signer: TokenSigner, byte_index: int) -> None:
    token = signer.issue("int-1", 7, "alice", now=T0)
    with pytest.raises(errors.PermissionDenied, match="signature is invalid"):
        signer.verify(_flip(token, byte_index), "int-1", "alice", now=T0)


def test_token_of_another_key_is_refused(signer: TokenSigner) -> None:
    forged = TokenSigner(b"another-key-of-16-bytes", ttl_s=3600).issue("int-1", 7, "alice", now=T0)
    with pytest.raises(errors.PermissionDenied):
        signer.verify(forged, "int-1", "alice", now=T0)


@pytest.mark.parametrize("bad", ["", "x", "not a token!", "AAAA", "v1.abc.def", "é"])
def test_malformed_token_is_refused(signer: TokenSigner, bad: str) -> None:
    with pytest.raises(errors.PermissionDenied, match="malformed feedback token"):
        signer.verify(bad, "int-1", "alice", now=T0)


def test_separator_injection_does_not_collide(signer: TokenSigner) -> None:
    token = signer.issue("a\0b", 1, "c", now=T0)
    with pytest.raises(errors.PermissionDenied):
        signer.verify(token, "a", "b\0c", now=T0)


def test_config_without_key_uses_one_process_key(caplog: pytest.LogCaptureFixture, monkeypatch) -> None:
    monkeypatch.setattr(auth, "PROCESS_KEY", auth.ProcessKey())
    with caplog.at_level(logging.WARNING):
        a, b = AuthConfig().signer(), AuthConfig().signer()
    assert "FLYWHEEL_AUTH_HMAC_KEY is not set" in caplog.text
    token = a.issue("i", 1, "u")
    assert b.verify(token, "i", "u").policy_version == 1  # same process, same key


def test_config_from_env(monkeypatch) -> None:
    monkeypatch.setenv("FLYWHEEL_HMAC_KEY", "k" * 32)
    monkeypatch.setenv("FLYWHEEL_API_KEYS", "app:secret-1, other-key")
    monkeypatch.setenv("FLYWHEEL_ADMIN_TOKEN", "admin-token-0123456789")
    cfg = load(AuthConfig)
    assert cfg.named_keys() == [("app", "secret-1"), ("key2", "other-key")]
    token = TokenSigner(b"k" * 32, cfg.token_ttl_s).issue("i", 3, "u", now=T0)
    assert cfg.signer().verify(token, "i", "u", now=T0).policy_version == 3


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"hmac_key": "short"}, "hmac_key"),
        ({"token_ttl_s": 0}, "token_ttl_s"),
        ({"api_keys": ["a:1", "a:2"]}, "api_keys"),
        ({"api_keys": ["a:"]}, "api_keys"),
        ({"admin_token": "short"}, "admin_token"),
        ({"admin_token": "same-as-key-0123456", "api_keys": ["same-as-key-0123456"]}, "admin_token"),
        ({"api_keys": ["anonymous:secret-1"]}, "api_keys"),  # the namespace of callers without a key
    ],
)
def test_config_validation_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"AuthConfig.{field}"):
        AuthConfig(**kwargs)


def test_bearer_token_from_grpc_and_http() -> None:
    assert bearer_token([("x-other", "1"), ("authorization", "Bearer abc")]) == "abc"
    assert bearer_token(grpc.aio.Metadata(("authorization", "bearer  abc "))) == "abc"
    assert bearer_token({"Authorization": "Bearer xyz"}) == "xyz"
    assert bearer_token({"AUTHORIZATION": b"Bearer xyz"}) == "xyz"
    assert bearer_token({"authorization": "Basic Zm9v"}) is None
    assert bearer_token({"authorization": "Bearer "}) is None
    assert bearer_token(None) is None
    assert bearer_token([]) is None


ADMIN = "admin-token-0123456789"


def _md(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def test_no_keys_configured_everyone_is_anonymous() -> None:
    a = Authenticator(AuthConfig(admin_token=ADMIN))
    assert a.caller([]) == auth.ANONYMOUS
    assert a.caller(_md("sk-whatever")).who == "anonymous"  # OpenAI clients always send a key
    assert a.caller(_md(ADMIN)).is_admin


def test_required_key_missing_or_unknown_is_unauthenticated() -> None:
    a = Authenticator(AuthConfig(api_keys=["app:secret-1", "bot:secret-2"], admin_token=ADMIN))
    assert a.caller(_md("secret-2")) == auth.Caller("bot", namespace="bot")
    assert not a.caller(_md("secret-1")).is_admin
    with pytest.raises(errors.Unauthenticated, match="API key is required"):
        a.caller([])
    with pytest.raises(errors.Unauthenticated, match="unknown API key"):
        a.caller(_md("secret-3"))


def test_optional_key_allows_anonymous_but_not_unknown() -> None:
    a = Authenticator(AuthConfig(api_keys=["app:secret-1"], require_api_key=False))
    assert a.caller([]) == auth.ANONYMOUS_WITH_KEYS  # in a namespace of its own: see test_user_namespaces
    assert a.caller({"Authorization": "Bearer secret-1"}).who == "app"
    with pytest.raises(errors.Unauthenticated):
        a.caller(_md("wrong"))


def test_require_admin() -> None:
    a = Authenticator(AuthConfig(api_keys=["app:secret-1"], admin_token=ADMIN))
    assert a.require_admin(_md(ADMIN)).is_admin
    with pytest.raises(errors.Unauthenticated, match="admin token"):
        a.require_admin([])
    with pytest.raises(errors.PermissionDenied, match="'app' may not make admin calls"):
        a.require_admin(_md("secret-1"))
    with pytest.raises(errors.Unauthenticated, match="invalid admin token"):
        a.require_admin(_md(ADMIN + "x"))


def test_admin_disabled_without_admin_token() -> None:
    a = Authenticator(AuthConfig())
    with pytest.raises(errors.PermissionDenied, match="FLYWHEEL_AUTH_ADMIN_TOKEN"):
        a.require_admin(_md("anything"))


def test_user_namespaces() -> None:
    """With API keys configured a key's end users live in its namespace: the ids tokens bind, events
    carry and rate limits key on. Without keys, and for the admin, ids are unchanged."""
    keys = AuthConfig(api_keys=["app:secret-1", "bot:secret-2:with-colon"], admin_token=ADMIN, require_api_key=False)
    a = Authenticator(keys)
    assert a.caller(_md("secret-1")).scoped_user_id("bob") == "app:bob"
    assert a.caller(_md("secret-2:with-colon")).scoped_user_id("bob") == "bot:bob"  # a name ends at the first ':'
    assert a.caller([]).scoped_user_id("bob") == "anonymous:bob"  # no key: not any key's user
    assert a.caller(_md(ADMIN)).scoped_user_id("app:bob") == "app:bob"  # the admin names users in full
    plain = Authenticator(AuthConfig(admin_token=ADMIN))
    assert plain.caller(_md("sk-anything")).scoped_user_id("bob") == "bob"
    assert auth.ANONYMOUS.scoped_user_id("bob") == "bob"
    # One key's token never passes for another key's user of the same name.
    signer = TokenSigner(KEY, ttl_s=3600)
    token = signer.issue("int-1", 7, a.caller(_md("secret-2:with-colon")).scoped_user_id("bob"), now=T0)
    with pytest.raises(errors.PermissionDenied, match="issued for another user, not user_id 'app:bob'"):
        signer.verify(token, "int-1", a.caller(_md("secret-1")).scoped_user_id("bob"), now=T0)
    with pytest.raises(errors.PermissionDenied, match="issued for another user"):
        signer.verify(token, "int-1", a.caller([]).scoped_user_id("bot:bob"), now=T0)  # nor for a keyless caller
    assert signer.verify(token, "int-1", "bot:bob", now=T0).user_id == "bot:bob"


ADMIN_SHA256 = hashlib.sha256(ADMIN.encode()).hexdigest()
HEX_FIX = 'use the 64 hex digits of the token\'s SHA-256, e.g. `printf %s "$TOKEN" | sha256sum`'


def test_the_admin_is_recognised_by_the_hash_of_its_token() -> None:
    """A service that holds only admin_token_sha256 (the chart's policy) knows the admin by the SHA-256 of
    the bearer; it cannot tell anyone the token."""
    for digest in (ADMIN_SHA256, ADMIN_SHA256.upper()):
        a = Authenticator(AuthConfig(api_keys=["app:secret-1"], admin_token_sha256=digest))
        assert a.require_admin(_md(ADMIN)) == auth.Caller("admin", is_admin=True)
        assert a.caller(_md(ADMIN)).is_admin
        assert a.caller(_md("secret-1")) == auth.Caller("app", namespace="app")
        with pytest.raises(errors.Unauthenticated, match="invalid admin token"):
            a.require_admin(_md(ADMIN_SHA256))  # the hash itself is not the token
        with pytest.raises(errors.PermissionDenied, match="'app' may not make admin calls"):
            a.require_admin(_md("secret-1"))
        with pytest.raises(errors.Unauthenticated, match="unknown API key"):
            a.caller(_md(ADMIN + "x"))
    both = Authenticator(AuthConfig(admin_token=ADMIN, admin_token_sha256=ADMIN_SHA256))
    assert both.require_admin(_md(ADMIN)).is_admin


def test_admin_token_sha256_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYWHEEL_AUTH_ADMIN_TOKEN_SHA256", ADMIN_SHA256)
    cfg = load(AuthConfig)
    assert cfg.admin_token_sha256 == ADMIN_SHA256 and not cfg.admin_token
    assert Authenticator(cfg).require_admin(_md(ADMIN)).is_admin


@pytest.mark.parametrize(
    "kwargs, fix",
    [
        ({"admin_token_sha256": "abc"}, HEX_FIX),
        ({"admin_token_sha256": ADMIN}, HEX_FIX),
        ({"admin_token_sha256": "g" * 64}, HEX_FIX),
        (
            {"admin_token": "another-admin-token-0123", "admin_token_sha256": ADMIN_SHA256},
            "it is not the SHA-256 of admin_token: set only one of them, or the hash of this admin token",
        ),
        (
            {"api_keys": [f"app:{ADMIN}"], "admin_token_sha256": ADMIN_SHA256},
            "it is the hash of an API key or of the service token: the admin token must differ from them",
        ),
        (
            {"service_token": ADMIN, "admin_token_sha256": ADMIN_SHA256},
            "it is the hash of an API key or of the service token: the admin token must differ from them",
        ),
    ],
)
def test_admin_token_sha256_validation(kwargs: dict, fix: str) -> None:
    with pytest.raises(ConfigError) as e:
        AuthConfig(**kwargs)
    assert str(e.value) == f"AuthConfig.admin_token_sha256 = '<hidden>': {fix}"
    assert ADMIN not in str(e.value)  # never echoed, even when pasted into the wrong field
