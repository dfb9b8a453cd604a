"""The introspection decision, a pure function of a token's row and its owner's role."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from services.shared import effective_permissions, ip_in_ranges


@dataclass(frozen=True)
class TokenState:
    id: str
    user_id: str
    permissions: frozenset[str]
    active: bool
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    created_at: datetime
    allowed_cidrs: tuple[str, ...] | None
    inactivity_timeout_seconds: int | None
    previous_secret_expires_at: datetime | None = None
    presented_previous_secret: bool = False

    @property
    def ends_at(self) -> datetime | None:
        """When the credential presented stops working by itself: the key's expiry, or
        for an old secret still in its grace, the grace's end if that comes first."""
        ends = [self.expires_at]
        if self.presented_previous_secret:
            ends.append(self.previous_secret_expires_at)
        known = [end for end in ends if end is not None]
        return min(known) if known else None


def state_of(token: TokenState, now: datetime) -> str:
    """What a token list shows: revoked, expired, inactive or active."""
    answer = decide(token, team_id=None, role=None, client_ip=None, now=now)
    if answer["active"] or answer["reason"] == "ip_not_allowed":
        return "active"
    return str(answer["reason"])


def inactive(reason: str) -> dict[str, Any]:
    return {"active": False, "reason": reason}


def idle_too_long(token: TokenState, now: datetime) -> bool:
    """Unused for longer than the token's inactivity timeout allows."""
    if token.inactivity_timeout_seconds is None:
        return False
    last_seen = token.last_used_at or token.created_at
    return now - last_seen > timedelta(seconds=token.inactivity_timeout_seconds)


Ended = Literal["revoked", "expired", "idle"]


def ended_reason(token: TokenState, now: datetime) -> Ended | None:
    """Why the key can never be used again, or None while it can: revoked, past its
    ``expires_at``, or unused past its inactivity timeout. Introspection refuses such a key
    and the token routes refuse to revive it, so both must read its end the same way."""
    if token.revoked_at is not None:
        return "revoked"
    if token.expires_at is not None and token.expires_at <= now:
        return "expired"
    if idle_too_long(token, now):
        return "idle"
    return None


def decide(
    token: TokenState | None,
    *,
    team_id: str | None,
    role: str | None,
    client_ip: str | None,
    now: datetime,
) -> dict[str, Any]:
    if token is None:
        return inactive("unknown")
    ended = ended_reason(token, now)
    if ended == "revoked":
        return inactive("revoked")
    # A spent old secret or a switched-off key is named ahead of an expiry (but after a
    # revocation), so the key's end is read once and its answer used at two points.
    if token.presented_previous_secret and (
        token.previous_secret_expires_at is None or token.previous_secret_expires_at <= now
    ):
        return inactive("rotated")
    if not token.active:
        return inactive("inactive")
    if ended is not None:
        # Clients are told "expired" alike for a date passed and for disuse.
        return inactive("expired")
    if token.allowed_cidrs and not ip_in_ranges(client_ip, token.allowed_cidrs):
        return inactive("ip_not_allowed")
    if team_id is not None and role is None:
        return inactive("not_member")
    permissions = (
        effective_permissions(set(token.permissions), role)
        if role is not None
        else token.permissions
    )
    return {
        "active": True,
        "token_id": token.id,
        "user_id": token.user_id,
        "team_id": team_id,
        "permissions": sorted(permissions),
        "expires_at": token.expires_at.isoformat() if token.expires_at else None,
    }
