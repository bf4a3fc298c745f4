"""Sessions (core/sessions.py, core/auth.py) and CORS origins (core/cors.py), without servers:
the precise refusals, the user pinning of Caller.scoped_user_id, and a property test that no bearer
text at all makes session handling raise anything but Unauthenticated."""

from __future__ import annotations

import base64
import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flywheel.core import errors
from flywheel.core.auth import AuthConfig, Authenticator, Caller
from flywheel.core.config import ConfigError
from flywheel.core.cors import origin_problem
from flywheel.core.server import ServerConfig
from flywheel.core.sessions import SessionSigner

KEY = "session-unit-key-0123456789abcdef"
T0 = 1_700_000_000
APP = (("authorization", "Bearer app-key-0123456789"),)


def authn(**kw: object) -> Authenticator:
    return Authenticator(AuthConfig(hmac_key=KEY, api_keys=["app:app-key-0123456789"], **kw))  # type: ignore[arg-type]


def bearer(text: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {text}"),)


def test_a_minted_session_is_its_keys_caller_pinned_to_one_user() -> None:
    a = authn()
    text, expires = a.mint_session(a.caller(APP), "alice", 120)
    assert text.startswith("fws1.") and 118 <= expires - time.time() <= 120
    caller = a.caller(bearer(text))
    assert (caller.who, caller.namespace, caller.session_user, caller.is_admin) == ("app", "app", "alice", False)
    assert caller.scoped_user_id("") == caller.scoped_user_id("alice") == "app:alice"
    assert caller.default_user() == "alice"
    with pytest.raises(errors.PermissionDenied, match="this session is for user 'alice', not 'bob'"):
        caller.scoped_user_id("bob")


def test_refusals_say_why() -> None:
    a, signer = authn(), SessionSigner(KEY.encode())
    text, _ = a.mint_session(a.caller(APP), "alice", 60)
    with pytest.raises(errors.Unauthenticated, match=r"session expired \d+ s ago \(it lived 60 s\)"):
        a.sessions().verify(text, now=T0 * 2)
    head, payload, sig = text.split(".")
    forged = json.loads(base64.urlsafe_b64decode(payload + "=="))
    forged["u"] = "mallory"
    body = base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=").decode()
    with pytest.raises(errors.Unauthenticated, match="signature is invalid"):
        a.caller(bearer(f"{head}.{body}.{sig}"))
    with pytest.raises(errors.Unauthenticated, match="malformed session"):
        a.caller(bearer("fws1.abc"))
    with pytest.raises(errors.Unauthenticated, match="signature is invalid"):  # another hmac_key
        Authenticator(AuthConfig(hmac_key="another-key-0123456789abcdef", api_keys=["app:app-key-0123456789"])).caller(
            bearer(text)
        )
    gone = Authenticator(AuthConfig(hmac_key=KEY, api_keys=["other:other-key-0123456789"]))
    with pytest.raises(errors.Unauthenticated, match="minted for API key 'app', which no longer exists"):
        gone.caller(bearer(text))
    rotated = Authenticator(AuthConfig(hmac_key=KEY, api_keys=["app:rotated-key-0123456789"]))
    with pytest.raises(errors.Unauthenticated, match="earlier value of API key 'app'"):
        rotated.caller(bearer(text))
    no_keys = Authenticator(AuthConfig(hmac_key=KEY))
    anon_text, _ = no_keys.mint_session(no_keys.caller(()), "carol", 0)
    assert no_keys.caller(bearer(anon_text)).scoped_user_id("") == "carol"
    with pytest.raises(errors.Unauthenticated, match="while no API keys were configured"):
        a.caller(bearer(anon_text))
    # A feedback token signed with the same hmac_key is no session (domain separation).
    token = AuthConfig(hmac_key=KEY).signer().issue("i1", 0, "alice")
    with pytest.raises(errors.Unauthenticated):
        signer.verify(f"fws1.{token}.{token}")


def test_what_may_mint_and_for_how_long() -> None:
    a = authn(admin_token="admin-token-0123456789", session_max_ttl_s=7200)
    text, _ = a.mint_session(a.caller(APP), "alice")
    with pytest.raises(errors.PermissionDenied, match="a session cannot mint sessions"):
        a.mint_session(a.caller(bearer(text)), "alice")
    with pytest.raises(errors.PermissionDenied, match="admin token cannot mint"):
        a.mint_session(a.caller(bearer("admin-token-0123456789")), "alice")
    with pytest.raises(errors.PermissionDenied, match="a session may not make admin calls"):
        a.require_admin(bearer(text))
    with pytest.raises(errors.InvalidArgument, match=r"ttl_s = 7201: use 1\.\.7200 seconds"):
        a.mint_session(a.caller(APP), "alice", 7201)
    with pytest.raises(errors.InvalidArgument, match="user_id is required"):
        a.mint_session(a.caller(APP), "", 0)
    lax = authn(require_api_key=False)
    with pytest.raises(errors.Unauthenticated, match="minting a session needs an API key"):
        lax.mint_session(lax.caller(()), "alice")


def test_session_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="session_max_ttl_s"):
        AuthConfig(session_ttl_s=100, session_max_ttl_s=50)
    with pytest.raises(ConfigError, match="that prefix marks a session"):
        AuthConfig(api_keys=["x:fws1.looks-like-a-session"])


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=300), st.booleans())
def test_no_bearer_text_raises_anything_but_unauthenticated(data: bytes, prefixed: bool) -> None:
    a = authn()
    value = (b"Bearer fws1." if prefixed else b"Bearer fws1") + data
    try:
        caller = a.caller((("authorization", value),))
    except errors.Unauthenticated:
        return
    # Only an API key or a genuine session could pass; random bytes are neither.
    assert caller.session_user is None and caller.who == "app", caller


@given(st.text(max_size=200))
def test_no_session_text_raises_anything_but_unauthenticated(text: str) -> None:
    with pytest.raises(errors.Unauthenticated):
        SessionSigner(KEY.encode()).verify("fws1." + text)


def test_caller_without_session_is_unchanged() -> None:
    assert Caller("app", namespace="app").scoped_user_id("bob") == "app:bob"
    assert Caller("anonymous").scoped_user_id("bob") == "bob"


@pytest.mark.parametrize(
    ("origin", "why"),
    [
        ("*", "wildcards are not allowed"),
        ("https://*.example.com", "wildcards are not allowed"),
        ("app.example.com", "has no scheme"),
        ("https://app.example.com/", "has a path"),
        ("https://app.example.com/ui", "has a path"),
        ("https://App.example.com", "lower case"),
        ("https://app.example.com:443", "leave out the default port :443"),
        ("http://localhost:80", "leave out the default port :80"),
        ("ftp://app.example.com", "not an http(s) origin"),
        ("https://app.example.com:99999", "1..65535"),
        ("null", "has no scheme"),
    ],
)
def test_bad_cors_origins_are_refused_with_the_fix(origin: str, why: str) -> None:
    assert why in (origin_problem(origin) or "")
    with pytest.raises(ConfigError, match="cors_origins"):
        ServerConfig(cors_origins=[origin])


@pytest.mark.parametrize("origin", ["https://app.example.com", "http://localhost:3000", "http://127.0.0.1:8090"])
def test_good_cors_origins_pass(origin: str) -> None:
    assert origin_problem(origin) is None
    assert ServerConfig(cors_origins=[origin]).cors_origins == [origin]
