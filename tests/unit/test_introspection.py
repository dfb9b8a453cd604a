"""The introspection decision for every token state."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from services.auth.introspection import TokenState, decide

NOW = datetime(2026, 6, 1, 12, tzinfo=UTC)
TOKEN = TokenState(
    id="tok_1",
    user_id="usr_1",
    permissions=frozenset({"object:create", "team:billing"}),
    active=True,
    expires_at=None,
    revoked_at=None,
    last_used_at=None,
    created_at=NOW - timedelta(days=1),
    allowed_cidrs=None,
    inactivity_timeout_seconds=None,
)


@pytest.mark.parametrize(
    ("token", "team", "role", "ip", "reason"),
    [
        (None, "team_1", "owner", None, "unknown"),
        (replace(TOKEN, revoked_at=NOW), "team_1", "owner", None, "revoked"),
        (replace(TOKEN, active=False), "team_1", "owner", None, "inactive"),
        (replace(TOKEN, expires_at=NOW), "team_1", "owner", None, "expired"),
        (replace(TOKEN, inactivity_timeout_seconds=60), "team_1", "owner", None, "expired"),
        (
            replace(TOKEN, allowed_cidrs=("10.0.0.0/8",)),
            "team_1",
            "owner",
            "192.0.2.1",
            "ip_not_allowed",
        ),
        (replace(TOKEN, allowed_cidrs=("10.0.0.0/8",)), "team_1", "owner", None, "ip_not_allowed"),
        (TOKEN, "team_1", None, None, "not_member"),
    ],
)
def test_inactive_answers_carry_the_reason(
    token: TokenState | None, team: str, role: str | None, ip: str | None, reason: str
) -> None:
    """Each refusal says why, in the RFC 7662 shape."""
    assert decide(token, team_id=team, role=role, client_ip=ip, now=NOW) == {
        "active": False,
        "reason": reason,
    }


def test_active_answer_intersects_token_and_role() -> None:
    """A member's role removes what the token has but the role does not allow."""
    answer = decide(TOKEN, team_id="team_1", role="member", client_ip="10.1.2.3", now=NOW)
    assert answer["active"] is True
    assert answer["permissions"] == ["object:create"]
    assert answer["token_id"] == "tok_1"
    owner = decide(TOKEN, team_id="team_1", role="owner", client_ip=None, now=NOW)
    assert owner["permissions"] == ["object:create", "team:billing"]


def test_allowed_ip_passes() -> None:
    """A client inside the token's ranges is accepted."""
    token = replace(TOKEN, allowed_cidrs=("10.0.0.0/8", "2001:db8::/32"))
    assert decide(token, team_id="t", role="owner", client_ip="2001:db8::5", now=NOW)["active"]
