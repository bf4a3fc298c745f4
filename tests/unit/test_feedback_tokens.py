"""The feedback token's MAC input is byte for byte the JSON array it always was.

TokenSigner._mac writes the JSON by hand (it runs once per feedback event); tokens issued
before that change, or by a policy replica running older code, must still verify.
"""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest

from flywheel.core.auth import _TOKEN_VERSION, TokenSigner

KEY = b"unit-test-hmac-key-0123456789"


def json_mac(interaction_id: str, policy_version: int, user_id: str, issued: int, expiry: int) -> bytes:
    msg = json.dumps(["flywheel-feedback", _TOKEN_VERSION, interaction_id, policy_version, user_id, issued, expiry])
    return hmac.new(KEY, msg.encode(), hashlib.sha256).digest()


@pytest.mark.parametrize(
    "text", ["", "i-123", 'quo"te\\back', "ünïcode \u2028 😀", "ctrl\x00\x1f\n\t", "a, b]", "\ud800", "x" * 300]
)
@pytest.mark.parametrize("policy_version", [0, 7, -3, 2**40])
def test_mac_input_is_the_json_array(text: str, policy_version: int) -> None:
    signer = TokenSigner(KEY, 3600)
    got = signer._mac(text, policy_version, text[::-1], 1_700_000_000, 1_700_003_600)
    assert got == json_mac(text, policy_version, text[::-1], 1_700_000_000, 1_700_003_600)


def test_tokens_round_trip() -> None:
    signer = TokenSigner(KEY, 3600)
    token = signer.issue('i"1', 4, "ü")
    claims = signer.verify(token, 'i"1', "ü")
    assert (claims.interaction_id, claims.user_id, claims.policy_version) == ('i"1', "ü", 4)
