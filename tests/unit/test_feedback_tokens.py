"""The feedback token's MAC input is byte for byte a JSON array, and it binds the token's kind.

TokenSigner writes that JSON by hand (it runs once per feedback event); tokens issued by a policy
replica running older code (version 1, before kinds) must still verify until they expire.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import struct

import pytest

from flywheel.core.auth import TokenSigner

KEY = b"unit-test-hmac-key-0123456789"
# The token's wire format, shared by every replica of the policy and feedback services:
# version, policy_version, issued, expiry, two 6-byte fingerprints, the 32-byte MAC.
LAYOUT = struct.Struct(">Bqqq6s6s32s")


def json_mac(
    version: int, kind: str | None, subject: str, policy_version: int, user_id: str, issued: int, expiry: int
) -> bytes:
    """Version 2 signs the kind (an answer's or a pair's token); version 1 did not."""
    bound = [kind] if version >= 2 else []
    msg = json.dumps(["flywheel-feedback", version, *bound, subject, policy_version, user_id, issued, expiry])
    return hmac.new(KEY, msg.encode(), hashlib.sha256).digest()


def legacy_token(subject: str, policy_version: int, user_id: str, issued: int, ttl: int = 3600) -> str:
    """A version 1 token, as replicas before kinds issued it (fingerprints keyed like TokenSigner's)."""
    fp = lambda k, v: hmac.new(KEY, f"fp\0{k}\0{v}".encode(), hashlib.sha256).digest()[:6]  # noqa: E731
    mac = json_mac(1, None, subject, policy_version, user_id, issued, issued + ttl)
    raw = LAYOUT.pack(1, policy_version, issued, issued + ttl, fp("interaction", subject), fp("user", user_id), mac)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def fields(token: str) -> tuple:
    return LAYOUT.unpack(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))


# Tokens bind protobuf strings, which are valid UTF-8: no lone surrogates.
@pytest.mark.parametrize(
    "text", ["", "i-123", 'quo"te\\back', "ünïcode \u2028 😀", "ctrl\x00\x1f\n\t", "a, b]", "x" * 300]
)
@pytest.mark.parametrize("policy_version", [0, 7, -3, 2**40])
@pytest.mark.parametrize("kind", ["answer", "pair"])
def test_mac_input_is_the_json_array(text: str, policy_version: int, kind: str) -> None:
    signer = TokenSigner(KEY, 3600)
    token = signer.issue(text, policy_version, text[::-1], now=1_700_000_000, kind=kind)
    version, signed_version, issued, expiry, _, _, mac = fields(token)
    assert (version, signed_version, issued, expiry) == (2, policy_version, 1_700_000_000, 1_700_003_600)
    assert mac == json_mac(version, kind, text, policy_version, text[::-1], issued, expiry)


def test_a_pair_token_never_passes_for_an_answer_token_nor_the_reverse() -> None:
    from flywheel.core import errors

    signer = TokenSigner(KEY, 3600)
    pair = signer.issue("same-id", 3, "alice", kind="pair")
    answer = signer.issue("same-id", 3, "alice")
    assert signer.verify(pair, "same-id", "alice", kind="pair").policy_version == 3
    assert signer.verify(answer, "same-id", "alice").policy_version == 3
    with pytest.raises(errors.PermissionDenied, match="is a pair's .from GeneratePair.: send it with pair_id"):
        signer.verify(pair, "same-id", "alice")
    with pytest.raises(errors.PermissionDenied, match="is an answer's: send it with interaction_id"):
        signer.verify(answer, "same-id", "alice", kind="pair")
    with pytest.raises(errors.PermissionDenied, match="issued for another pair, not pair_id 'other'"):
        signer.verify(pair, "other", "alice", kind="pair")
    with pytest.raises(ValueError, match="token kind"):
        signer.issue("x", 1, "alice", kind="thumbs")


def test_version_1_tokens_still_verify_until_they_expire() -> None:
    """Tokens a replica issued before kinds were signed keep working through a rolling upgrade."""
    from flywheel.core import errors

    signer = TokenSigner(KEY, 3600)
    old = legacy_token("i-1", 5, "bob", issued=1_700_000_000)
    assert signer.verify(old, "i-1", "bob", now=1_700_000_100).policy_version == 5
    assert signer.verify(old, "i-1", "bob", now=1_700_000_100, kind="pair").user_id == "bob"
    with pytest.raises(errors.PermissionDenied, match="expired"):
        signer.verify(old, "i-1", "bob", now=1_700_003_600)
    with pytest.raises(errors.PermissionDenied, match="another answer, not interaction_id 'i-2'"):
        signer.verify(old, "i-2", "bob", now=1_700_000_100)


def test_tokens_round_trip() -> None:
    signer = TokenSigner(KEY, 3600)
    token = signer.issue('i"1', 4, "ü")
    claims = signer.verify(token, 'i"1', "ü")
    assert (claims.interaction_id, claims.user_id, claims.policy_version) == ('i"1', "ü", 4)
