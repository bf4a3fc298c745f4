"""auth.service_token: its validation, and whose calls the reward service counts in its
normalization statistics (RewardCallers; the servicer and the trainer's client are covered
against a real server in tests/integration/test_reward_service.py)."""

from __future__ import annotations

import pytest

from flywheel.core import errors
from flywheel.core.auth import AuthConfig
from flywheel.core.config import ConfigError
from flywheel.reward.server import RewardCallers

SERVICE = "trainer-service-token-0123"
ADMIN = "admin-token-0123456789abcdef"


def _md(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


@pytest.mark.parametrize(
    ("kwargs", "fix"),
    [
        ({"service_token": "short"}, "use at least 16 characters"),
        (
            {"service_token": ADMIN, "admin_token": ADMIN},
            "the service token must differ from the admin token and from every API key",
        ),
        ({"service_token": SERVICE, "api_keys": [f"app:{SERVICE}"]}, "the service token must differ"),
    ],
)
def test_service_token_validation(kwargs: dict, fix: str) -> None:
    with pytest.raises(ConfigError, match="AuthConfig.service_token = '<hidden>': " + fix):
        AuthConfig(**kwargs)


def test_only_the_service_token_and_the_admin_count() -> None:
    callers = RewardCallers(AuthConfig(api_keys=["app:app-key-1"], admin_token=ADMIN, service_token=SERVICE))
    assert callers.counted(_md(SERVICE)) is True  # the trainer: no API key needed besides its own token
    assert callers.counted(_md(ADMIN)) is True
    assert callers.counted(_md("app-key-1")) is False  # admitted, scored, not counted
    with pytest.raises(errors.Unauthenticated, match="unknown API key"):
        callers.counted(_md(SERVICE + "x"))
    with pytest.raises(errors.Unauthenticated, match="an API key is required"):
        callers.counted([])


def test_without_a_service_token_no_caller_but_the_admin_counts() -> None:
    callers = RewardCallers(AuthConfig(admin_token=ADMIN))
    assert callers.counted([]) is False
    assert callers.counted(_md(SERVICE)) is False  # a token nobody configured is just an anonymous caller
    assert callers.counted(_md(ADMIN)) is True
