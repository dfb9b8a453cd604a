"""Object routes: ``/v1/teams/{team}/objects/{object_type}``; each change publishes its event.

Every change goes through the outbox: the event is published with acks=all before the
caller hears of success, and a change Kafka refused is undone (503).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.ext.asyncio import AsyncConnection

from services.shared import (
    Event,
    EventType,
    NoFields,
    OpenApi,
    ValidationFailed,
    json_problem,
    json_response,
    new_id,
    parse_body,
    parse_query,
    read_json,
    utcnow,
)

from . import object_store as store
from .context import CONTEXT, ApiContext
from .errors import PreconditionFailed
from .paging import IdPageQuery
from .preconditions import if_match, require_match
from .trash import live_or_trashed

# fullmatch: "$" would also take a name ending in a newline.
_OBJECT_TYPE = re.compile(r"[a-z][a-z0-9_-]{0,63}")


class ObjectQuery(IdPageQuery):
    id_prefix = "obj"

    trashed: Literal["true", "false"] = "false"


class SendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    to: str = Field(min_length=1, max_length=320)
    channel: str = Field(default="email", min_length=1, max_length=32)
    subject: str | None = Field(default=None, max_length=500)
    message: str | None = Field(default=None, max_length=10_000)


def _object_type(request: web.Request) -> str:
    object_type = request.match_info["object_type"]
    if not _OBJECT_TYPE.fullmatch(object_type):
        raise ValidationFailed.for_field(
            "object_type",
            "lowercase letters, digits, '_' or '-', starting with a letter",
            part="path",
        )
    return object_type


async def _object_body(request: web.Request) -> dict[str, Any]:
    data = await read_json(request)
    if not isinstance(data, dict):
        raise ValidationFailed.for_field("body", "the object must be a JSON object")
    problem = json_problem(data)
    if problem is not None:
        raise ValidationFailed.for_field("body", problem)
    return data


def _event(
    team_id: str,
    object_type: str,
    object_id: str,
    kind: EventType,
    data: dict[str, Any],
    now: datetime,
    version: int,
    **extra: Any,
) -> Event:
    return Event(
        id=new_id("evt"),
        type=kind,
        team_id=team_id,
        object_type=object_type,
        object_id=object_id,
        occurred_at=now,
        data=data,
        version=version,
        **extra,
    )


async def _publish(ctx: ApiContext, event: Event, change: Any, undo: Any) -> Any:
    return await ctx.outbox.commit_and_publish(
        change, undo, ctx.topics.events, f"{event.team_id}/{event.object_id}", event
    )


def _with_etag(body: dict[str, Any], version: int, status: int = 200) -> web.Response:
    return json_response(body, status=status, headers={"ETag": store.etag(version)})


async def create_object(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    principal = await ctx.authorize(request, "object:create")
    object_type = _object_type(request)
    data = await _object_body(request)
    now, object_id = utcnow(), new_id("obj")
    event = _event(principal.team_id, object_type, object_id, "object.created", data, now, 1)
    values = {
        "id": object_id,
        "team_id": principal.team_id,
        "object_type": object_type,
        "data": data,
        "version": 1,
        "created_at": now,
        "updated_at": now,
    }

    async def change(conn: AsyncConnection) -> None:
        await store.insert_object(conn, values)

    async def undo(conn: AsyncConnection) -> bool:
        return await store.unmake(conn, object_id)

    await _publish(ctx, event, change, undo)
    return _with_etag(store.object_view(values, event_id=event.id), 1, status=201)


async def get_object(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    principal = await ctx.authorize(request, "object:read")
    async with ctx.engine.connect() as conn:
        row = await store.find(
            conn, principal.team_id, _object_type(request), request.match_info["object_id"]
        )
    return _with_etag(store.object_view(row._mapping), row.version)


async def list_objects(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    principal = await ctx.authorize(request, "object:read")
    query = parse_query(request, ObjectQuery)
    async with ctx.engine.connect() as conn:
        rows = await store.page(
            conn,
            principal.team_id,
            _object_type(request),
            trashed=query.trashed == "true",
            limit=query.limit,
            cursor=query.cursor,
        )
    items = rows[: query.limit]
    return json_response(
        {
            "data": [store.object_view(row._mapping) for row in items],
            "next_cursor": items[-1].id if len(rows) > query.limit else None,
        }
    )


def _check_if_match(request: web.Request, version: int) -> None:
    require_match(if_match(request), store.etag(version), "object")


async def _versioned_change(
    ctx: ApiContext, row: Any, event: Event, fields: dict[str, Any], doing: str
) -> int:
    """Set ``fields`` on the row as its next version, with its event; returns the version.

    The write only applies to the version that was read, so a concurrent change makes this
    one fail (412) instead of overwriting it.
    """
    version: int = row.version + 1

    async def change(conn: AsyncConnection) -> None:
        if not await store.set_fields(
            conn, row.id, row.version, **fields, **store.now_fields(event.occurred_at, version)
        ):
            raise PreconditionFailed(f"the object changed while it was being {doing}")

    async def undo(conn: AsyncConnection) -> bool:
        return await store.revert(conn, row, version)

    await _publish(ctx, event, change, undo)
    return version


async def _change_and_answer(
    ctx: ApiContext, row: Any, event: Event, fields: dict[str, Any], doing: str
) -> web.Response:
    version = await _versioned_change(ctx, row, event, fields, doing)
    body = store.object_view(
        row._mapping, **fields, version=version, updated_at=event.occurred_at, event_id=event.id
    )
    return _with_etag(body, version)


async def update_object(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    principal = await ctx.authorize(request, "object:update")
    object_type = _object_type(request)
    patch = await _object_body(request)
    async with ctx.engine.connect() as conn:
        row = await store.find(
            conn, principal.team_id, object_type, request.match_info["object_id"]
        )
    _check_if_match(request, row.version)
    data, previous = store.merge_patch(row.data, patch)
    if not previous:
        return _with_etag(store.object_view(row._mapping), row.version)
    now = utcnow()
    event = _event(
        principal.team_id,
        object_type,
        row.id,
        "object.updated",
        data,
        now,
        row.version + 1,
        previous=previous,
    )
    return await _change_and_answer(ctx, row, event, {"data": data}, "updated")


async def delete_object(request: web.Request) -> web.Response:
    """To the trash (``object:delete``), or for good with ``?force=true``
    (``object:force-delete``)."""
    ctx = request.app[CONTEXT]
    principal, force = await ctx.authorize_by_flag(
        request, "force", "object:force-delete", "object:delete"
    )
    object_type, object_id = _object_type(request), request.match_info["object_id"]
    async with ctx.engine.connect() as conn:
        if force:
            # Live or already in the trash; in neither, plainly not found.
            row = await live_or_trashed(
                lambda trashed: store.find(
                    conn, principal.team_id, object_type, object_id, trashed=trashed
                )
            )
        else:
            row = await store.find(conn, principal.team_id, object_type, object_id)
        # The deletion applies to the version read here only (a change since is a 412).
        _check_if_match(request, row.version)
        if row.deleted_at is not None:
            # Already in the trash: its deletion was announced then; nothing more to publish
            # (unless it was restored meanwhile: then it is a live object again).
            async with ctx.engine.begin() as write:
                if not await store.remove(write, row.id, row.version):
                    raise PreconditionFailed("the object changed while it was being deleted")
            return web.Response(status=204)
    now = utcnow()
    # Trashed or gone for good, the deletion comes after every version before it.
    event = _event(
        principal.team_id, object_type, row.id, "object.deleted", row.data, now, row.version + 1
    )
    if force:

        async def remove(conn: AsyncConnection) -> None:
            # A change committed since the read must not vanish unannounced, its event
            # reporting the older data.
            if not await store.remove(conn, row.id, row.version):
                raise PreconditionFailed("the object changed while it was being deleted")

        async def undo(conn: AsyncConnection) -> bool:
            return await store.reinsert(conn, row)

        await _publish(ctx, event, remove, undo)
    else:
        await _versioned_change(ctx, row, event, {"deleted_at": now}, "deleted")
    return web.Response(status=204, headers={"x-event-id": event.id})


async def restore_object(request: web.Request) -> web.Response:
    """Out of the trash; announced as ``object.created`` since the object exists again."""
    ctx = request.app[CONTEXT]
    principal = await ctx.authorize(request, "object:delete")
    object_type = _object_type(request)
    await parse_body(request, NoFields, optional=True)
    async with ctx.engine.connect() as conn:
        row = await store.find(
            conn, principal.team_id, object_type, request.match_info["object_id"], trashed=True
        )
    event = _event(
        principal.team_id,
        object_type,
        row.id,
        "object.created",
        row.data,
        utcnow(),
        row.version + 1,
    )
    return await _change_and_answer(ctx, row, event, {"deleted_at": None}, "restored")


async def send_object(request: web.Request) -> web.Response:
    """Publish ``object.send``: the object was sent somewhere (the body says to whom)."""
    ctx = request.app[CONTEXT]
    principal = await ctx.authorize(request, "object:update")
    object_type = _object_type(request)
    body = await parse_body(request, SendRequest)
    async with ctx.engine.connect() as conn:
        row = await store.find(
            conn, principal.team_id, object_type, request.match_info["object_id"]
        )
    event = _event(
        principal.team_id,
        object_type,
        row.id,
        "object.send",
        row.data,
        utcnow(),
        # Sending changes nothing: the version the data is at.
        row.version,
        sent=body.model_dump(exclude_none=True),
    )

    async def no_change(_: AsyncConnection) -> None:
        return None

    async def nothing_to_undo(_: AsyncConnection) -> bool:
        # Nothing builds on a send: a refused one is dropped, so the caller's retry is the
        # only copy (kept for the relay as well, it would go out twice under two ids).
        return True

    await _publish(ctx, event, no_change, nothing_to_undo)
    return json_response({"event_id": event.id}, status=202)


def add_routes(app: web.Application, spec: OpenApi) -> None:
    base = "/v1/teams/{team}/objects/{object_type}"
    one = base + "/{object_id}"
    writes = (401, 403, 404, 412, 413, 422, 503)
    spec.route(
        app,
        "POST",
        base,
        create_object,
        status=201,
        permission="object:create",
        errors=(401, 403, 404, 413, 422, 503),
        summary="Create an object (any JSON object) and publish object.created",
    )
    spec.route(
        app,
        "GET",
        base,
        list_objects,
        query=ObjectQuery,
        permission="object:read",
        errors=(401, 403, 404, 422),
        summary="List objects of a type (limit, cursor; trashed=true for the trash)",
    )
    spec.route(
        app,
        "GET",
        one,
        get_object,
        permission="object:read",
        errors=(401, 403, 404, 422),
        summary="Read an object; the ETag header carries its version",
    )
    spec.route(
        app,
        "PATCH",
        one,
        update_object,
        headers={"If-Match": "The ETag last read; 412 when the object changed since"},
        permission="object:update",
        errors=writes,
        summary="Merge-patch an object (null removes a field); If-Match optional",
    )
    spec.route(
        app,
        "DELETE",
        one,
        delete_object,
        status=204,
        flags=("force",),
        permission="object:delete",
        errors=(401, 403, 404, 412, 422, 503),
        summary="Move to the trash; ?force=true deletes for good (object:force-delete)",
    )
    spec.route(
        app,
        "POST",
        one + "/restore",
        restore_object,
        body=NoFields,
        body_required=False,
        permission="object:delete",
        errors=(401, 403, 404, 412, 413, 422, 503),
        summary="Restore an object from the trash",
    )
    spec.route(
        app,
        "POST",
        one + "/send",
        send_object,
        status=202,
        body=SendRequest,
        permission="object:update",
        errors=(401, 403, 404, 413, 422, 503),
        summary="Publish object.send for an object",
    )
