"""Objects in the database, and the pure rules for changing them."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from services.shared import NotFound, as_utc, tables

_objects = tables.objects


def _merged(target: Any, patch: Any) -> Any:
    # RFC 7396: an object patch merges into an object (or replaces anything else), field by
    # field, and null removes; any other patch value replaces the target.
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for field, value in patch.items():
        if value is None:
            result.pop(field, None)
        else:
            result[field] = _merged(result.get(field), value)
    return result


def _same_json(left: Any, right: Any) -> bool:
    # Python holds True == 1 and 1 == 1.0; as JSON they are different values.
    return orjson.dumps(left, option=orjson.OPT_SORT_KEYS) == orjson.dumps(
        right, option=orjson.OPT_SORT_KEYS
    )


def merge_patch(
    current: dict[str, Any], patch: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Apply a JSON merge patch (RFC 7396): nested objects merge, ``null`` removes.

    Returns the new data and the previous values of the top-level fields that changed
    (absent fields as ``None``).
    """
    merged = _merged(current, patch)
    previous = {
        field: current.get(field)
        for field in patch
        if (field in current) != (field in merged)
        or (field in merged and not _same_json(current[field], merged[field]))
    }
    return merged, previous


def etag(version: int) -> str:
    return f'"{version}"'


def object_view(row: Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    view = {
        "id": row["id"],
        "object_type": row["object_type"],
        "version": row["version"],
        "data": row["data"],
        "created_at": as_utc(row["created_at"]),
        "updated_at": as_utc(row["updated_at"]),
        "deleted_at": as_utc(row.get("deleted_at")),
    }
    view.update(overrides)
    return view


async def find(
    conn: AsyncConnection, team_id: str, object_type: str, object_id: str, *, trashed: bool = False
) -> Any:
    row = (
        await conn.execute(
            select(_objects).where(
                _objects.c.id == object_id,
                _objects.c.team_id == team_id,
                _objects.c.object_type == object_type,
            )
        )
    ).first()
    if row is None or (row.deleted_at is not None) != trashed:
        where = "in the trash" if trashed else ""
        raise NotFound(f"{object_type} {object_id} not found {where}".strip())
    return row


async def page(
    conn: AsyncConnection,
    team_id: str,
    object_type: str,
    *,
    trashed: bool,
    limit: int,
    cursor: str | None,
) -> list[Any]:
    query = (
        select(_objects)
        .where(
            _objects.c.team_id == team_id,
            _objects.c.object_type == object_type,
            _objects.c.deleted_at.is_not(None) if trashed else _objects.c.deleted_at.is_(None),
        )
        .order_by(_objects.c.id)
        .limit(limit + 1)
    )
    if cursor is not None:
        query = query.where(_objects.c.id > cursor)
    return list((await conn.execute(query)).all())


async def insert_object(conn: AsyncConnection, values: dict[str, Any]) -> None:
    await conn.execute(insert(_objects).values(**values))


async def set_fields(
    conn: AsyncConnection, object_id: str, expected_version: int, **values: Any
) -> bool:
    """Update if the version is still the expected one; False when someone got there first."""
    result = await conn.execute(
        update(_objects)
        .where(_objects.c.id == object_id, _objects.c.version == expected_version)
        .values(**values)
    )
    return result.rowcount == 1


async def remove(conn: AsyncConnection, object_id: str, version: int) -> bool:
    """Delete for good the version that was read; False when it has changed since."""
    result = await conn.execute(
        delete(_objects).where(_objects.c.id == object_id, _objects.c.version == version)
    )
    return result.rowcount == 1


# Undoing a change Kafka refused, only while nothing has been built on it since; each
# returns whether it undid the change.


async def unmake(conn: AsyncConnection, object_id: str) -> bool:
    """Undo a creation: the object goes, unless it has been changed since."""
    result = await conn.execute(
        delete(_objects).where(_objects.c.id == object_id, _objects.c.version == 1)
    )
    return result.rowcount == 1


async def revert(conn: AsyncConnection, row: Any, written_version: int) -> bool:
    """Undo a versioned change: the row as read, if it still holds ``written_version``."""
    result = await conn.execute(
        update(_objects)
        .where(_objects.c.id == row.id, _objects.c.version == written_version)
        .values(**{k: v for k, v in row._mapping.items() if k != "id"})
    )
    return result.rowcount == 1


async def reinsert(conn: AsyncConnection, row: Any) -> bool:
    """Undo a removal: the row as it was (nothing can have changed a removed row)."""
    await conn.execute(insert(_objects).values(**dict(row._mapping)))
    return True


def now_fields(now: datetime, version: int) -> dict[str, Any]:
    return {"updated_at": now, "version": version}
