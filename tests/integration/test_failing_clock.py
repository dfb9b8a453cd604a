"""The "no success for days" clock as the delivery log's writer keeps it in the database."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import pytest
from alembic import command
from sqlalchemy import Select, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.api.delivery_log import run_gap, track_failing_endpoints
from services.shared import Attempt, create_engine, load_settings, migrate, tables
from services.shared._db import _alembic_config
from tests.samples import sample_event

CREATED = datetime(2026, 11, 1, tzinfo=UTC)
FIVE_DAYS = timedelta(days=5)
_HOUR = timedelta(hours=1)
_SECOND = timedelta(seconds=1)
GAP = run_gap(load_settings(service_credential="x", token_pepper="y"))
_EVENT = sample_event(team_id="team_1", occurred_at=CREATED)


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    await migrate(database_url)
    engine = create_engine(database_url)
    async with engine.begin() as conn:
        await conn.execute(insert(tables.teams).values(id="team_1", name="t", created_at=CREATED))
        await conn.execute(
            insert(tables.webhooks).values(
                id="wh_1",
                team_id="team_1",
                name="w",
                url="http://127.0.0.1:9/hook",
                topics=["object.created"],
                headers={},
                secrets=[],
                active=True,
                created_at=CREATED,
                updated_at=CREATED,
            )
        )
    try:
        yield engine
    finally:
        await engine.dispose()


def _attempt(
    after: timedelta,
    outcome: Literal["delivered", "failed"],
    kind: Literal["event", "manual", "test"] = "event",
) -> Attempt:
    return Attempt(
        kind=kind,
        delivery_id=f"msg_{after.total_seconds():g}",
        event_id=_EVENT.id,
        webhook_id="wh_1",
        team_id="team_1",
        attempt=1,
        attempted_at=CREATED + after,
        outcome=outcome,
        final=False,
        event=_EVENT,
    )


async def _track(engine: AsyncEngine, *attempts: Attempt) -> list[Attempt]:
    async with engine.begin() as conn:
        return await track_failing_endpoints(conn, attempts, FIVE_DAYS, GAP)


async def _clock(engine: AsyncEngine) -> tuple[datetime | None, datetime | None]:
    hooks = tables.webhooks
    async with engine.connect() as conn:
        row = (await conn.execute(select(hooks.c.failing_since, hooks.c.last_failure_at))).one()
    return row.failing_since, row.last_failure_at


class _EditedAfterTheRead:
    """The writer's connection, on which the webhook is edited (``values``) just after
    the writer read it and before it writes: another request committing in between."""

    def __init__(self, conn: AsyncConnection, **values: Any) -> None:
        self._conn = conn
        self._values = values

    async def execute(self, statement: Any, *args: Any) -> Any:
        result = await self._conn.execute(statement, *args)
        if isinstance(statement, Select) and self._values:
            read_at = (await self._conn.execute(select(tables.webhooks.c.updated_at))).scalar()
            edit = update(tables.webhooks).values(**self._values, updated_at=read_at + _SECOND)
            await self._conn.execute(edit)
            self._values = {}
        return result


async def _track_over_an_edit(engine: AsyncEngine, *attempts: Attempt, **values: Any) -> None:
    async with engine.begin() as conn:
        edited: Any = _EditedAfterTheRead(conn, **values)
        assert await track_failing_endpoints(edited, attempts, FIVE_DAYS, GAP) == []


async def test_a_quiet_webhook_is_not_disabled_by_one_failure_days_later(
    engine: AsyncEngine,
) -> None:
    """One delivery failing through its retries on day 0, nothing for five days, then one
    failed first attempt: a new run starts there instead of disabling the webhook."""
    for minutes in (1, 2, 7, 37, 157, 457, 1057, 1657):  # the schedule's retries
        assert await _track(engine, _attempt(timedelta(minutes=minutes), "failed")) == []
    assert await _clock(engine) == (
        CREATED + timedelta(minutes=1),
        CREATED + timedelta(minutes=1657),
    )
    day_6 = timedelta(days=6)
    assert await _track(engine, _attempt(day_6, "failed")) == []
    assert await _clock(engine) == (CREATED + day_6, CREATED + day_6)


async def test_a_webhook_failing_all_along_is_disabled_after_five_days(engine: AsyncEngine) -> None:
    """Failures each within the gap of the one before are one run: five days of them
    disable the webhook."""
    every_10_hours = [_attempt(timedelta(hours=1 + 10 * n), "failed") for n in range(12)]
    for attempt in every_10_hours:
        assert await _track(engine, attempt) == []
    [request] = await _track(engine, _attempt(timedelta(hours=121), "failed"))
    assert request.disable_reason == "no successful delivery for 5 days"


async def test_a_webhook_with_an_event_every_two_days_failing_each_is_disabled(
    engine: AsyncEngine,
) -> None:
    """Each delivery fails through its retries (about 28 h of them) and the next event
    comes two days after the one before: the quiet between two deliveries is shorter than
    half the period, so the failures are one run and the first failure five days after the
    first one disables the webhook (the third delivery's last retry)."""
    schedule_minutes = (0, 1, 6, 36, 156, 456, 1056, 1656)  # the default schedule's waits
    disabled_at = []
    for day in (0, 2, 4):
        for minutes in schedule_minutes:
            after = timedelta(days=day, minutes=minutes)
            requests = await _track(engine, _attempt(after, "failed"))
            disabled_at += [after for request in requests if request.disable_reason]
    assert disabled_at == [timedelta(days=4, minutes=1656)]
    assert await _clock(engine) == (CREATED, CREATED + timedelta(days=4, minutes=1656))


async def test_failed_tests_and_re_sends_do_not_disable_a_webhook_whose_events_go_through(
    engine: AsyncEngine,
) -> None:
    """A webhook for a rare event: its one event was delivered, and for six days the
    receiver answers 400 to the hourly `webhook.test` and to an old payload re-sent. No
    run starts: like the circuit, they say nothing of the live traffic. A failed event
    starts one, a re-send failing meanwhile does not extend it, and one delivering ends it."""
    assert await _track(engine, _attempt(timedelta(0), "delivered")) == []
    for hour in range(1, 6 * 24):
        kind: Literal["manual", "test"] = "manual" if hour % 24 == 0 else "test"
        assert await _track(engine, _attempt(timedelta(hours=hour), "failed", kind)) == []
    assert await _clock(engine) == (None, None)
    day_6 = timedelta(days=6)
    assert await _track(engine, _attempt(day_6, "failed")) == []
    assert await _clock(engine) == (CREATED + day_6, CREATED + day_6)
    assert await _track(engine, _attempt(day_6 + _HOUR, "failed", "manual")) == []
    assert await _clock(engine) == (CREATED + day_6, CREATED + day_6)
    assert await _track(engine, _attempt(day_6 + 2 * _HOUR, "delivered", "manual")) == []
    assert await _clock(engine) == (None, None)


async def test_a_success_ends_the_run_over_an_edit_made_meanwhile(engine: AsyncEngine) -> None:
    """A rename committed between the writer's read and its write does not keep the run a
    success ended (alone, or followed by a failure in the same batch): a later failure
    starts a new one rather than disabling the webhook."""
    assert await _track(engine, _attempt(_HOUR, "failed")) == []
    await _track_over_an_edit(engine, _attempt(2 * _HOUR, "delivered"), name="renamed")
    assert await _clock(engine) == (None, None)

    assert await _track(engine, _attempt(3 * _HOUR, "failed")) == []
    await _track_over_an_edit(
        engine, _attempt(4 * _HOUR, "delivered"), _attempt(5 * _HOUR, "failed"), name="again"
    )
    assert await _clock(engine) == (None, None)
    assert await _track(engine, _attempt(FIVE_DAYS + 6 * _HOUR, "failed")) == []


async def test_failures_read_before_a_reactivation_do_not_start_the_clock(
    engine: AsyncEngine,
) -> None:
    """The guard stays for starting a run: a reactivation committed between the read and
    the write cleared the clock, and the failures read before it do not set it again."""
    await _track_over_an_edit(engine, _attempt(_HOUR, "failed"), active=True, failing_since=None)
    assert await _clock(engine) == (None, None)


async def _webhook_before(
    conn: AsyncConnection, webhook_id: str, **moments: datetime | None
) -> None:
    """A webhook of team_1 as an older migration's table holds it (written in SQL: the
    declared table has the newer columns); ``moments`` are the run's columns it has."""
    names = "".join(f", {name}" for name in moments)
    values = "".join(f", :{name}" for name in moments)
    # The column names are this module's own keyword arguments, never input.
    await conn.execute(
        text(
            "INSERT INTO webhooks (id, team_id, name, description, url, topics, headers,"  # noqa: S608
            f" secrets, active, created_at, updated_at{names}) VALUES (:id, 'team_1', 'w',"
            f" '', 'http://127.0.0.1:9/hook', '[]', '{{}}', '[]', true, :at, :at{values})"
        ),
        {"id": webhook_id, "at": CREATED, **moments},
    )


async def test_migrations_0013_and_0014_give_a_run_under_way_its_last_failure_from_the_log(
    database_url: str,
) -> None:
    """Left empty, a webhook quiet since its run began would be disabled by its next
    failure however far off: the upgrade takes the run's latest failed attempt from the
    delivery log, or its start where the log holds none."""
    await asyncio.to_thread(command.upgrade, _alembic_config(database_url), "0012")
    engine = create_engine(database_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                insert(tables.teams).values(id="team_1", name="t", created_at=CREATED)
            )
            for webhook_id, since in (
                ("wh_logged", CREATED),
                ("wh_pruned", CREATED),
                ("wh_ok", None),
            ):
                await _webhook_before(conn, webhook_id, failing_since=since)
            for n, (after, outcome) in enumerate(
                (
                    (-_HOUR, "failed"),
                    (_HOUR, "failed"),
                    (2 * _HOUR, "delivered"),
                    (3 * _HOUR, "failed"),
                )
            ):
                delivery_id = f"msg_{n}"
                await conn.execute(
                    insert(tables.deliveries).values(
                        id=delivery_id,
                        team_id="team_1",
                        webhook_id="wh_logged",
                        event_id=_EVENT.id,
                        event_type="object.created",
                        event={},
                        kind="event",
                        state="retrying",
                        attempts=1,
                        created_at=CREATED + after,
                        updated_at=CREATED + after,
                    )
                )
                await conn.execute(
                    insert(tables.delivery_attempts).values(
                        delivery_id=delivery_id,
                        attempt=1,
                        attempted_at=CREATED + after,
                        outcome=outcome,
                        final=False,
                        request_headers={},
                    )
                )
        await migrate(database_url)
        async with engine.connect() as conn:
            rows = await conn.execute(
                select(tables.webhooks.c.id, tables.webhooks.c.last_failure_at)
            )
            last = dict(rows.all())
    finally:
        await engine.dispose()
    assert last == {"wh_logged": CREATED + 3 * _HOUR, "wh_pruned": CREATED, "wh_ok": None}


async def test_migration_0015_restarts_each_run_under_way_at_its_last_failure(
    database_url: str,
) -> None:
    """A run that spanned days of quiet before 0013 (a failure, nothing, a failure) would
    count from its first failure: one more failure could disable the webhook days early.
    Each run under way restarts at its last failure; a webhook with no run is left alone."""
    await asyncio.to_thread(command.upgrade, _alembic_config(database_url), "0014")
    engine = create_engine(database_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                insert(tables.teams).values(id="team_1", name="t", created_at=CREATED)
            )
            for webhook_id, since, last in (
                ("wh_gap", CREATED, CREATED + timedelta(days=4, hours=19)),
                ("wh_fresh", CREATED, CREATED),
                ("wh_ok", None, None),
            ):
                await _webhook_before(conn, webhook_id, failing_since=since, last_failure_at=last)
        await migrate(database_url)
        async with engine.connect() as conn:
            rows = await conn.execute(select(tables.webhooks.c.id, tables.webhooks.c.failing_since))
            since_now = dict(rows.all())
    finally:
        await engine.dispose()
    assert since_now == {
        "wh_gap": CREATED + timedelta(days=4, hours=19),
        "wh_fresh": CREATED,
        "wh_ok": None,
    }
