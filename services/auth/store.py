"""Database access for users, teams, memberships, tokens and permission groups."""

from __future__ import annotations

import hmac
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, insert, or_, select, union, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.selectable import CompoundSelect

from services.shared import (
    ROLES,
    HookwireError,
    as_utc,
    new_id,
    tables,
    unknown_permissions,
    utcnow,
)

from .errors import (
    ConcurrentChange,
    DuplicateName,
    TokenEnded,
    UnknownEntity,
    UnknownPermission,
)
from .introspection import TokenState
from .tokens import display_prefix, generate_token, hash_token

_tokens = tables.tokens
_groups = tables.permission_groups
# The shortest inactivity timeout a key may be given.
INACTIVITY_TIMEOUT_MIN_SECONDS = 60


def _token_state(row: Any, *, presented_previous: bool = False) -> TokenState:
    created_at = as_utc(row.created_at)
    assert created_at is not None
    permissions = set(row.permissions) | set(row.group_permissions or ())
    return TokenState(
        id=row.id,
        user_id=row.user_id,
        permissions=frozenset(permissions),
        active=row.active,
        expires_at=as_utc(row.expires_at),
        revoked_at=as_utc(row.revoked_at),
        last_used_at=as_utc(row.last_used_at),
        created_at=created_at,
        allowed_cidrs=tuple(row.allowed_cidrs) if row.allowed_cidrs else None,
        inactivity_timeout_seconds=row.inactivity_timeout_seconds,
        previous_secret_expires_at=as_utc(row.previous_expires_at),
        presented_previous_secret=presented_previous,
    )


def _token_query() -> Any:
    return select(_tokens, _groups.c.permissions.label("group_permissions")).select_from(
        _tokens.outerjoin(_groups, _tokens.c.permission_group_id == _groups.c.id)
    )


async def find_token(conn: AsyncConnection, secret_hash: str) -> TokenState | None:
    """The token whose current secret, or previous one still in its grace, has this hash."""
    row = (
        await conn.execute(
            _token_query().where(
                or_(
                    _tokens.c.secret_hash == secret_hash,
                    _tokens.c.previous_secret_hash == secret_hash,
                )
            )
        )
    ).first()
    if row is None:
        return None
    # The index finds the row; the match itself is confirmed in constant time.
    current = hmac.compare_digest(row.secret_hash, secret_hash)
    previous = row.previous_secret_hash is not None and hmac.compare_digest(
        row.previous_secret_hash, secret_hash
    )
    if not (current or previous):
        return None
    return _token_state(row, presented_previous=not current)


async def token_row(conn: AsyncConnection, user_id: str, token_id: str) -> Any:
    """A token of this user, or ``UnknownEntity``: other users' tokens do not exist for them."""
    row = (
        await conn.execute(
            _token_query().where(_tokens.c.id == token_id, _tokens.c.user_id == user_id)
        )
    ).first()
    if row is None:
        raise UnknownEntity(f"token {token_id} not found")
    return row


async def token_rows(conn: AsyncConnection, user_id: str) -> list[Any]:
    return list(
        (
            await conn.execute(
                _token_query().where(_tokens.c.user_id == user_id).order_by(_tokens.c.id)
            )
        ).all()
    )


def state_from_row(row: Any) -> TokenState:
    return _token_state(row)


async def role_in_team(conn: AsyncConnection, user_id: str, team_id: str) -> str | None:
    role: str | None = (
        await conn.execute(
            select(tables.memberships.c.role).where(
                tables.memberships.c.user_id == user_id, tables.memberships.c.team_id == team_id
            )
        )
    ).scalar()
    return role


async def record_last_used(
    conn: AsyncConnection, uses: dict[str, tuple[datetime, str | None]]
) -> None:
    for token_id, (at, ip) in uses.items():
        await conn.execute(
            update(_tokens)
            .where(
                _tokens.c.id == token_id,
                # Never back: another auth process (or a flush tried again) may have written
                # a later use; an older one over it could end a key in use for inactivity.
                or_(_tokens.c.last_used_at.is_(None), _tokens.c.last_used_at < at),
            )
            .values(last_used_at=at, last_used_ip=ip)
        )


def ended_tokens_query(now: datetime, within_seconds: int) -> CompoundSelect[tuple[str]]:
    """Keys whose access tokens must be refused: deactivated, revoked or expired within
    the last ``within_seconds`` (access tokens issued before that have expired anyway, and
    an inactive key gets none: the list does not grow with every key ever switched off)."""
    since = now - timedelta(seconds=within_seconds)
    # One range read per index rather than one OR, which the databases may answer by
    # reading every key: this runs every few seconds in every api process.
    return union(
        select(_tokens.c.id).where(_tokens.c.revoked_at >= since),
        select(_tokens.c.id).where(_tokens.c.expires_at >= since, _tokens.c.expires_at <= now),
        # Every switch-off is dated (migration 0008 dated the ones made before).
        select(_tokens.c.id).where(_tokens.c.deactivated_at >= since, _tokens.c.active.is_(False)),
    )


async def ended_token_ids(conn: AsyncConnection, now: datetime, within_seconds: int) -> list[str]:
    return [row.id for row in await conn.execute(ended_tokens_query(now, within_seconds))]


async def get_or_create_user(conn: AsyncConnection, email: str, name: str) -> str:
    existing = (
        await conn.execute(select(tables.users.c.id).where(tables.users.c.email == email))
    ).scalar()
    if existing is not None:
        return str(existing)
    user_id = new_id("usr")
    await conn.execute(
        insert(tables.users).values(id=user_id, email=email, name=name, created_at=utcnow())
    )
    return user_id


async def get_or_create_team(conn: AsyncConnection, name: str) -> str:
    existing = (
        await conn.execute(select(tables.teams.c.id).where(tables.teams.c.name == name))
    ).scalar()
    if existing is not None:
        return str(existing)
    team_id = new_id("team")
    await conn.execute(insert(tables.teams).values(id=team_id, name=name, created_at=utcnow()))
    return team_id


async def set_membership(conn: AsyncConnection, user_id: str, team_id: str, role: str) -> None:
    if role not in ROLES:
        raise UnknownEntity(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
    for table, entity_id in ((tables.users, user_id), (tables.teams, team_id)):
        found = (await conn.execute(select(table.c.id).where(table.c.id == entity_id))).scalar()
        if found is None:
            raise UnknownEntity(f"{table.name[:-1]} {entity_id} does not exist")
    await conn.execute(
        delete(tables.memberships).where(
            tables.memberships.c.user_id == user_id, tables.memberships.c.team_id == team_id
        )
    )
    await conn.execute(
        insert(tables.memberships).values(
            user_id=user_id, team_id=team_id, role=role, created_at=utcnow()
        )
    )


def check_known(permissions: list[str]) -> None:
    unknown = unknown_permissions(permissions)
    if unknown:
        raise UnknownPermission(
            f"unknown permissions: {', '.join(unknown)}",
            details=[{"field": "permissions", "reason": f"unknown: {', '.join(unknown)}"}],
        )


async def group_permissions(conn: AsyncConnection, user_id: str, group_id: str) -> set[str]:
    """The group's permissions, for a key about to take them: the row stays share-locked
    until the key is committed (PostgreSQL), so a widening or a deletion of the group
    either sees the new key or is seen by its creation, never neither."""
    permissions = (
        await conn.execute(
            select(_groups.c.permissions)
            .where(_groups.c.id == group_id, _groups.c.user_id == user_id)
            .with_for_update(read=True)
        )
    ).scalar()
    if permissions is None:
        raise UnknownEntity(f"permission group {group_id} not found")
    return set(permissions)


async def create_token(
    conn: AsyncConnection,
    *,
    pepper: str,
    user_id: str,
    name: str,
    permissions: list[str],
    description: str = "",
    expires_at: datetime | None = None,
    allowed_cidrs: list[str] | None = None,
    inactivity_timeout_seconds: int | None = None,
    permission_group_id: str | None = None,
) -> tuple[str, str]:
    """Store a new token and return ``(token_id, plaintext)``; the plaintext is not kept."""
    check_known(permissions)
    plaintext = generate_token()
    token_id = new_id("tok")
    try:
        async with conn.begin_nested():
            await conn.execute(
                insert(_tokens).values(
                    id=token_id,
                    user_id=user_id,
                    name=name,
                    description=description,
                    secret_hash=hash_token(plaintext, pepper),
                    display_prefix=display_prefix(plaintext),
                    permissions=sorted(set(permissions)),
                    active=True,
                    created_at=utcnow(),
                    expires_at=expires_at,
                    allowed_cidrs=allowed_cidrs,
                    inactivity_timeout_seconds=inactivity_timeout_seconds,
                    permission_group_id=permission_group_id,
                )
            )
    except IntegrityError as exc:
        why = await _why_not_stored(conn, user_id, name, permission_group_id)
        if why is None:
            raise
        raise why from exc
    return token_id, plaintext


async def _why_not_stored(
    conn: AsyncConnection, user_id: str, name: str, group_id: str | None
) -> HookwireError | None:
    """Which constraint a new token broke (the savepoint leaves the transaction usable)."""
    if await _exists(
        conn,
        _tokens,
        _tokens.c.user_id == user_id,
        _tokens.c.name == name,
        _tokens.c.revoked_at.is_(None),
    ):
        return DuplicateName(f"a token named {name!r} already exists for this user")
    if not await _exists(conn, tables.users, tables.users.c.id == user_id):
        return UnknownEntity(f"user {user_id} not found")
    if group_id is not None:
        # Deleted between the check of its permissions and the insert.
        return UnknownEntity(f"permission group {group_id} not found")
    return None


async def _exists(conn: AsyncConnection, table: Any, *where: Any) -> bool:
    return (await conn.execute(select(table.c.id).where(*where).limit(1))).first() is not None


async def update_token(
    conn: AsyncConnection,
    token_id: str,
    values: dict[str, Any],
    *,
    unrevoked: bool = False,
    unexpired_at: datetime | None = None,
) -> bool:
    """Change the token, only while it is not revoked (``unrevoked``) or not expired at
    ``unexpired_at`` when asked; False when it was not changed for that reason. Checked in
    the statement itself, so two callers racing cannot both pass."""
    query = update(_tokens).where(_tokens.c.id == token_id)
    if unrevoked:
        query = query.where(_tokens.c.revoked_at.is_(None))
    if unexpired_at is not None:
        query = query.where(
            or_(_tokens.c.expires_at.is_(None), _tokens.c.expires_at > unexpired_at)
        )
    try:
        async with conn.begin_nested():
            result = await conn.execute(query.values(**values))
    except IntegrityError as exc:
        raise DuplicateName(f"a token named {values.get('name')!r} already exists") from exc
    return bool(result.rowcount)


async def rotate_token(
    conn: AsyncConnection,
    *,
    pepper: str,
    row: Any,
    previous_valid_until: datetime,
    now: datetime,
) -> str:
    """Give the token a new secret; the old one keeps working until ``previous_valid_until``.

    The old hash is kept even when its grace is already over, so that a caller still using
    it is told "rotated" rather than "unknown". Only while the token is neither revoked nor
    expired at ``now``, checked in the statement: a revocation or expiry committed since
    ``row`` was read does not get a secret handed out that is dead on arrival."""
    plaintext = generate_token()
    rotated = await conn.execute(
        update(_tokens)
        # Only from the secret this rotation read: of two at once, the second would
        # otherwise keep the first's old secret as "previous" and lose the one the first
        # handed out.
        .where(
            _tokens.c.id == row.id,
            _tokens.c.secret_hash == row.secret_hash,
            _tokens.c.revoked_at.is_(None),
            or_(_tokens.c.expires_at.is_(None), _tokens.c.expires_at > now),
        )
        .values(
            secret_hash=hash_token(plaintext, pepper),
            display_prefix=display_prefix(plaintext),
            previous_secret_hash=row.secret_hash,
            previous_expires_at=previous_valid_until,
        )
    )
    if not rotated.rowcount:
        if await _exists(
            conn,
            _tokens,
            _tokens.c.id == row.id,
            _tokens.c.secret_hash == row.secret_hash,
        ):
            raise TokenEnded(
                f"token {row.id} was revoked or expired meanwhile and cannot be given a new "
                "secret; create a new key instead"
            )
        raise ConcurrentChange(f"token {row.id} was rotated at the same time; try again")
    return plaintext


async def token_ids_of(conn: AsyncConnection, user_id: str) -> list[str]:
    """Every key of the user's, revoked ones too."""
    rows = await conn.execute(select(_tokens.c.id).where(_tokens.c.user_id == user_id))
    return [row.id for row in rows]


async def live_token_ids_named(conn: AsyncConnection, user_id: str, name: str) -> list[str]:
    """The user's keys of that name not revoked (at most one: the name is theirs)."""
    rows = await conn.execute(
        select(_tokens.c.id).where(
            _tokens.c.user_id == user_id, _tokens.c.name == name, _tokens.c.revoked_at.is_(None)
        )
    )
    return [row.id for row in rows]


async def group_rows(
    conn: AsyncConnection, user_id: str, group_id: str | None = None, *, lock: bool = False
) -> list[Any]:
    """``lock``: the row is locked until the transaction ends (PostgreSQL), for a change
    that checks the group's keys first: a key being created with the group is waited for
    (see ``group_permissions``)."""
    query = select(_groups).where(_groups.c.user_id == user_id).order_by(_groups.c.id)
    if group_id is not None:
        query = query.where(_groups.c.id == group_id)
    if lock:
        query = query.with_for_update()
    rows = list((await conn.execute(query)).all())
    if group_id is not None and not rows:
        raise UnknownEntity(f"permission group {group_id} not found")
    return rows


async def save_group(
    conn: AsyncConnection, group_id: str, values: dict[str, Any], *, create: bool
) -> None:
    try:
        async with conn.begin_nested():
            if create:
                await conn.execute(insert(_groups).values(id=group_id, **values))
            else:
                await conn.execute(update(_groups).where(_groups.c.id == group_id).values(**values))
    except IntegrityError as exc:
        raise DuplicateName(f"a permission group named {values.get('name')!r} exists") from exc


async def group_in_use(conn: AsyncConnection, group_id: str) -> bool:
    found = (
        await conn.execute(
            select(_tokens.c.id)
            .where(_tokens.c.permission_group_id == group_id, _tokens.c.revoked_at.is_(None))
            .limit(1)
        )
    ).first()
    return found is not None


async def group_keys(conn: AsyncConnection, group_id: str) -> list[Any]:
    """The keys, not revoked, that take their permissions from the group."""
    rows = await conn.execute(
        select(_tokens.c.id, _tokens.c.expires_at, _tokens.c.allowed_cidrs).where(
            _tokens.c.permission_group_id == group_id, _tokens.c.revoked_at.is_(None)
        )
    )
    return list(rows.all())


async def delete_group(conn: AsyncConnection, group_id: str) -> None:
    await conn.execute(delete(_groups).where(_groups.c.id == group_id))


async def memberships_of(conn: AsyncConnection, user_id: str) -> dict[str, str]:
    rows = await conn.execute(
        select(tables.memberships.c.team_id, tables.memberships.c.role).where(
            tables.memberships.c.user_id == user_id
        )
    )
    return {row.team_id: row.role for row in rows}


async def token_counts_by_state(conn: AsyncConnection, now: datetime) -> dict[str, int]:
    """Counts for the tokens-by-state gauge; precedence as in the introspection decision."""
    revoked = _tokens.c.revoked_at.is_not(None)
    inactive = ~revoked & _tokens.c.active.is_(False)
    expired = ~revoked & _tokens.c.active.is_(True) & (_tokens.c.expires_at <= now)
    counts = {}
    for state, condition in (("revoked", revoked), ("inactive", inactive), ("expired", expired)):
        counts[state] = int(
            (await conn.execute(select(func.count()).where(condition))).scalar() or 0
        )
    # Unused past their inactivity timeout: expired too, as a check would answer. The
    # timeout is per key, so the candidates are read (only keys unused for at least the
    # shortest timeout a key may have) and judged as introspection judges them.
    unused_since = func.coalesce(_tokens.c.last_used_at, _tokens.c.created_at)
    candidates = await conn.execute(
        select(_tokens.c.inactivity_timeout_seconds, unused_since.label("unused_since")).where(
            ~revoked,
            _tokens.c.active.is_(True),
            or_(_tokens.c.expires_at.is_(None), _tokens.c.expires_at > now),
            _tokens.c.inactivity_timeout_seconds.is_not(None),
            unused_since < now - timedelta(seconds=INACTIVITY_TIMEOUT_MIN_SECONDS),
        )
    )
    counts["expired"] += sum(
        1
        for row in candidates
        if now - as_utc(row.unused_since) > timedelta(seconds=row.inactivity_timeout_seconds)
    )
    total = int((await conn.execute(select(func.count()).select_from(_tokens))).scalar() or 0)
    counts["active"] = total - sum(counts.values())
    return counts
