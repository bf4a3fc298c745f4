"""The feedback token's MAC input is byte for byte the JSON array it always was.

TokenSigner writes that JSON by hand (it runs once per feedback event); tokens issued before
that change, or by a policy replica running older code, must still verify.
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


def json_mac(version: int, interaction_id: str, policy_version: int, user_id: str, issued: int, expiry: int) -> bytes:
    msg = json.dumps(["flywheel-feedback", version, interaction_id, policy_version, user_id, issued, expiry])
    return hmac.new(KEY, msg.encode(), hashlib.sha256).digest()


def fields(token: str) -> tuple:
    return LAYOUT.unpack(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))


# Tokens bind protobuf strings, which are valid UTF-8: no lone surrogates.
@pytest.mark.parametrize(
    "text", ["", "i-123", 'quo"te\\back', "ünïcode \u2028 😀", "ctrl\x00\x1f\n\t", "a, b]", "x" * 300]
)
@pytest.mark.parametrize("policy_version", [0, 7, -3, 2**40])
def test_mac_input_is_the_json_array(text: str, policy_version: int) -> None:
    signer = TokenSigner(KEY, 3600)
    token = signer.issue(text, policy_version, text[::-1], now=1_700_000_000)
    version, signed_version, issued, expiry, _, _, mac = fields(token)
    assert (version, signed_version, issued, expiry) == (1, policy_version, 1_700_000_000, 1_700_003_600)
    assert mac == json_mac(version, text, policy_version, text[::-1], issued, expiry)


def test_tokens_round_trip() -> None:
    signer = TokenSigner(KEY, 3600)
    token = signer.issue('i"1', 4, "ü")
    claims = signer.verify(token, 'i"1', "ü")
    assert (claims.interaction_id, claims.user_id, claims.policy_version) == ('i"1', "ü", 4)
