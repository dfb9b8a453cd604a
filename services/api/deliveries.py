"""The delivery log and re-sending: list, show, retry, replay, and the test event.

Re-sends go back through the dispatcher as ``manual`` deliveries on the ``deliveries``
topic, with the same delivery id (so the same ``webhook-id`` header: receivers that
de-duplicate see a repeat, not a new event) and the next attempt number. A manual
delivery gets one attempt; its outcome lands in the same log. Each call that re-sends
leaves one audit record on the webhook.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError
from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from services.shared import (
    DELIVERY_STATES,
    TEST_EVENT_TYPE,
    Conflict,
    Delivery,
    Event,
    JsonObject,
    NoFields,
    NotFound,
    OpenApi,
    TooManyRequests,
    UtcDatetime,
    as_utc,
    get_logger,
    json_response,
    later_than_since,
    new_id,
    parse_body,
    parse_query,
    record_audit,
    tables,
    utcnow,
)

from . import delivery_log
from .authn import Principal
from .context import CONTEXT, ApiContext
from .errors import PublishOutcomeUnknown, PublishUnavailable, ReplayInterrupted
from .outbox import check_event_size
from .paging import PageQuery
from .trash import live_or_trashed
from .webhook_lifecycle import find_webhook
from .webhooks import actor

MAX_REPLAY = 10_000
# Deliveries read and sent at a time by a replay: each row carries its event (up to
# 900,000 bytes for an object grown by merges), held a few times over while it is sent;
# 50 keeps that under about 150 MB at worst, a few megabytes for ordinary events.
_REPLAY_CHUNK = 50
_TEST_MESSAGE = "This is a test event from hookwire; it changes nothing."


class DeliveryQuery(PageQuery):
    state: str | None = Field(
        default=None, description="Comma-separated: pending, delivered, retrying, failed, skipped"
    )
    # Empty, it filtered for no webhook and answered an empty list as if applied.
    webhook_id: str | None = Field(default=None, min_length=1, max_length=64)
    since: UtcDatetime | None = None
    until: UtcDatetime | None = None

    _window = field_validator("until")(later_than_since)

    @field_validator("state")
    @classmethod
    def _states(cls, value: str | None) -> str | None:
        if value is None:
            return None
        unknown = sorted(set(value.split(",")) - set(DELIVERY_STATES))
        if unknown:
            raise ValueError(f"unknown state {', '.join(unknown)}; one of {DELIVERY_STATES}")
        return value


class WebhookDeliveryQuery(DeliveryQuery):
    # The webhook is the one in the path: never given here too.
    webhook_id: None = Field(default=None, exclude=True)

    @field_validator("webhook_id", mode="before")
    @classmethod
    def _given_by_the_path(cls, value: object) -> None:
        raise PydanticCustomError(
            "given_by_the_path",
            "the webhook is the one in the path; leave webhook_id out"
            " (it narrows the team-wide /deliveries list)",
        )


class ReplayRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    since: UtcDatetime
    until: UtcDatetime | None = None
    only_failed: bool = Field(
        default=False,
        description="Re-send only deliveries not delivered (failed, retrying or skipped)",
    )

    _window = field_validator("until")(later_than_since)


class TestEventRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    data: JsonObject = Field(default_factory=dict)


async def _list(
    request: web.Request, principal: Principal, query: DeliveryQuery, webhook_id: str | None
) -> web.Response:
    ctx = request.app[CONTEXT]
    where = delivery_log.DeliveryFilter(
        team_id=principal.team_id,
        webhook_id=webhook_id,
        states=tuple(query.state.split(",")) if query.state else (),
        since=query.since,
        until=query.until,
    )
    async with ctx.engine.connect() as conn:
        rows = await delivery_log.page(conn, where, limit=query.limit, cursor=query.cursor)
        shown = rows[: query.limit]
        attempts = await delivery_log.attempts_of(conn, [row.id for row in shown])
    return json_response(
        {
            "data": [delivery_log.delivery_view(row, attempts[row.id]) for row in shown],
            "next_cursor": delivery_log.encode_cursor(shown[-1])
            if len(rows) > query.limit
            else None,
        }
    )


async def list_deliveries(request: web.Request) -> web.Response:
    principal = await request.app[CONTEXT].authorize(request, "webhook:read")
    query = parse_query(request, DeliveryQuery)
    return await _list(request, principal, query, query.webhook_id)


async def list_webhook_deliveries(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    principal = await ctx.authorize(request, "webhook:read")
    query = parse_query(request, WebhookDeliveryQuery)
    webhook_id = request.match_info["webhook_id"]
    async with ctx.engine.connect() as conn:
        await _existing_webhook(conn, principal.team_id, webhook_id)
    return await _list(request, principal, query, webhook_id)


async def _existing_webhook(conn: Any, team_id: str, webhook_id: str) -> Any:
    # A trashed webhook's log stays readable until it is deleted for good.
    return await live_or_trashed(
        lambda trashed: find_webhook(conn, team_id, webhook_id, trashed=trashed)
    )


async def get_delivery(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    principal = await ctx.authorize(request, "webhook:read")
    async with ctx.engine.connect() as conn:
        row = await delivery_log.find(conn, principal.team_id, request.match_info["delivery_id"])
        attempts = await delivery_log.attempts_of(conn, [row.id], detailed=True)
    return json_response(delivery_log.delivery_view(row, attempts[row.id], detailed=True))


async def _sendable_webhook(ctx: ApiContext, team_id: str, webhook_id: str) -> None:
    async with ctx.engine.connect() as conn:
        webhook = await _existing_webhook(conn, team_id, webhook_id)
    if webhook.deleted_at is not None:
        raise Conflict(f"webhook {webhook_id} is in the trash; restore it to send to it")
    if not webhook.active:
        raise Conflict(f"webhook {webhook_id} is inactive; reactivate it to send to it")


async def _resends(conn: AsyncConnection, rows: Sequence[Any]) -> list[Delivery]:
    """Each row's re-send, numbered after every attempt made or asked for. The number is
    taken in the log itself: two re-sends a moment apart (the first one's attempt not yet
    recorded) would otherwise share one. A re-send whose publish then fails leaves its
    number unused. A delivery pruned meanwhile is not re-sent."""
    if not rows:
        return []
    deliveries = tables.deliveries
    ids = sorted(row.id for row in rows)
    # Locked in id order first, the order the log's writer takes them in too: in the
    # order an UPDATE happens to scan them, the two could deadlock on PostgreSQL.
    await conn.execute(
        select(deliveries.c.id)
        .where(deliveries.c.id.in_(ids))
        .order_by(deliveries.c.id)
        .with_for_update()
    )
    numbered = await conn.execute(
        update(deliveries)
        .where(deliveries.c.id.in_(ids))
        .values(attempts=deliveries.c.attempts + 1)
        .returning(deliveries.c.id, deliveries.c.attempts)
    )
    taken: dict[str, int] = {row.id: row.attempts for row in numbered}
    return [
        Delivery(
            id=row.id,
            webhook_id=row.webhook_id,
            attempt=taken[row.id],
            event=Event.model_validate(row.event),
            kind="manual",
        )
        for row in rows
        if row.id in taken
    ]


async def _publish(ctx: ApiContext, deliveries: list[Delivery]) -> None:
    await ctx.outbox.publish_all(
        [(ctx.topics.deliveries, delivery.webhook_id, delivery) for delivery in deliveries]
    )


def _spent(ctx: ApiContext, team_id: str) -> TooManyRequests:
    return TooManyRequests(
        "this team has re-sent its deliveries allowed for now"
        f" (HOOKWIRE_RESENDS_PER_TEAM_PER_HOUR: {ctx.settings.resends_per_team_per_hour})",
        retry_after=max(1, ctx.resends.seconds_until(team_id, 1)),
    )


async def _publish_resends(ctx: ApiContext, team_id: str, deliveries: list[Delivery]) -> None:
    """Publish re-sends taken from the team's budget; those not made are given back. One
    whose outcome is unknown may be in the stream, and counts."""
    try:
        await _publish(ctx, deliveries)
    except PublishOutcomeUnknown:
        raise
    except Exception:
        ctx.resends.give_back(team_id, len(deliveries))
        raise


async def _publish_one(ctx: ApiContext, team_id: str, delivery: Delivery) -> None:
    if not ctx.resends.take(team_id, 1):
        raise _spent(ctx, team_id)
    await _publish_resends(ctx, team_id, [delivery])


async def _audit(
    request: web.Request,
    principal: Principal,
    action: str,
    webhook_id: str,
    details: dict[str, Any],
) -> None:
    """One record per call, once its re-sends are in the stream: there is no change to
    commit it with. Should it not be written, the call still answers what it did (a 5xx
    would have the caller send it all again); the log line keeps the record."""
    who = actor(principal, request)
    try:
        async with request.app[CONTEXT].engine.begin() as conn:
            await record_audit(
                conn, who, action, "webhook", webhook_id, team_id=principal.team_id, details=details
            )
    except SQLAlchemyError as exc:
        get_logger("api").error(
            "audit_record_lost",
            action=action,
            webhook_id=webhook_id,
            team_id=principal.team_id,
            user_id=who.user_id,
            token_id=who.token_id,
            ip=who.ip,
            details=details,
            error=type(exc).__name__,
        )


async def retry_delivery(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    principal = await ctx.authorize(request, "webhook:update")
    await parse_body(request, NoFields, optional=True)
    async with ctx.engine.connect() as conn:
        row = await delivery_log.find(conn, principal.team_id, request.match_info["delivery_id"])
    await _sendable_webhook(ctx, principal.team_id, row.webhook_id)
    # The budget before the number: a caller out of budget takes no attempt number (one
    # retrying in a loop would otherwise push it toward the last one allowed).
    if not ctx.resends.take(principal.team_id, 1):
        raise _spent(ctx, principal.team_id)
    try:
        async with ctx.engine.begin() as conn:
            numbered = await _resends(conn, [row])
        if not numbered:
            raise NotFound(f"delivery {row.id} not found")
    except BaseException:
        ctx.resends.give_back(principal.team_id, 1)
        raise
    [delivery] = numbered
    await _publish_resends(ctx, principal.team_id, [delivery])
    await _audit(
        request,
        principal,
        "webhook.delivery_retried",
        delivery.webhook_id,
        {"delivery_id": delivery.id, "attempt": delivery.attempt},
    )
    return json_response({"delivery_id": delivery.id, "attempt": delivery.attempt}, status=202)


async def replay_webhook(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    principal = await ctx.authorize(request, "webhook:update")
    body = await parse_body(request, ReplayRequest)
    webhook_id = request.match_info["webhook_id"]
    await _sendable_webhook(ctx, principal.team_id, webhook_id)
    # The window ends when the call came at the latest: a replay of a busy webhook reads
    # chunk after chunk, and would otherwise send again the deliveries first made while it
    # runs, moments after their first attempt.
    until = utcnow() if body.until is None else min(body.until, utcnow())
    where = delivery_log.DeliveryFilter(
        team_id=principal.team_id,
        webhook_id=webhook_id,
        # Skipped too: the webhook was off when their turn came (a disable after days of
        # failures, a 410), and turning it back on is when they are wanted again.
        states=("failed", "retrying", "skipped") if body.only_failed else (),
        since=body.since,
        until=until,
    )
    team_id = principal.team_id
    asked = {
        "since": body.since.isoformat(),
        "until": until.isoformat(),
        "only_failed": body.only_failed,
    }
    try:
        replayed, resume = await _replay(ctx, where, team_id)
    except (PublishUnavailable, ReplayInterrupted) as exc:
        # Stopped part-way (the details say how far): the chunks before went out.
        if isinstance(exc.details, dict) and exc.details.get("replayed"):
            await _audit(
                request,
                principal,
                "webhook.replayed",
                webhook_id,
                {**asked, "replayed": exc.details["replayed"], "truncated": True},
            )
        raise
    await _audit(
        request,
        principal,
        "webhook.replayed",
        webhook_id,
        {**asked, "replayed": replayed, "truncated": resume is not None},
    )
    return json_response(
        {
            "replayed": replayed,
            "truncated": resume is not None,
            "resume_since": as_utc(resume),
            # When the next call can send as much as a replay sends (0: now).
            "retry_after_seconds": (
                None
                if resume is None
                else ctx.resends.seconds_until(team_id, min(MAX_REPLAY, ctx.resends.capacity))
            ),
        },
        status=202,
    )


async def _replay(
    ctx: ApiContext, where: delivery_log.DeliveryFilter, team_id: str
) -> tuple[int, datetime | None]:
    """Re-send up to ``MAX_REPLAY`` deliveries, oldest first, as far as the team's budget
    allows; how many, and where the next call goes on from when more were left. The
    budget is taken a chunk at a time, so a long replay does not hold all of it while it
    reads (the team's other re-sends meanwhile)."""
    # Read and sent a chunk at a time: each row carries its event, up to 256 KiB.
    replayed = 0
    after: tuple[datetime, str] | None = None
    # The first delivery not yet sent, read with the chunk before (one row past it): where
    # the next call goes on from.
    following: datetime | None = None
    resume: datetime | None = None
    while True:
        size = ctx.resends.take(team_id, min(_REPLAY_CHUNK, MAX_REPLAY - replayed))
        if not size:
            if not replayed:
                raise _spent(ctx, team_id)
            # The budget ran out between chunks: the next call goes on from here.
            resume = following
            break
        try:
            async with ctx.engine.begin() as conn:
                rows = await delivery_log.oldest_first(conn, where, limit=size + 1, after=after)
                resends = await _resends(conn, rows[:size])
        except SQLAlchemyError as exc:
            ctx.resends.give_back(team_id, size)
            if not replayed:
                raise
            # Earlier chunks went out: a 500 would have the caller send them all again.
            raise ReplayInterrupted(
                f"the delivery log could not be read; {replayed} deliveries were re-sent before it",
                details={"replayed": replayed, "resume_since": as_utc(following)},
            ) from exc
        chosen = rows[:size]
        ctx.resends.give_back(team_id, size - len(resends))
        try:
            await _publish_resends(ctx, team_id, resends)
        except PublishUnavailable as exc:
            if not replayed or not chosen:
                raise
            # Earlier chunks went out: say where to go on from rather than have the caller
            # send them all again (this chunk may be partly sent; a receiver sees repeats
            # under the same webhook-id).
            raise PublishUnavailable(
                f"{exc.message}; {replayed} deliveries were re-sent before it",
                details={"replayed": replayed, "resume_since": as_utc(chosen[0].created_at)},
            ) from exc
        replayed += len(resends)
        if len(rows) <= size:
            break
        after = (chosen[-1].created_at, chosen[-1].id)
        following = rows[size].created_at
        if replayed >= MAX_REPLAY:
            resume = following
            break
    return replayed, resume


async def send_test_event(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    principal = await ctx.authorize(request, "webhook:update")
    body = await parse_body(request, TestEventRequest, optional=True)
    webhook_id = request.match_info["webhook_id"]
    await _sendable_webhook(ctx, principal.team_id, webhook_id)
    event = Event(
        id=new_id("evt"),
        type=TEST_EVENT_TYPE,
        team_id=principal.team_id,
        object_type="webhook",
        object_id=webhook_id,
        occurred_at=utcnow(),
        data=body.data or {"message": _TEST_MESSAGE},
    )
    check_event_size(event)
    delivery = Delivery(
        id=new_id("msg"), webhook_id=webhook_id, attempt=1, event=event, kind="test"
    )
    await _publish_one(ctx, principal.team_id, delivery)
    await _audit(
        request,
        principal,
        "webhook.test_sent",
        webhook_id,
        {"delivery_id": delivery.id, "event_id": event.id},
    )
    return json_response(
        # The event as the receiver gets it: absent fields absent, not null.
        {"delivery_id": delivery.id, "event": orjson.loads(event.to_bytes())},
        status=202,
    )


def add_routes(app: web.Application, spec: OpenApi) -> None:
    team = "/v1/teams/{team}"
    spec.route(
        app,
        "GET",
        team + "/deliveries",
        list_deliveries,
        permission="webhook:read",
        query=DeliveryQuery,
        errors=(401, 403, 404, 422),
        summary="The team's delivery log, newest first: state, webhook_id, since, until",
    )
    spec.route(
        app,
        "GET",
        team + "/deliveries/{delivery_id}",
        get_delivery,
        permission="webhook:read",
        errors=(401, 403, 404),
        summary="One delivery with its attempts, request headers (redacted), response bodies",
    )
    spec.route(
        app,
        "POST",
        team + "/deliveries/{delivery_id}/retry",
        retry_delivery,
        body=NoFields,
        body_required=False,
        status=202,
        permission="webhook:update",
        errors=(401, 403, 404, 409, 413, 422, 429, 503),
        summary="Re-send one delivery now, whatever its state (same webhook-id, next attempt)",
    )
    spec.route(
        app,
        "GET",
        team + "/webhooks/{webhook_id}/deliveries",
        list_webhook_deliveries,
        permission="webhook:read",
        query=WebhookDeliveryQuery,
        errors=(401, 403, 404, 422),
        summary="A webhook's delivery log, newest first; dead letters have state=failed",
    )
    spec.route(
        app,
        "POST",
        team + "/webhooks/{webhook_id}/replay",
        replay_webhook,
        status=202,
        body=ReplayRequest,
        permission="webhook:update",
        errors=(401, 403, 404, 409, 413, 422, 429, 503),
        summary=f"Re-send every delivery since a time (or only failed ones), up to {MAX_REPLAY}",
    )
    spec.route(
        app,
        "POST",
        team + "/webhooks/{webhook_id}/test",
        send_test_event,
        status=202,
        body=TestEventRequest,
        permission="webhook:update",
        errors=(401, 403, 404, 409, 413, 422, 429, 503),
        body_required=False,
        summary=f"Send a {TEST_EVENT_TYPE} event to this webhook only",
    )
