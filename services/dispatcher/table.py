"""The in-memory webhook table, loaded from the database and refreshed by change records."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.shared import as_utc, error_text, get_logger, tables, utcnow

from .errors import InvalidSecret
from .routing import SigningKey, WebhookRoute
from .signing import secret_key

# How long a webhook stopped here stays stopped while the database still says active: the
# delivery log's writer applies the disable within seconds; past this, the database wins.
_STOPPED_AT_MOST_SECONDS = 600.0
# A read holds the table's lock: one that hangs (a database gone silent) would hold every
# change record behind it. Past these it fails, and the resync stands in for it. A whole
# load of a large table may take a while; one row never should.
_READ_ONE_AT_MOST_SECONDS = 10.0
_READ_ALL_AT_MOST_SECONDS = 60.0
_READ_URL_AT_MOST_SECONDS = 3.0
# Webhooks re-read per query: far below any database's limit on bound parameters.
_READ_AT_ONCE = 500


def _route_from_row(row: Any) -> tuple[WebhookRoute, list[str]]:
    """The webhook's route, and why each of its secrets in force that cannot sign was left
    out (the reasons name no secret: they are logged)."""
    now = utcnow()
    keys = []
    unusable = []
    for entry in row.secrets:
        raw_expiry = entry.get("expires_at")
        expires_at = _utc(raw_expiry) if raw_expiry is not None else None
        if expires_at is not None and expires_at <= now:
            continue
        try:
            key = secret_key(entry["secret"])
        except InvalidSecret as exc:
            # One secret written by hand or by an older release must not take the webhook
            # out of the table: its events would go nowhere, not even to a failed attempt.
            # Its other secrets sign; with none left, its attempts fail as unsigned.
            unusable.append(exc.message)
            continue
        keys.append(SigningKey(key, expires_at))
    route = WebhookRoute(
        id=row.id,
        team_id=row.team_id,
        url=row.url,
        topics=frozenset(row.topics),
        object_types=frozenset(row.object_types) if row.object_types else None,
        headers=tuple(sorted(row.headers.items())),
        signing_keys=tuple(keys),
        active=bool(row.active) and row.deleted_at is None,
        rate_limit=row.rate_limit,
        updated_at=as_utc(row.updated_at),
    )
    return route, unusable


def _pacing(route: WebhookRoute | None) -> tuple[float | None, bool] | None:
    """What the rate slots of a webhook's deliveries depend on."""
    return None if route is None else (route.rate_limit, route.active)


def _utc(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


class WebhookTable:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._by_id: dict[str, WebhookRoute] = {}
        self._by_team: dict[str, list[WebhookRoute]] = defaultdict(list)
        # A whole load and a one-webhook refresh each read and then swap in what they read;
        # interleaved, a load that read before a change and swapped after the change's
        # refresh would bring the old webhook back until the next load. One at a time, the
        # later reader always reads the later state.
        self._reading = asyncio.Lock()
        # One whole load at a time; while one reads, the ids change records re-read.
        self._loading = asyncio.Lock()
        self._refreshed_meanwhile: set[str] | None = None
        # Per webhook, the row its route was last built from and that route (before a 410
        # stop is applied): a load reuses it for a row unchanged since.
        self._built: dict[str, tuple[Any, WebhookRoute]] = {}
        # Webhooks stopped here on a 410: the attempt's start and when to give up holding
        # it. The database says active until the delivery log's writer applies the
        # disable; a re-read meanwhile must not start delivering to it again.
        self._stopped: dict[str, tuple[datetime, float]] = {}
        # Told the id of a webhook whose rate limit or active flag changed, however it
        # changed (a change record, a whole load, a 410): the deliveries waiting for its
        # rate slots ask again.
        self.on_pacing_changed: Callable[[str], None] | None = None
        # Told of a webhook whose URL the table now holds differently (however it learned).
        self.on_url_changed: Callable[[str], None] | None = None
        self._log = get_logger("dispatcher")

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, webhook_id: str) -> WebhookRoute | None:
        return self._by_id.get(webhook_id)

    async def url_now(self, webhook_id: str) -> str | None:
        """The webhook's URL as the database has it now (None: deleted), read outside the
        table's lock (a whole load may hold it for a minute) and within a few seconds: a
        delivery's slot waits on it. Raises when it cannot be read."""
        hooks = tables.webhooks
        async with asyncio.timeout(_READ_URL_AT_MOST_SECONDS), self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(hooks.c.url).where(
                        hooks.c.id == webhook_id, hooks.c.deleted_at.is_(None)
                    )
                )
            ).first()
        return None if row is None else str(row.url)

    def deactivate(self, webhook_id: str, attempted_at: datetime) -> None:
        """Stop delivering to a webhook now, ahead of the database change that follows
        (the writer disables it unless it was edited after ``attempted_at``)."""
        route = self._by_id.get(webhook_id)
        if route is not None and route.updated_at is not None and route.updated_at >= attempted_at:
            # Edited while the attempt was on its way (reactivated, pointed elsewhere): the
            # writer will not disable it, and stopped here meanwhile, the events routed
            # until its refusal came back would get no delivery at all.
            return
        self._stopped[webhook_id] = (attempted_at, time.monotonic() + _STOPPED_AT_MOST_SECONDS)
        if route is not None:
            self._by_id[webhook_id] = replace(route, active=False)
            self._reindex()
            self._paced_anew(webhook_id)

    def _paced_anew(self, webhook_id: str) -> None:
        if self.on_pacing_changed is not None:
            self.on_pacing_changed(webhook_id)

    def for_team(self, team_id: str) -> list[WebhookRoute]:
        return self._by_team.get(team_id, [])

    def _reindex(self) -> None:
        by_team: dict[str, list[WebhookRoute]] = defaultdict(list)
        for route in self._by_id.values():
            if route.active:
                by_team[route.team_id].append(route)
        self._by_team = by_team

    def _load_row(self, row: Any) -> WebhookRoute | None:
        base = self._build(row)
        if base is None:
            self._built.pop(row.id, None)
            return None
        self._built[row.id] = (row, base)
        return self._adjusted(base, row)

    def _build(self, row: Any) -> WebhookRoute | None:
        """The route the row describes, or None for a row the api could not have written."""
        try:
            route, unusable = _route_from_row(row)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            # A row the api could not have written (edited by hand, say): one webhook is
            # left out, not every other one of the load or the burst it came in.
            self._log.error("webhook_row_invalid", webhook_id=row.id, error=error_text(exc))
            return None
        if unusable:
            self._log.error(
                "webhook_secret_invalid",
                webhook_id=row.id,
                error="; ".join(unusable),
                skipped=len(unusable),
            )
        return route

    def _adjusted(self, route: WebhookRoute, row: Any) -> WebhookRoute:
        """The route as delivered to now: inactive while a 410 stop holds."""
        if not route.active:
            # The disable has landed (or the webhook was stopped some other way).
            self._stopped.pop(route.id, None)
        elif self._still_stopped(row):
            return replace(route, active=False)
        return route

    def _still_stopped(self, row: Any) -> bool:
        stopped = self._stopped.get(row.id)
        if stopped is None:
            return False
        attempted_at, give_up_at = stopped
        # The writer's own rule: it disables a webhook last changed before the attempt.
        if as_utc(row.updated_at) < attempted_at and time.monotonic() < give_up_at:
            return True
        del self._stopped[row.id]
        return False

    async def _read_all(self) -> list[Any]:
        async with self._engine.connect() as conn:
            return list((await conn.execute(select(tables.webhooks))).all())

    async def _read_some(self, webhook_ids: Sequence[str]) -> list[Any]:
        async with self._engine.connect() as conn:
            return list(
                (
                    await conn.execute(
                        select(tables.webhooks).where(tables.webhooks.c.id.in_(webhook_ids))
                    )
                ).all()
            )

    async def load_all(self) -> None:
        """Read every webhook and swap the table for what was read.

        The read runs outside the table's lock (of a large table it takes seconds, and
        every change record would wait behind it, past the second a change may take): a
        webhook re-read by a change record meanwhile keeps what that read, which is newer.
        A row unchanged since the last load keeps the route built from it: decoding every
        secret again held the loop for seconds at a hundred thousand webhooks."""
        async with self._loading:
            self._refreshed_meanwhile = set()
            try:
                async with asyncio.timeout(_READ_ALL_AT_MOST_SECONDS):
                    rows = await self._read_all()
                async with self._reading:
                    self._swap_in(rows, self._refreshed_meanwhile)
            finally:
                self._refreshed_meanwhile = None

    def _swap_in(self, rows: list[Any], refreshed: set[str]) -> None:
        loaded: dict[str, WebhookRoute] = {}
        built: dict[str, tuple[Any, WebhookRoute]] = {}
        for row in rows:
            if row.id in refreshed:
                continue
            before = self._built.get(row.id)
            if before is not None and tuple(before[0]) == tuple(row):
                base = before[1]
            else:
                made = self._build(row)
                if made is None:
                    continue
                base = made
            built[row.id] = (row, base)
            route = self._adjusted(base, row)
            loaded[route.id] = route
        for webhook_id in refreshed:
            # As the change record's read left it, present or gone.
            if webhook_id in self._by_id:
                loaded[webhook_id] = self._by_id[webhook_id]
            if webhook_id in self._built:
                built[webhook_id] = self._built[webhook_id]
        self._built = built
        previous, self._by_id = self._by_id, loaded
        for webhook_id in self._stopped.keys() - loaded.keys():
            del self._stopped[webhook_id]
        self._reindex()
        for webhook_id in previous.keys() | loaded.keys():
            if _pacing(previous.get(webhook_id)) != _pacing(loaded.get(webhook_id)):
                self._paced_anew(webhook_id)
            self._note_url(previous.get(webhook_id), loaded.get(webhook_id))

    def _note_url(self, before: WebhookRoute | None, after: WebhookRoute | None) -> None:
        moved = before is not None and after is not None and before.url != after.url
        if moved and after is not None and self.on_url_changed is not None:
            self.on_url_changed(after.id)

    async def refresh(self, webhook_id: str) -> None:
        await self.refresh_many([webhook_id])

    async def refresh_many(self, webhook_ids: Sequence[str]) -> None:
        """Re-read these webhooks and index the table once: a burst of change records
        (a team's webhooks edited together) costs a query per few hundred webhooks and one
        re-index, not one of each per webhook."""
        async with self._reading:
            rows: dict[str, Any] = {}
            for start in range(0, len(webhook_ids), _READ_AT_ONCE):
                chunk = webhook_ids[start : start + _READ_AT_ONCE]
                async with asyncio.timeout(_READ_ONE_AT_MOST_SECONDS):
                    rows.update((row.id, row) for row in await self._read_some(chunk))
            if self._refreshed_meanwhile is not None:
                # Only once read: a read that failed leaves the load's row, newer than
                # what the table holds, to stand.
                self._refreshed_meanwhile.update(webhook_ids)
            paced_anew = [
                webhook_id
                for webhook_id in webhook_ids
                if self._apply_row(webhook_id, rows.get(webhook_id))
            ]
            self._reindex()
            for webhook_id in paced_anew:
                self._paced_anew(webhook_id)

    def _apply_row(self, webhook_id: str, row: Any) -> bool:
        """Whether the webhook's pacing changed (the table is re-indexed after)."""
        route = self._load_row(row) if row is not None else None
        before = self._by_id.get(webhook_id)
        if route is None:
            self._by_id.pop(webhook_id, None)
            self._built.pop(webhook_id, None)
            self._stopped.pop(webhook_id, None)
        else:
            self._by_id[webhook_id] = route
        self._note_url(before, route)
        return _pacing(before) != _pacing(route)
