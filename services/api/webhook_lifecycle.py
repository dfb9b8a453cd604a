"""Changing webhooks: update, deactivate, trash, restore, force-delete, rotate the secret.

Every change is audited in its transaction and announced on ``changes``, so dispatchers
reload the webhook within a second.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import and_, case, delete, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection
from yarl import URL

from services.shared import (
    REDACTED,
    Conflict,
    NoFields,
    NotFound,
    OpenApi,
    ValidationFailed,
    is_secret_header,
    json_response,
    parse_body,
    record_audit,
    tables,
    utcnow,
)

from . import delivery_log
from .authn import Principal
from .context import CONTEXT, ApiContext
from .errors import PreconditionFailed
from .preconditions import if_match, require_match
from .trash import live_or_trashed
from .webhooks import (
    WebhookUpdate,
    actor,
    check_reachable,
    new_signing_secret,
    previous_secret_expires_at,
    webhook_etag,
    webhook_view,
)

_webhooks = tables.webhooks
DEFAULT_GRACE_SECONDS = 24 * 3600


class SecretRotation(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    grace_seconds: int = Field(default=DEFAULT_GRACE_SECONDS, ge=0, le=30 * 24 * 3600)


async def find_webhook(
    conn: AsyncConnection, team_id: str, webhook_id: str, *, trashed: bool = False
) -> Any:
    row = (
        await conn.execute(
            select(_webhooks).where(_webhooks.c.id == webhook_id, _webhooks.c.team_id == team_id)
        )
    ).first()
    if row is None or (row.deleted_at is not None) != trashed:
        raise NotFound(f"webhook {webhook_id} not found" + (" in the trash" if trashed else ""))
    return row


async def _change(
    ctx: ApiContext,
    request: web.Request,
    principal: Principal,
    action: str,
    values: dict[str, Any] | None,
    *,
    trashed: bool = False,
    details: dict[str, Any] | None = None,
    unchanged_since: datetime | None = None,
    switching: bool | None = None,
) -> Any:
    """Apply ``values`` (or delete the row when None), audit, announce; returns the new row.

    With ``unchanged_since`` (the ``updated_at`` the values were computed from), a change
    made meanwhile by another request is a 409 rather than silently overwritten. With
    ``switching`` (the ``active`` an update sets among other changes), an update that
    switches the webhook off or on is audited as that, judged by the row as read here.
    """
    webhook_id = request.match_info["webhook_id"]
    async with ctx.engine.begin() as conn:
        current = await find_webhook(conn, principal.team_id, webhook_id, trashed=trashed)
        if switching is not None and switching != current.active:
            action = "webhook.reactivated" if switching else "webhook.deactivated"
        where = _webhooks.c.id == webhook_id
        if values is None:
            deleted = await conn.execute(delete(_webhooks).where(where))
            if deleted.rowcount != 1:
                # Another request deleted it since it was read: that one is audited.
                raise NotFound(f"webhook {webhook_id} not found")
            await delivery_log.forget_webhook(conn, webhook_id)
            row = None
        else:
            # Still where it was read (live or in the trash): a trash or restore committed
            # meanwhile makes this change a conflict, not a change to the other state.
            in_place = (
                _webhooks.c.deleted_at.is_not(None) if trashed else _webhooks.c.deleted_at.is_(None)
            )
            guarded = and_(where, in_place)
            if unchanged_since is not None:
                guarded = and_(where, _webhooks.c.updated_at == unchanged_since)
            result = await conn.execute(
                update(_webhooks).where(guarded).values(updated_at=utcnow(), **values)
            )
            if result.rowcount != 1:
                raise Conflict("the webhook changed while this request ran; try again")
            row = (await conn.execute(select(_webhooks).where(where))).first()
        await record_audit(
            conn,
            actor(principal, request),
            action,
            "webhook",
            webhook_id,
            team_id=principal.team_id,
            details=details,
        )
    await ctx.changes.notify(
        "webhook", webhook_id, "deleted" if values is None else "updated", principal.team_id
    )
    return row


async def update_webhook(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    principal = await ctx.authorize(request, "webhook:update")
    body = await _parse_update(request)
    values = body.model_dump(exclude_unset=True)
    if not values:
        raise ValidationFailed.for_field("body", "give at least one field to change")
    if body.url is not None:
        await check_reachable(ctx.settings, body.url)
    for field in ("topics", "object_types"):
        if values.get(field) is not None:
            values[field] = sorted(set(values[field]))
    if "active" in values and values["active"] is None:
        raise ValidationFailed.for_field("active", "must be true or false")
    action = "webhook.updated"
    if set(values) == {"active"}:
        action = "webhook.reactivated" if values["active"] else "webhook.deactivated"
    details = _redacted(values)
    unchanged_since = None
    keeps_secrets = bool(values.get("headers")) and REDACTED in values["headers"].values()
    wanted = if_match(request)
    # Switched off or on along with other changes: the audit log still names it so (a
    # search for deactivations must find it), when it changes the webhook's state.
    switching = values["active"] if "active" in values and action == "webhook.updated" else None
    if keeps_secrets or "url" in values or wanted is not None:
        async with ctx.engine.connect() as conn:
            current = await find_webhook(conn, principal.team_id, request.match_info["webhook_id"])
        unchanged_since = current.updated_at
        # A view's headers sent back with one changed would otherwise undo whatever
        # another client changed since that view was read.
        require_match(wanted, webhook_etag(current.updated_at)["ETag"], "webhook")
        kept = [name for name, value in values.get("headers", {}).items() if value == REDACTED]
        if keeps_secrets:
            # A view shows credential-like values as "[redacted]"; sent back unchanged,
            # that stands for the value stored.
            values["headers"] = _kept_secrets(values["headers"], current.headers or {})
        if "url" in values:
            if "headers" not in values:
                kept = [name for name in current.headers or {} if is_secret_header(name)]
            _refuse_carrying_secrets_elsewhere(current.url, values["url"], kept)
    # Reactivated or pointed elsewhere: failures before now say nothing of what follows.
    # Only then: a client sending the whole state on every edit (its "active": true, its
    # url unchanged) must not keep a dead endpoint from ever being disabled. Decided in
    # the UPDATE, against the row as it is then.
    restarts = []
    if values.get("active") is True:
        restarts.append(_webhooks.c.active.is_(False))
    if "url" in values:
        restarts.append(_webhooks.c.url != values["url"])
    if restarts:
        # A copy: the audit details may be this very dict.
        values = {
            **values,
            "failing_since": case((or_(*restarts), None), else_=_webhooks.c.failing_since),
        }
    try:
        row = await _change(
            ctx,
            request,
            principal,
            action,
            values,
            details=details,
            unchanged_since=unchanged_since,
            switching=switching,
        )
    except Conflict:
        if wanted is None:
            raise
        # Changed between the If-Match check and the write: the same answer as before it.
        raise PreconditionFailed("the webhook changed since you read it") from None
    return json_response(webhook_view(row._mapping), headers=webhook_etag(row.updated_at))


def _refuse_carrying_secrets_elsewhere(stored_url: str, url: str, kept: list[str]) -> None:
    """Stored credential headers (``kept``) go only where they were given for: pointing
    the webhook at another origin while keeping them would let anyone who may edit
    webhooks, but may never read those values, have them sent to a server of theirs."""
    if kept and _origin(url) != _origin(stored_url):
        raise ValidationFailed.for_field(
            "headers",
            f"the url points at another origin: give {', '.join(sorted(kept))} again in full, "
            "or leave them out",
        )


def _origin(url: str) -> tuple[str, str, int | None]:
    # Scheme, host and port as a connection sees them: a default port written out, a
    # host's case or its trailing dot change nothing.
    parsed = URL(url)
    return parsed.scheme, (parsed.host or "").rstrip(".").lower(), parsed.port


def _kept_secrets(headers: dict[str, str], stored: dict[str, str]) -> dict[str, str]:
    stored_by_name = {name.lower(): value for name, value in stored.items()}
    kept = {}
    for name, value in headers.items():
        if value == REDACTED:
            if name.lower() not in stored_by_name:
                raise ValidationFailed.for_field(
                    "headers", f"{name}: {REDACTED} stands for a stored value, and there is none"
                )
            value = stored_by_name[name.lower()]
        kept[name] = value
    return kept


async def _parse_update(request: web.Request) -> WebhookUpdate:
    body = await parse_body(request, WebhookUpdate)
    for required in ("name", "description", "url", "topics", "headers"):
        if required in body.model_fields_set and getattr(body, required) is None:
            raise ValidationFailed.for_field(required, "cannot be null")
    return body


def _redacted(values: dict[str, Any]) -> dict[str, Any]:
    # Custom headers often carry credentials; the audit log names them without values.
    if "headers" in values:
        return {**values, "headers": sorted(values["headers"])}
    return values


async def delete_webhook(request: web.Request) -> web.Response:
    """To the trash (``webhook:delete``), or for good with ``?force=true``
    (``webhook:force-delete``, also for a webhook already in the trash)."""
    ctx = request.app[CONTEXT]
    principal, force = await ctx.authorize_by_flag(
        request, "force", "webhook:force-delete", "webhook:delete"
    )
    if force:
        # Live or already in the trash; in neither, plainly not found.
        await live_or_trashed(
            lambda trashed: _change(
                ctx, request, principal, "webhook.force_deleted", None, trashed=trashed
            )
        )
    else:
        await _change(ctx, request, principal, "webhook.deleted", {"deleted_at": utcnow()})
    return web.Response(status=204)


async def restore_webhook(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    principal = await ctx.authorize(request, "webhook:delete")
    await parse_body(request, NoFields, optional=True)
    # Failures before it went to the trash say nothing of what follows, as for a
    # reactivation: kept, the first failure after a week in the trash would disable it.
    restored = {"deleted_at": None, "failing_since": None}
    row = await _change(ctx, request, principal, "webhook.restored", restored, trashed=True)
    return json_response(webhook_view(row._mapping))


async def rotate_secret(request: web.Request) -> web.Response:
    """A new signing secret; the old one keeps signing alongside it for ``grace_seconds``."""
    ctx = request.app[CONTEXT]
    principal = await ctx.authorize(request, "webhook:update")
    body = await parse_body(request, SecretRotation, optional=True)
    async with ctx.engine.connect() as conn:
        current = await find_webhook(conn, principal.team_id, request.match_info["webhook_id"])
    now = utcnow()
    until = (now + timedelta(seconds=body.grace_seconds)).isoformat()
    # The current secret keeps signing until the grace ends; with no grace it stops now.
    # One previous secret at most (as for keys): rotating again during a grace ends that
    # grace. Every secret kept signs every delivery, and a signature header grows with each.
    kept = [
        {**entry, "expires_at": until}
        for entry in current.secrets
        if body.grace_seconds and entry.get("expires_at") is None
    ]
    secret = new_signing_secret()
    row = await _change(
        ctx,
        request,
        principal,
        "webhook.secret_rotated",
        {"secrets": [*kept, {"secret": secret, "expires_at": None}]},
        details={"grace_seconds": body.grace_seconds},
        # Two rotations at once would each keep the secrets they read and lose the other's.
        unchanged_since=current.updated_at,
    )
    return json_response(
        {
            **webhook_view(row._mapping),
            "secret": secret,
            # Read as the view reads it, but at the rotation's own time: a grace of a
            # second could otherwise be over by the time the view looks.
            "previous_secret_expires_at": previous_secret_expires_at(row.secrets, now),
        }
    )


def add_routes(app: web.Application, spec: OpenApi) -> None:
    one = "/v1/teams/{team}/webhooks/{webhook_id}"
    spec.route(
        app,
        "PATCH",
        one,
        update_webhook,
        body=WebhookUpdate,
        headers={"If-Match": "The ETag last read; 412 when the webhook changed since"},
        permission="webhook:update",
        errors=(401, 403, 404, 409, 412, 413, 422),
        summary=(
            "Edit a webhook (name, description, url, topics, filters, headers, active,"
            " rate_limit); If-Match optional"
        ),
    )
    spec.route(
        app,
        "DELETE",
        one,
        delete_webhook,
        status=204,
        flags=("force",),
        permission="webhook:delete",
        errors=(401, 403, 404, 409, 422),
        summary="Move to the trash; ?force=true deletes for good (webhook:force-delete)",
    )
    spec.route(
        app,
        "POST",
        one + "/restore",
        restore_webhook,
        body=NoFields,
        body_required=False,
        permission="webhook:delete",
        errors=(401, 403, 404, 409, 413, 422),
        summary="Restore a webhook from the trash",
    )
    spec.route(
        app,
        "POST",
        one + "/rotate-secret",
        rotate_secret,
        body=SecretRotation,
        body_required=False,
        permission="webhook:update",
        errors=(401, 403, 404, 409, 422),
        summary="New signing secret; the old one also signs for grace_seconds (24 h)",
    )
