"""Webhook routes: ``/v1/teams/{team}/webhooks``."""

from __future__ import annotations

import base64
import re
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import urlsplit

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection
from yarl import URL

from services.shared import (
    DELIVERY_RATE_MAX,
    DELIVERY_RATE_MIN,
    REDACTED,
    Actor,
    Conflict,
    Description,
    EventType,
    Name,
    NotFound,
    ObjectType,
    OpenApi,
    Settings,
    ValidationFailed,
    as_utc,
    host_problem,
    is_reserved_header,
    json_response,
    new_id,
    parse_body,
    parse_query,
    record_audit,
    redacted,
    refused_reason,
    tables,
    utcnow,
)

from .authn import Principal
from .context import CONTEXT
from .paging import IdPageQuery

# fullmatch: "$" would also take a name ending in a newline.
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")
# Visible ASCII, spaces and tabs: receivers refuse control characters, and read a value
# past ASCII (RFC 9110's obs-text) as Latin-1, UTF-8 or not at all.
_BAD_VALUE_CHARACTER = re.compile(r"[^\t\x20-\x7e]")
# Whitespace and control characters: urlsplit drops some of them silently, so the URL
# stored would not be the one called, and PostgreSQL cannot store NUL at all.
_BAD_URL_CHARACTER = re.compile(r"[\x00-\x20\x7f]")


def new_signing_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def check_webhook_url(url: str) -> str:
    if _BAD_URL_CHARACTER.search(url):
        raise ValueError("must not contain spaces or control characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError("must be an http or https URL")
    if not parts.hostname:
        raise ValueError("must name a host")
    if parts.username or parts.password:
        raise ValueError("must not carry credentials; use custom headers instead")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError("the port must be a number from 1 to 65535")
    try:
        parts.hostname.encode("idna")
    except UnicodeError:
        raise ValueError("must name a valid host (labels of 1 to 63 characters)") from None
    try:
        # The parser the dispatcher's requests use: a URL only this check reads (a
        # backslash in the host, say) would be stored and then fail every delivery.
        URL(url)
    except ValueError as exc:
        raise ValueError(f"is not a URL a request can be sent to: {exc}") from None
    return url


class _WebhookRules(BaseModel):
    """Field rules shared by create and update."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @field_validator("url", check_fields=False)
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else check_webhook_url(value)

    @field_validator("headers", check_fields=False)
    @classmethod
    def _headers(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        seen: set[str] = set()
        for name, header_value in (value or {}).items():
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a valid header name")
            lowered = name.lower()
            if is_reserved_header(name):
                raise ValueError(
                    f"{name!r} is hookwire's to set (or not the receiver's: hop-by-hop, for a"
                    " proxy): a webhook cannot set it"
                )
            if lowered in seen:
                raise ValueError(f"{name!r} is given twice (header names ignore case)")
            seen.add(lowered)
            if _BAD_VALUE_CHARACTER.search(header_value) or len(header_value) > 1024:
                raise ValueError(
                    f"value of {name!r} must be at most 1024 visible ASCII characters,"
                    " spaces or tabs"
                )
        return value


# Webhooks read per query when a list is filtered by topic (filtered here, not in SQL).
_TOPIC_SCAN_ROWS = 500


class WebhookCreate(_WebhookRules):
    name: Name
    description: Description = ""
    url: str = Field(max_length=2048)
    topics: list[EventType] = Field(min_length=1, max_length=4)
    object_types: list[ObjectType] | None = Field(default=None, min_length=1, max_length=100)
    headers: dict[str, str] = Field(default_factory=dict, max_length=20)
    active: bool = True
    rate_limit: float | None = Field(default=None, ge=DELIVERY_RATE_MIN, le=DELIVERY_RATE_MAX)

    @field_validator("headers")
    @classmethod
    def _no_stand_ins(cls, value: dict[str, str]) -> dict[str, str]:
        # A view shows stored credentials as the stand-in; a webhook made from a copied
        # view would store the stand-in and send it instead of the credential.
        for name, header_value in value.items():
            if header_value == REDACTED:
                raise ValueError(
                    f"{name}: {REDACTED} stands for a stored value, and a new webhook has"
                    " none: give the value in full"
                )
        return value


class WebhookUpdate(_WebhookRules):
    name: Name | None = None
    description: Description | None = None
    url: str | None = Field(default=None, max_length=2048)
    topics: list[EventType] | None = Field(default=None, min_length=1, max_length=4)
    object_types: list[ObjectType] | None = Field(default=None, min_length=1, max_length=100)
    headers: dict[str, str] | None = Field(default=None, max_length=20)
    active: bool | None = None
    rate_limit: float | None = Field(default=None, ge=DELIVERY_RATE_MIN, le=DELIVERY_RATE_MAX)


_VIEW_FIELDS = (
    "id",
    "team_id",
    "name",
    "description",
    "url",
    "topics",
    "object_types",
    "headers",
    "active",
    "rate_limit",
    "created_at",
    "updated_at",
)


async def check_reachable(settings: Settings, url: str) -> None:
    """Refuse URLs that resolve to private addresses now, not only at delivery time; with
    private addresses allowed, only a host no delivery could reach."""
    reason = host_problem(url) if settings.allow_private_urls else await refused_reason(url)
    if reason is not None:
        raise ValidationFailed.for_field("url", reason)


def actor(principal: Principal, request: web.Request) -> Actor:
    return Actor(user_id=principal.user_id, token_id=principal.token_id, ip=request.remote)


def webhook_view(row: Mapping[Any, Any]) -> dict[str, Any]:
    view = {name: row[name] for name in _VIEW_FIELDS}
    # Anyone who may read webhooks sees them; credential-like values are not theirs to see.
    view["headers"] = redacted(row["headers"]) if row["headers"] else row["headers"]
    view["created_at"] = as_utc(row["created_at"])
    view["updated_at"] = as_utc(row["updated_at"])
    # When it went to the trash (null for a live webhook), as an object's view says.
    view["deleted_at"] = as_utc(row.get("deleted_at"))
    view["previous_secret_expires_at"] = previous_secret_expires_at(row["secrets"])
    return view


def previous_secret_expires_at(stored: Any, now: datetime | None = None) -> datetime | None:
    """When the secret a rotation replaced stops signing: the latest end of a grace still
    running at ``now`` (null when none is). Only the time: never a secret."""
    if now is None:
        now = utcnow()
    ends = []
    for entry in stored or ():
        raw = entry.get("expires_at") if isinstance(entry, Mapping) else None
        if not isinstance(raw, str):
            continue
        try:
            end = as_utc(datetime.fromisoformat(raw))
        except (ValueError, OverflowError):
            # Written by hand: no time, or one past the calendar's end in UTC. The view
            # must not fail for it (the dispatcher drops such a webhook from its table).
            continue
        if end > now:
            ends.append(end)
    return max(ends, default=None)


async def create_webhook(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    principal = await ctx.authorize(request, "webhook:create")
    body = await parse_body(request, WebhookCreate)
    await check_reachable(ctx.settings, body.url)
    now = utcnow()
    secret = new_signing_secret()
    webhook_id = new_id("wh")
    values = {
        "id": webhook_id,
        "team_id": principal.team_id,
        "name": body.name,
        "description": body.description,
        "url": body.url,
        "topics": sorted(set(body.topics)),
        "object_types": sorted(set(body.object_types)) if body.object_types else None,
        "headers": body.headers,
        "secrets": [{"secret": secret, "expires_at": None}],
        "active": body.active,
        "rate_limit": body.rate_limit,
        "created_at": now,
        "updated_at": now,
    }
    async with ctx.engine.begin() as conn:
        await _refuse_past_the_limit(conn, principal.team_id, ctx.settings.max_webhooks_per_team)
        await conn.execute(insert(tables.webhooks).values(**values))
        await record_audit(
            conn,
            actor(principal, request),
            "webhook.created",
            "webhook",
            webhook_id,
            team_id=principal.team_id,
            details={"url": body.url, "topics": values["topics"]},
        )
    await ctx.changes.notify("webhook", webhook_id, "created", principal.team_id)
    # Its ETag too: a first edit with If-Match needs no read before it.
    return json_response(
        {**webhook_view(values), "secret": secret},
        status=201,
        headers=webhook_etag(now),
    )


async def _refuse_past_the_limit(conn: AsyncConnection, team_id: str, limit: int) -> None:
    # Those in the trash count too: restoring one must never pass the limit. Creations at
    # the same moment may all pass at the last place: a bound on growth, not an exact
    # count.
    count = (
        await conn.execute(
            select(func.count())
            .select_from(tables.webhooks)
            .where(tables.webhooks.c.team_id == team_id)
        )
    ).scalar_one()
    if count >= limit:
        raise Conflict(
            f"the team has {count} webhooks (the trash included), the most allowed: "
            "delete some for good first",
            details={"limit": limit},
        )


class WebhookQuery(IdPageQuery):
    id_prefix = "wh"

    active: Literal["true", "false"] | None = None
    topic: EventType | None = None
    # The trash, whose webhooks can be restored (or deleted for good) by their id.
    trashed: Literal["true", "false"] = "false"


async def list_webhooks(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    principal = await ctx.authorize(request, "webhook:read")
    query = parse_query(request, WebhookQuery)
    _hooks = tables.webhooks
    trashed = query.trashed == "true"
    conditions = [
        _hooks.c.team_id == principal.team_id,
        _hooks.c.deleted_at.is_not(None) if trashed else _hooks.c.deleted_at.is_(None),
    ]
    if query.active is not None:
        conditions.append(_hooks.c.active.is_(query.active == "true"))
    if query.cursor is not None:
        # Ids are time-ordered: the last id of a page is where the next one starts.
        conditions.append(_hooks.c.id > query.cursor)
    async with ctx.engine.connect() as conn:
        rows = await _rows_of_page(conn, conditions, query)
    page = rows[: query.limit]
    return json_response(
        {
            "data": [webhook_view(row._mapping) for row in page],
            "next_cursor": page[-1].id if len(rows) > query.limit else None,
        }
    )


async def _rows_of_page(
    conn: AsyncConnection, conditions: list[Any], query: WebhookQuery
) -> list[Any]:
    """Up to a page and one more, in id order. Topics are a JSON list, filtered here to
    keep one query for both databases: read a chunk at a time, never the whole team's."""
    hooks = tables.webhooks
    chunk = query.limit + 1 if query.topic is None else _TOPIC_SCAN_ROWS
    found: list[Any] = []
    after = None
    while True:
        where = conditions if after is None else [*conditions, hooks.c.id > after]
        rows = (
            await conn.execute(select(hooks).where(*where).order_by(hooks.c.id).limit(chunk))
        ).all()
        found.extend(row for row in rows if query.topic is None or query.topic in row.topics)
        if len(found) > query.limit or len(rows) < chunk:
            return found[: query.limit + 1]
        after = rows[-1].id


async def get_webhook(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    principal = await ctx.authorize(request, "webhook:read")
    webhook_id = request.match_info["webhook_id"]
    async with ctx.engine.connect() as conn:
        row = (
            await conn.execute(
                select(tables.webhooks).where(
                    tables.webhooks.c.id == webhook_id,
                    tables.webhooks.c.team_id == principal.team_id,
                    tables.webhooks.c.deleted_at.is_(None),
                )
            )
        ).first()
    if row is None:
        raise NotFound(f"webhook {webhook_id} not found")
    return json_response(webhook_view(row._mapping), headers=webhook_etag(row.updated_at))


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def webhook_etag(updated_at: datetime) -> dict[str, str]:
    """The ETag header of a webhook as of its last change (every change sets the time, to
    the microsecond)."""
    return {"ETag": f'"{(as_utc(updated_at) - _EPOCH) // timedelta(microseconds=1)}"'}


def add_routes(app: web.Application, spec: OpenApi) -> None:
    base = "/v1/teams/{team}/webhooks"
    spec.route(
        app,
        "POST",
        base,
        create_webhook,
        status=201,
        body=WebhookCreate,
        permission="webhook:create",
        errors=(401, 403, 404, 409, 413, 422, 503),
        summary="Create a webhook; the response carries its whsec_ signing secret",
    )
    spec.route(
        app,
        "GET",
        base,
        list_webhooks,
        permission="webhook:read",
        query=WebhookQuery,
        errors=(401, 403, 404, 422),
        summary=(
            "List the team's webhooks (active, topic filters; trashed=true for the trash;"
            " cursor paging)"
        ),
    )
    spec.route(
        app,
        "GET",
        base + "/{webhook_id}",
        get_webhook,
        permission="webhook:read",
        errors=(401, 403, 404),
        summary="Show a webhook",
    )
