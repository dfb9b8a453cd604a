"""Self-service token management: ``/v1/tokens``, with ``token:manage``."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy.ext.asyncio import AsyncEngine

from services.shared import (
    ChangeNotifier,
    Description,
    Name,
    NoFields,
    OpenApi,
    Settings,
    UtcDatetime,
    ValidationFailed,
    as_utc,
    json_response,
    parse_body,
    parse_query,
    record_audit,
    utcnow,
)

from . import store
from .callers import Caller, Callers, KeyUsage
from .errors import TokenEnded
from .introspection import ended_reason, state_of
from .tokens import lifetime_problem

MAX_GRACE_SECONDS = 30 * 24 * 3600


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: Name
    description: Description = ""
    permissions: list[str] = Field(default_factory=list, max_length=100)
    permission_group_id: str | None = Field(default=None, max_length=64)
    expires_at: UtcDatetime | None = None
    allowed_cidrs: list[str] | None = Field(default=None, min_length=1, max_length=50)
    inactivity_timeout_seconds: int | None = Field(
        default=None, ge=store.INACTIVITY_TIMEOUT_MIN_SECONDS, le=365 * 24 * 3600
    )

    @field_validator("allowed_cidrs")
    @classmethod
    def _cidrs(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        return [_network(cidr) for cidr in value]


def _network(cidr: str) -> str:
    try:
        return str(ipaddress.ip_network(cidr))
    except ValueError:
        loose = ipaddress.ip_network(cidr, strict=False)  # a range that is no range fails here
        # Taken as its range, a mistyped prefix length would widen the key without a word.
        raise ValueError(
            f"{cidr} has bits set past its /{loose.prefixlen}: did you mean {loose}, or"
            f" {cidr.partition('/')[0]}/{loose.max_prefixlen} for the one address?"
        ) from None


class TokenUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: Name | None = None
    description: Description | None = None
    active: bool | None = None


class TokenRotate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    grace_seconds: int = Field(default=0, ge=0, le=MAX_GRACE_SECONDS)


def _state(row: Any) -> str:
    return state_of(store.state_from_row(row), utcnow())


def token_view(row: Any) -> dict[str, Any]:
    now = utcnow()
    grace_until = as_utc(row.previous_expires_at)
    return {
        "id": row.id,
        "user_id": row.user_id,
        "name": row.name,
        "description": row.description,
        "display_prefix": row.display_prefix,
        "permissions": row.permissions,
        "permission_group_id": row.permission_group_id,
        # What the group gives the key now (it follows the group's edits): a key made from
        # a group alone showed `permissions: []` and nothing of what it could do.
        "group_permissions": (
            sorted(row.group_permissions) if row.permission_group_id is not None else None
        ),
        "state": _state(row),
        "active": row.active,
        "created_at": as_utc(row.created_at),
        "expires_at": as_utc(row.expires_at),
        "revoked_at": as_utc(row.revoked_at),
        "last_used_at": as_utc(row.last_used_at),
        "last_used_ip": row.last_used_ip,
        "allowed_cidrs": row.allowed_cidrs,
        "inactivity_timeout_seconds": row.inactivity_timeout_seconds,
        "previous_secret_valid_until": grace_until if grace_until and grace_until > now else None,
    }


def _update_action(values: dict[str, Any]) -> str:
    if values.get("active") is False:
        return "token.deactivated"
    if values.get("active") is True:
        return "token.reactivated"
    return "token.updated"


def _why_ended(row: Any, usage: KeyUsage, now: datetime) -> str | None:
    """Why the key can never be used again (revoked, or expired: its ``expires_at`` has
    passed, or it went unused past its inactivity timeout), or None while it can. No route
    moves either back: a secret or a switch-on given to such a key would be dead on
    arrival."""
    # This process's uses not yet written count, as on every other check of idleness.
    state = usage.latest(store.state_from_row(row))
    ended = ended_reason(state, now)
    if ended == "revoked":
        return "was revoked"
    if ended == "expired":
        assert state.expires_at is not None
        return f"expired at {state.expires_at.isoformat()}"
    if ended == "idle":
        return "expired, unused for longer than its inactivity timeout"
    return None


def _require_not_ended(row: Any, usage: KeyUsage, doing: str) -> None:
    why = _why_ended(row, usage, utcnow())
    if why is not None:
        raise TokenEnded(
            f"the token cannot be {doing}: it {why}. A revoked or expired key stays ended; "
            "create a new key instead"
        )


def _require_may_hold(caller: Caller, row: Any, verb: str) -> None:
    """Rotating or reactivating a key hands out its power again: only a key that could
    have created it may (its permissions, its end, its networks)."""
    caller.require_all(set(row.permissions) | set(row.group_permissions or ()))
    caller.require_no_wider(as_utc(row.expires_at), row.allowed_cidrs, verb=verb)


@dataclass(frozen=True)
class TokenRoutes:
    settings: Settings
    engine: AsyncEngine
    pepper: str
    callers: Callers
    changes: ChangeNotifier

    async def _caller(self, request: web.Request) -> Caller:
        return await self.callers.identify(request, permission="token:manage")

    def _check_expiry(self, body: TokenCreate) -> None:
        problem = lifetime_problem(body.expires_at, utcnow(), self.settings.token_max_lifetime_days)
        if problem is not None:
            raise ValidationFailed.for_field("expires_at", problem)

    async def create(self, request: web.Request) -> web.Response:
        caller = await self._caller(request)
        body = await parse_body(request, TokenCreate)
        self._check_expiry(body)
        caller.require_no_wider(body.expires_at, body.allowed_cidrs)
        store.check_known(body.permissions)
        if not body.permissions and body.permission_group_id is None:
            raise ValidationFailed.for_field(
                "permissions", "give permissions or a permission_group_id"
            )
        async with self.engine.begin() as conn:
            wanted = set(body.permissions)
            if body.permission_group_id is not None:
                wanted |= await store.group_permissions(
                    conn, caller.user_id, body.permission_group_id
                )
            caller.require_all(wanted)
            token_id, plaintext = await store.create_token(
                conn,
                pepper=self.pepper,
                user_id=caller.user_id,
                name=body.name,
                permissions=body.permissions,
                description=body.description,
                expires_at=body.expires_at,
                allowed_cidrs=body.allowed_cidrs,
                inactivity_timeout_seconds=body.inactivity_timeout_seconds,
                permission_group_id=body.permission_group_id,
            )
            await record_audit(
                conn,
                caller.actor,
                "token.created",
                "token",
                token_id,
                details={"name": body.name, "permissions": sorted(wanted)},
            )
            row = await store.token_row(conn, caller.user_id, token_id)
        await self.changes.notify("token", token_id, "created", state="active")
        return json_response({**token_view(row), "token": plaintext}, status=201)

    async def list(self, request: web.Request) -> web.Response:
        caller = await self._caller(request)
        parse_query(request, NoFields)
        async with self.engine.connect() as conn:
            rows = await store.token_rows(conn, caller.user_id)
        return json_response({"data": [token_view(row) for row in rows]})

    async def show(self, request: web.Request) -> web.Response:
        caller = await self._caller(request)
        async with self.engine.connect() as conn:
            row = await store.token_row(conn, caller.user_id, request.match_info["token_id"])
        return json_response(token_view(row))

    async def _change(
        self,
        request: web.Request,
        caller: Caller,
        action: str,
        values: dict[str, Any],
        details: dict[str, Any] | None = None,
        *,
        unrevoked: bool = False,
        unexpired: bool = False,
        plan: Callable[[Any], tuple[str, dict[str, Any], dict[str, Any]]] | None = None,
    ) -> Any:
        """Apply the change and audit it; None when the token is revoked (``unrevoked``)
        or already expired (``unexpired``), and nothing was changed. ``plan`` is given the
        token's row first: it may refuse the change, or say which action, values and audit
        details it comes to (nothing to change: the row as it is, unaudited)."""
        token_id = request.match_info["token_id"]
        async with self.engine.begin() as conn:
            before = await store.token_row(conn, caller.user_id, token_id)
            if plan is not None:
                action, values, details = plan(before)
                if not values:
                    return before
            changed = await store.update_token(
                conn,
                token_id,
                values,
                unrevoked=unrevoked,
                unexpired_at=utcnow() if unexpired else None,
            )
            if not changed:
                return None
            await record_audit(conn, caller.actor, action, "token", token_id, details=details)
            row = await store.token_row(conn, caller.user_id, token_id)
        await self.changes.notify("token", token_id, "updated", state=_state(row))
        return row

    async def update(self, request: web.Request) -> web.Response:
        caller = await self._caller(request)
        body = await parse_body(request, TokenUpdate)
        values = body.model_dump(exclude_none=True)
        if not values:
            raise ValidationFailed.for_field(
                "body", "give at least one of name, description, active"
            )

        def plan(row: Any) -> tuple[str, dict[str, Any], dict[str, Any]]:
            wanted = dict(values)
            if "active" in wanted and (wanted["active"] or row.revoked_at is not None):
                # Checked before the no-op cases below: a whole view sent back to a key
                # that has ended is told so rather than answered as if it were live. An
                # expired key may still be switched off: that hands out nothing, and
                # another process may hold a use of it not yet written.
                _require_not_ended(row, self.callers.usage, "activated or deactivated")
            if wanted.get("active") is False and not row.active and row.revoked_at is None:
                # Already off: switched off again it would be audited twice and its
                # access tokens' refusal would start over.
                del wanted["active"]
            if wanted.get("active") is True and row.revoked_at is None:
                if row.active:
                    # Nothing to reactivate (a client sending a whole view back): only the
                    # other fields change, so a deactivation landing meanwhile stands.
                    del wanted["active"]
                else:
                    # A key deactivated as suspect comes back only through a key that
                    # could have made it.
                    _require_may_hold(caller, row, "reactivate")
            details = dict(wanted)
            if wanted.get("active") is False:
                # Its access tokens are refused for one lifetime from now (ended keys).
                wanted["deactivated_at"] = utcnow()
            return _update_action(details), wanted, details

        # A revoked or expired token has ended for good: (de)activating it would only make
        # its audit trail claim otherwise (the plan refuses it; the statement checks again
        # against a revocation or expiry committed since).
        row = await self._change(
            request,
            caller,
            _update_action(values),
            values,
            details=values,
            unrevoked="active" in values,
            # Only a switch-on is refused for an expiry in between: a switch-off hands out
            # nothing.
            unexpired=values.get("active") is True,
            plan=plan,
        )
        if row is None:
            raise TokenEnded(
                "the token was revoked or expired meanwhile and cannot be activated or "
                "deactivated; create a new key instead"
            )
        return json_response(token_view(row))

    async def revoke(self, request: web.Request) -> web.Response:
        caller = await self._caller(request)
        # Revoking again changes nothing: the first revocation's time and audit record stand.
        await self._change(
            request, caller, "token.revoked", {"revoked_at": utcnow()}, unrevoked=True
        )
        return web.Response(status=204)

    async def expire(self, request: web.Request) -> web.Response:
        caller = await self._caller(request)
        # It takes no body: one given (a date for a later expiry, say) is refused, not
        # ignored while the key ends now.
        await parse_body(request, NoFields, optional=True)
        row = await self._change(
            request,
            caller,
            "token.expired",
            {"expires_at": utcnow()},
            unrevoked=True,
            unexpired=True,
        )
        if row is None:
            async with self.engine.connect() as conn:
                ended = await store.token_row(conn, caller.user_id, request.match_info["token_id"])
            why = _why_ended(ended, self.callers.usage, utcnow()) or "ended meanwhile"
            raise TokenEnded(f"the token cannot be expired: it {why}; its record is kept")
        return json_response(token_view(row))

    async def rotate(self, request: web.Request) -> web.Response:
        caller = await self._caller(request)
        body = await parse_body(request, TokenRotate, optional=True)
        token_id = request.match_info["token_id"]
        grace_until = utcnow() + timedelta(seconds=body.grace_seconds)
        async with self.engine.begin() as conn:
            row = await store.token_row(conn, caller.user_id, token_id)
            _require_not_ended(row, self.callers.usage, "given a new secret")
            _require_may_hold(caller, row, "rotate")
            plaintext = await store.rotate_token(
                conn,
                pepper=self.pepper,
                row=row,
                previous_valid_until=grace_until,
                now=utcnow(),
            )
            await record_audit(
                conn,
                caller.actor,
                "token.rotated",
                "token",
                token_id,
                details={"grace_seconds": body.grace_seconds},
            )
            row = await store.token_row(conn, caller.user_id, token_id)
        await self.changes.notify("token", token_id, "updated", state=_state(row))
        return json_response({**token_view(row), "token": plaintext})

    def add_to(self, app: web.Application, spec: OpenApi) -> None:
        manage = "token:manage"
        one = "/v1/tokens/{token_id}"
        spec.route(
            app,
            "POST",
            "/v1/tokens",
            self.create,
            status=201,
            body=TokenCreate,
            permission=manage,
            errors=(401, 403, 404, 409, 413, 422),
            summary="Create a token; the response carries its secret, once",
        )
        spec.route(
            app,
            "GET",
            "/v1/tokens",
            self.list,
            permission=manage,
            summary="List the caller's tokens (never their secrets)",
        )
        spec.route(
            app,
            "GET",
            one,
            self.show,
            permission=manage,
            errors=(401, 403, 404),
            summary="Show one token",
        )
        spec.route(
            app,
            "PATCH",
            one,
            self.update,
            body=TokenUpdate,
            permission=manage,
            errors=(401, 403, 404, 409, 422),
            summary="Rename, describe, deactivate or reactivate a token",
        )
        spec.route(
            app,
            "DELETE",
            one,
            self.revoke,
            status=204,
            permission=manage,
            errors=(401, 403, 404),
            summary="Revoke a token at once",
        )
        spec.route(
            app,
            "POST",
            f"{one}/rotate",
            self.rotate,
            body=TokenRotate,
            body_required=False,
            permission=manage,
            errors=(401, 403, 404, 409, 422),
            summary="Rotate the secret now, or with a grace period for the old one",
        )
        spec.route(
            app,
            "POST",
            f"{one}/expire",
            self.expire,
            body=NoFields,
            body_required=False,
            permission=manage,
            errors=(401, 403, 404, 409, 413, 422),
            summary="Expire a token now",
        )
