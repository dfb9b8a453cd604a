"""Permission groups: named permission sets a user's tokens can reference.

Editing a group changes the effective permissions of its tokens at once, so an edit may
only add permissions the editing token holds itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.ext.asyncio import AsyncEngine

from services.shared import (
    ChangeNotifier,
    Conflict,
    Description,
    Name,
    NoFields,
    OpenApi,
    Settings,
    ValidationFailed,
    as_utc,
    json_response,
    new_id,
    parse_body,
    parse_query,
    record_audit,
    utcnow,
)

from . import store
from .callers import Caller, Callers


class GroupCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: Name
    description: Description = ""
    permissions: list[str] = Field(min_length=1, max_length=100)


class GroupUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: Name | None = None
    description: Description | None = None
    permissions: list[str] | None = Field(default=None, min_length=1, max_length=100)


def group_view(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "description": row.description,
        "permissions": row.permissions,
        "created_at": as_utc(row.created_at),
        "updated_at": as_utc(row.updated_at),
    }


@dataclass(frozen=True)
class GroupRoutes:
    settings: Settings
    engine: AsyncEngine
    callers: Callers
    changes: ChangeNotifier

    async def _caller(self, request: web.Request) -> Caller:
        return await self.callers.identify(request, permission="token:manage")

    async def create(self, request: web.Request) -> web.Response:
        caller = await self._caller(request)
        body = await parse_body(request, GroupCreate)
        store.check_known(body.permissions)
        caller.require_all(set(body.permissions))
        group_id = new_id("pg")
        now = utcnow()
        values = {
            "user_id": caller.user_id,
            "name": body.name,
            "description": body.description,
            "permissions": sorted(set(body.permissions)),
            "created_at": now,
            "updated_at": now,
        }
        async with self.engine.begin() as conn:
            await store.save_group(conn, group_id, values, create=True)
            await record_audit(
                conn,
                caller.actor,
                "permission_group.created",
                "permission_group",
                group_id,
                details={"name": body.name, "permissions": values["permissions"]},
            )
            [row] = await store.group_rows(conn, caller.user_id, group_id)
        await self.changes.notify("permission_group", group_id, "created")
        return json_response(group_view(row), status=201)

    async def list(self, request: web.Request) -> web.Response:
        caller = await self._caller(request)
        parse_query(request, NoFields)
        async with self.engine.connect() as conn:
            rows = await store.group_rows(conn, caller.user_id)
        return json_response({"data": [group_view(row) for row in rows]})

    async def show(self, request: web.Request) -> web.Response:
        caller = await self._caller(request)
        async with self.engine.connect() as conn:
            [row] = await store.group_rows(conn, caller.user_id, request.match_info["group_id"])
        return json_response(group_view(row))

    async def update(self, request: web.Request) -> web.Response:
        caller = await self._caller(request)
        body = await parse_body(request, GroupUpdate)
        values = body.model_dump(exclude_none=True)
        if not values:
            raise ValidationFailed.for_field(
                "body", "give at least one of name, description, permissions"
            )
        if body.permissions is not None:
            store.check_known(body.permissions)
            caller.require_all(set(body.permissions))
            values["permissions"] = sorted(set(body.permissions))
        group_id = request.match_info["group_id"]
        async with self.engine.begin() as conn:
            [current] = await store.group_rows(conn, caller.user_id, group_id, lock=True)
            if body.permissions is not None and not set(body.permissions) <= set(
                current.permissions
            ):
                # Widening a group widens every key that uses it: as for creating such a
                # key, a short-lived or network-fenced caller must not hand a key that
                # outlives it, or reaches further, more than it had.
                for key in await store.group_keys(conn, group_id):
                    caller.require_no_wider(as_utc(key.expires_at), key.allowed_cidrs, verb="widen")
            await store.save_group(conn, group_id, {**values, "updated_at": utcnow()}, create=False)
            await record_audit(
                conn,
                caller.actor,
                "permission_group.updated",
                "permission_group",
                group_id,
                details=values,
            )
            [row] = await store.group_rows(conn, caller.user_id, group_id)
        await self.changes.notify("permission_group", group_id, "updated")
        return json_response(group_view(row))

    async def delete(self, request: web.Request) -> web.Response:
        caller = await self._caller(request)
        group_id = request.match_info["group_id"]
        async with self.engine.begin() as conn:
            await store.group_rows(conn, caller.user_id, group_id, lock=True)
            if await store.group_in_use(conn, group_id):
                raise Conflict(
                    f"permission group {group_id} is used by tokens that are not revoked; "
                    "revoke them first (a key's group cannot be changed; a replacement key can"
                    " take another group or its own permissions)"
                )
            await store.delete_group(conn, group_id)
            await record_audit(
                conn, caller.actor, "permission_group.deleted", "permission_group", group_id
            )
        await self.changes.notify("permission_group", group_id, "deleted")
        return web.Response(status=204)

    def add_to(self, app: web.Application, spec: OpenApi) -> None:
        base, one, manage = (
            "/v1/permission-groups",
            "/v1/permission-groups/{group_id}",
            ("token:manage"),
        )
        spec.route(
            app,
            "POST",
            base,
            self.create,
            status=201,
            body=GroupCreate,
            permission=manage,
            errors=(401, 403, 409, 413, 422),
            summary="Create a permission group",
        )
        spec.route(
            app,
            "GET",
            base,
            self.list,
            permission=manage,
            summary="List the caller's permission groups",
        )
        spec.route(
            app,
            "GET",
            one,
            self.show,
            permission=manage,
            errors=(401, 403, 404),
            summary="Show a permission group",
        )
        spec.route(
            app,
            "PATCH",
            one,
            self.update,
            body=GroupUpdate,
            permission=manage,
            errors=(401, 403, 404, 409, 422),
            summary="Edit a group; its tokens follow at once",
        )
        spec.route(
            app,
            "DELETE",
            one,
            self.delete,
            status=204,
            permission=manage,
            errors=(401, 403, 404, 409),
            summary="Delete a group no unrevoked token uses",
        )
