"""The delivery log's storage: attempts in, deliveries with their attempts out.

Attempt records can arrive twice (a dispatcher re-processing a batch after a crash, or this
consumer re-reading one): a delivery row only moves forward to a later attempt, and an
attempt row is keyed by (delivery, attempt number), so a repeat rewrites the same row.
A delivered delivery stays delivered when a later automatic attempt does not deliver (see
``_store``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, case, delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.shared import (
    Actor,
    Attempt,
    AuditNotice,
    NotFound,
    Settings,
    ValidationFailed,
    as_utc,
    record_audit,
    tables,
    upsert,
    utcnow,
)

_deliveries = tables.deliveries
_attempts = tables.delivery_attempts
_webhooks = tables.webhooks

_DELIVERY_UPDATES = (
    "state",
    "kind",
    "last_status_code",
    "last_error",
    "next_retry_at",
    "updated_at",
)
# What a failed re-send leaves as it was on a delivery whose automatic retry is to come.
_RETRY_KEEPS = frozenset({"state", "kind", "next_retry_at"})
_ATTEMPT_UPDATES = (
    "outcome",
    "status_code",
    "latency_ms",
    "error",
    "error_class",
    "final",
    "next_retry_at",
    "request_headers",
    "response_body",
    "kind",
)


def _waiting(stored: Any) -> ColumnElement[bool]:
    """The stored delivery still has an automatic attempt to come. Spelled without IN:
    these upserts are run for many rows at once, and an IN list cannot be."""
    return or_(stored.state == "pending", stored.state == "retrying")


def _delivery_row(attempt: Attempt) -> dict[str, Any]:
    # A put-off made no attempt: the delivery has made those before it.
    made = attempt.attempt - 1 if attempt.outcome == "deferred" else attempt.attempt
    return {
        "id": attempt.delivery_id,
        "team_id": attempt.team_id,
        "webhook_id": attempt.webhook_id,
        "event_id": attempt.event_id,
        "event_type": attempt.event.type,
        "event": attempt.event.model_dump(mode="json", by_alias=True, exclude_none=True),
        "kind": attempt.kind,
        "state": attempt.state,
        "attempts": made,
        "last_status_code": attempt.status_code,
        "last_error": _storable(attempt.error),
        "next_retry_at": attempt.next_retry_at,
        "created_at": attempt.attempted_at,
        "updated_at": attempt.attempted_at,
    }


def _attempt_row(attempt: Attempt) -> dict[str, Any]:
    return {
        "delivery_id": attempt.delivery_id,
        "attempt": attempt.attempt,
        "attempted_at": attempt.attempted_at,
        "outcome": attempt.outcome,
        "status_code": attempt.status_code,
        "latency_ms": attempt.latency_ms,
        "error": _storable(attempt.error),
        "error_class": _storable(attempt.error_class),
        "final": attempt.final,
        "next_retry_at": attempt.next_retry_at,
        "request_headers": attempt.request_headers,
        "response_body": _storable(attempt.response_body),
        "kind": attempt.kind,
    }


def _storable(text: str | None) -> str | None:
    # A receiver's answer may hold NUL characters, which PostgreSQL text cannot store; one
    # such answer would otherwise stop the delivery log for every team.
    return None if text is None else text.replace("\x00", "\ufffd")


async def record_attempts(conn: AsyncConnection, attempts: Sequence[Attempt]) -> list[Attempt]:
    """Store the attempts of webhooks that still exist, under their own team; returns
    those stored (the others were left out).

    A force-deleted webhook took its log with it; retries still waiting and deliveries in
    flight at that moment report later, and must not bring its log back. An attempt that
    names another team than its webhook's (written to the stream by hand) would show in
    that team's log: it is left out too.
    """
    webhook_ids = {attempt.webhook_id for attempt in attempts}
    # Shared locks until this commits (PostgreSQL): a force-delete, which deletes the
    # webhook first and then its log, waits for these rows to be stored and deletes them
    # too, rather than committing between this read and the writes.
    existing = {
        (row.id, row.team_id)
        for row in await conn.execute(
            select(_webhooks.c.id, _webhooks.c.team_id)
            .where(_webhooks.c.id.in_(webhook_ids))
            .with_for_update(read=True)
        )
    }
    kept = [attempt for attempt in attempts if (attempt.webhook_id, attempt.team_id) in existing]
    kept = await _of_their_own_delivery(conn, kept)
    if not kept:
        return kept
    await _store(conn, kept)
    # SQLite takes no lock for a read: a force-delete may have committed since. Writing,
    # this transaction now sees every commit before it (and holds off the later ones).
    stored = {attempt.webhook_id for attempt in kept}
    still = set(
        (await conn.execute(select(_webhooks.c.id).where(_webhooks.c.id.in_(stored))))
        .scalars()
        .all()
    )
    for gone in stored - still:
        await forget_webhook(conn, gone)
    return [attempt for attempt in kept if attempt.webhook_id in still]


async def _of_their_own_delivery(conn: AsyncConnection, attempts: list[Attempt]) -> list[Attempt]:
    """Leaves out an attempt naming a delivery of another webhook (written by hand): it
    would rewrite that delivery's state and show in its history, maybe another team's."""
    delivery_ids = {attempt.delivery_id for attempt in attempts}
    owners: dict[str, str] = {
        row.id: row.webhook_id
        for row in await conn.execute(
            select(_deliveries.c.id, _deliveries.c.webhook_id)
            .where(_deliveries.c.id.in_(delivery_ids))
            # The rows the batch will write that exist, locked now in id order, the order
            # the api's re-sends lock them in: written in rounds, each in id order, the
            # writes alone would not take them in one order (a deadlock with a replay).
            .order_by(_deliveries.c.id)
            .with_for_update()
        )
    }
    # A delivery new to the log belongs to the first webhook this batch names for it.
    return [a for a in attempts if owners.setdefault(a.delivery_id, a.webhook_id) == a.webhook_id]


def _rounds(attempts: Sequence[Attempt]) -> list[list[Attempt]]:
    """The batch's records, written in rounds of at most one record per delivery
    (PostgreSQL refuses to update one row twice in a statement), each delivery's in the
    order they were made: whether an attempt counts (see ``_store``) depends on the state the
    ones before it left, which the database judges one attempt at a time. Folded into one
    row, a manual re-send that failed followed by an automatic retry would be judged by
    the retry alone. "In order" is by time: a manual re-send and a scheduled retry can share
    an attempt number, and a put-off between two attempts counts only between them. Each
    round in id order, the order every writer locks rows in."""
    rounds: list[list[Attempt]] = []
    taken: dict[str, int] = {}
    for attempt in sorted(attempts, key=lambda a: a.attempted_at):
        turn = taken.get(attempt.delivery_id, 0)
        taken[attempt.delivery_id] = turn + 1
        if turn == len(rounds):
            rounds.append([])
        rounds[turn].append(attempt)
    return [sorted(round_, key=lambda a: a.delivery_id) for round_ in rounds]


async def _store(conn: AsyncConnection, attempts: Sequence[Attempt]) -> None:
    """An automatic attempt (kind ``event``) that did not deliver does not undo a delivery
    already made: one still goes out when a manual re-send delivered before a scheduled
    retry came due and was sent by another dispatcher (or before a restart), or when a
    second dispatcher sends again after a rebalance, and a receiver de-duplicating on
    ``webhook-id`` may refuse it (409); the event was delivered all the same. A re-send or
    a test (asked for through the api) records its own outcome, but for one that failed
    while an automatic retry is to come: the delivery is still retrying. The attempt is
    listed either way."""
    stored = _deliveries.c

    def columns(proposed: Any) -> dict[str, Any]:
        # The stored row is delivered and the attempt is an automatic one that did not
        # deliver: the state, and what goes with it, stay.
        held = and_(
            stored.state == "delivered", proposed.kind == "event", proposed.state != "delivered"
        )
        # A re-send or test that failed while the dispatcher's retry (or a first attempt
        # put off) is still to come: the delivery is still retrying (or pending), and says
        # when (its last status and error are the re-send's). Shown failed, with no retry
        # time, it would be re-sent again by hand and then delivered by the retry as well.
        # Only while the retry was still ahead when the re-send was made: one already due
        # (sent, or on its way) may end the delivery before the re-send's record is read,
        # and its record, older, would then not count.
        still_retrying = and_(
            # Pending: an event's first attempt is still to come. (A test or re-send put
            # off is pending too, and its own attempt is the one that was to come.)
            or_(
                stored.state == "retrying", and_(stored.state == "pending", stored.kind == "event")
            ),
            proposed.kind != "event",
            proposed.state != "delivered",
            stored.next_retry_at > proposed.updated_at,
        )
        kept = {
            column: case(
                (held, stored[column]),
                *([(still_retrying, stored[column])] if column in _RETRY_KEEPS else []),
                else_=proposed[column],
            )
            for column in _DELIVERY_UPDATES
            if column != "updated_at"
        }
        return {
            **kept,
            "updated_at": case(
                (proposed.updated_at > stored.updated_at, proposed.updated_at),
                else_=stored.updated_at,
            ),
            "attempts": case(
                (proposed.attempts > stored.attempts, proposed.attempts),
                else_=stored.attempts,
            ),
        }

    made = [a for a in attempts if a.outcome != "deferred"]
    for round_ in _rounds(attempts):
        await upsert(
            conn,
            _deliveries,
            [_delivery_row(a) for a in round_ if a.outcome != "deferred"],
            key=("id",),
            update=(),
            # Only forward, but for a success read after an automatic attempt made later
            # (its record came first: a slow answer to the dispatcher that lost the
            # partition, while its successor sent again and was refused): that attempt
            # does not count after it.
            when=lambda proposed: or_(
                stored.updated_at <= proposed.updated_at,
                and_(
                    proposed.state == "delivered",
                    stored.state != "delivered",
                    stored.kind == "event",
                ),
                # The automatic attempts' last word (a final failure, or a put-off whose
                # retry was refused) ends a delivery still waiting however late it is read:
                # nothing of theirs follows it, and the delivery would wait for good.
                and_(proposed.state == "failed", proposed.kind == "event", _waiting(stored)),
            ),
            computed=columns,
        )
        await _store_put_offs(conn, [a for a in round_ if a.outcome == "deferred"])
    by_key = {(a.delivery_id, a.attempt, a.attempted_at): a for a in made}
    await upsert(
        conn,
        _attempts,
        [_attempt_row(a) for a in by_key.values()],
        key=("delivery_id", "attempt", "attempted_at"),
        update=_ATTEMPT_UPDATES,
    )


async def _store_put_offs(conn: AsyncConnection, put_offs: Sequence[Attempt]) -> None:
    """A delivery put off without a request: listed (``pending`` before its first
    attempt) with the time it goes next; the log gains no attempt, and the last status and
    error stay those of the last attempt made. Only a delivery still waiting takes it, and
    only from a record newer than its last change: an attempt made after the put-off, read
    before it, stands. At most one per delivery: a round's.

    A re-send or test put off (its webhook's lookup failed) says when it goes, not when
    the delivery's automatic attempt does: it is taken only by a delivery of its own kind
    (a test delivery waiting for its one attempt), never by an event's.

    A re-send that failed after the stored retry time, while that retry was being put off
    again, left the delivery failed; the put-off, newer, shows the automatic attempts
    still going: the delivery is waiting again (else re-sent by hand, and then sent by the
    retry too)."""
    stored = _deliveries.c

    def revived(proposed: Any) -> ColumnElement[bool]:
        return and_(stored.state == "failed", stored.kind != "event", proposed.kind == "event")

    await upsert(
        conn,
        _deliveries,
        [_delivery_row(a) for a in put_offs],
        key=("id",),
        update=("next_retry_at", "updated_at"),
        when=lambda proposed: and_(
            stored.updated_at < proposed.updated_at,
            or_(_waiting(stored), revived(proposed)),
            or_(proposed.kind == "event", stored.kind == proposed.kind),
        ),
        computed=lambda proposed: {
            column: case((revived(proposed), proposed[column]), else_=stored[column])
            for column in ("state", "kind")
        },
    )


@dataclass(frozen=True)
class DeliveryFilter:
    team_id: str
    webhook_id: str | None = None
    states: tuple[str, ...] = ()
    since: datetime | None = None
    until: datetime | None = None


def _conditions(where: DeliveryFilter) -> list[Any]:
    conditions: list[Any] = [_deliveries.c.team_id == where.team_id]
    if where.webhook_id is not None:
        conditions.append(_deliveries.c.webhook_id == where.webhook_id)
    if where.states:
        conditions.append(_deliveries.c.state.in_(where.states))
    # SQLite stores the UTC wall time without its offset: bounds must be in UTC as well.
    if where.since is not None:
        conditions.append(_deliveries.c.created_at >= as_utc(where.since))
    if where.until is not None:
        conditions.append(_deliveries.c.created_at < as_utc(where.until))
    return conditions


def encode_cursor(row: Any) -> str:
    micros = int(as_utc(row.created_at).timestamp() * 1_000_000)
    return f"{micros}.{row.id}"


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    micros, _, delivery_id = cursor.partition(".")
    if not (micros.isascii() and micros.isdigit()) or not delivery_id:
        raise ValidationFailed.for_field(
            "cursor", "not a cursor this api returned", part="query parameters"
        )
    try:
        return datetime.fromtimestamp(int(micros) / 1_000_000, UTC), delivery_id
    except (ValueError, OverflowError, OSError) as exc:
        raise ValidationFailed.for_field(
            "cursor", "not a cursor this api returned", part="query parameters"
        ) from exc


# What a list shows: a page of 500 would otherwise read every delivery's whole event (up
# to 900 KB each) and every attempt's request headers and response body, and drop them.
_LISTED_DELIVERY = [column for column in _deliveries.c if column.name != "event"]
_LISTED_ATTEMPT = [
    column for column in _attempts.c if column.name not in {"request_headers", "response_body"}
]


async def page(
    conn: AsyncConnection, where: DeliveryFilter, *, limit: int, cursor: str | None
) -> list[Any]:
    """Newest first; one row more than ``limit`` tells the caller another page exists."""
    conditions = _conditions(where)
    if cursor is not None:
        at, delivery_id = _decode_cursor(cursor)
        conditions.append(
            or_(
                _deliveries.c.created_at < at,
                and_(_deliveries.c.created_at == at, _deliveries.c.id < delivery_id),
            )
        )
    rows = await conn.execute(
        select(*_LISTED_DELIVERY)
        .where(*conditions)
        .order_by(_deliveries.c.created_at.desc(), _deliveries.c.id.desc())
        .limit(limit + 1)
    )
    return list(rows.all())


async def oldest_first(
    conn: AsyncConnection,
    where: DeliveryFilter,
    *,
    limit: int,
    after: tuple[datetime, str] | None = None,
) -> list[Any]:
    """Oldest first, from just after ``after`` (a row's created_at and id) when given."""
    conditions = _conditions(where)
    if after is not None:
        at, delivery_id = as_utc(after[0]), after[1]
        conditions.append(
            or_(
                _deliveries.c.created_at > at,
                and_(_deliveries.c.created_at == at, _deliveries.c.id > delivery_id),
            )
        )
    rows = await conn.execute(
        select(_deliveries)
        .where(*conditions)
        .order_by(_deliveries.c.created_at, _deliveries.c.id)
        .limit(limit)
    )
    return list(rows.all())


# A delivery's attempts shown with it, the latest (``attempt_count`` gives them all): each
# re-send adds one, and a delivery re-sent a hundred thousand times, each attempt with its
# answer's body, must not be read into memory whole to be shown.
ATTEMPTS_SHOWN = 100


async def attempts_of(
    conn: AsyncConnection, delivery_ids: Sequence[str], *, detailed: bool = False
) -> dict[str, list[Any]]:
    """Per delivery, its latest ``ATTEMPTS_SHOWN`` attempts, oldest first."""
    found: dict[str, list[Any]] = {delivery_id: [] for delivery_id in delivery_ids}
    if not delivery_ids:
        return found
    newest_first = func.row_number().over(
        partition_by=_attempts.c.delivery_id,
        order_by=(_attempts.c.attempted_at.desc(), _attempts.c.attempt.desc()),
    )
    ranked = (
        select(*(_attempts.c if detailed else _LISTED_ATTEMPT), newest_first.label("newest"))
        .where(_attempts.c.delivery_id.in_(list(delivery_ids)))
        .subquery()
    )
    shown = [column for column in ranked.c if column.name != "newest"]
    rows = await conn.execute(
        select(*shown)
        .where(ranked.c.newest <= ATTEMPTS_SHOWN)
        .order_by(ranked.c.delivery_id, ranked.c.attempted_at, ranked.c.attempt)
    )
    for row in rows:
        found[row.delivery_id].append(row)
    return found


async def find(conn: AsyncConnection, team_id: str, delivery_id: str) -> Any:
    row = (
        await conn.execute(
            select(_deliveries).where(
                _deliveries.c.id == delivery_id, _deliveries.c.team_id == team_id
            )
        )
    ).first()
    if row is None:
        raise NotFound(f"delivery {delivery_id} not found")
    return row


async def prune(engine: AsyncEngine, older_than: datetime, batch: int = 500) -> int:
    """Delete the deliveries (and their attempts) last changed before ``older_than``, a
    batch per transaction so that no lock is held long; returns how many went.

    A delivery changed between the read and the delete (a re-send's attempt recorded)
    stays, with its new attempt. One re-sent but whose attempt is not recorded yet can
    still go (taking its number does not change it): its attempt then comes back as a
    delivery of its own, with that one attempt. Rows another api process is pruning are
    passed over (PostgreSQL).
    """
    cutoff = as_utc(older_than)
    pruned = 0
    while True:
        async with engine.begin() as conn:
            ids = (
                (
                    await conn.execute(
                        select(_deliveries.c.id)
                        .where(_deliveries.c.updated_at < cutoff)
                        .order_by(_deliveries.c.updated_at)
                        .limit(batch)
                        .with_for_update(skip_locked=True)
                    )
                )
                .scalars()
                .all()
            )
            gone: list[str] = []
            if ids:
                gone = list(
                    (
                        await conn.execute(
                            delete(_deliveries)
                            .where(_deliveries.c.id.in_(ids), _deliveries.c.updated_at < cutoff)
                            .returning(_deliveries.c.id)
                        )
                    )
                    .scalars()
                    .all()
                )
            if gone:
                await conn.execute(delete(_attempts).where(_attempts.c.delivery_id.in_(gone)))
        pruned += len(gone)
        if len(ids) < batch:
            return pruned


async def forget_webhook(conn: AsyncConnection, webhook_id: str) -> None:
    """A force-deleted webhook takes its delivery log with it."""
    ids = select(_deliveries.c.id).where(_deliveries.c.webhook_id == webhook_id)
    await conn.execute(delete(_attempts).where(_attempts.c.delivery_id.in_(ids)))
    await conn.execute(delete(_deliveries).where(_deliveries.c.webhook_id == webhook_id))


def attempt_view(row: Any, *, detailed: bool) -> dict[str, Any]:
    view = {
        "attempt": row.attempt,
        "attempted_at": as_utc(row.attempted_at),
        "outcome": row.outcome,
        "status_code": row.status_code,
        "latency_ms": row.latency_ms,
        "error": row.error,
        "error_class": row.error_class,
        "final": row.final,
        "next_retry_at": as_utc(row.next_retry_at),
        "kind": row.kind,
    }
    if detailed:
        view["request_headers"] = row.request_headers
        view["response_body"] = row.response_body
    return view


def delivery_view(row: Any, attempts: Sequence[Any], *, detailed: bool = False) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": row.id,
        "webhook_id": row.webhook_id,
        "event_id": row.event_id,
        "event_type": row.event_type,
        "kind": row.kind,
        "state": row.state,
        "attempt_count": row.attempts,
        "last_status_code": row.last_status_code,
        "last_error": row.last_error,
        "next_retry_at": as_utc(row.next_retry_at),
        "created_at": as_utc(row.created_at),
        "updated_at": as_utc(row.updated_at),
        "attempts": [attempt_view(a, detailed=detailed) for a in attempts],
    }
    if detailed:
        view["event"] = row.event
    return view


_DISPATCHER = Actor(user_id=None, token_id=None, ip=None)


def retry_gap(settings: Settings) -> timedelta:
    """The longest a webhook still being retried can go between two attempts: one
    attempt's time, the longest retry delay (jittered, or a Retry-After at its cap) and the
    longest wait of an open circuit."""
    delay = max(
        max(settings.retry_schedule_seconds) * (1 + settings.retry_jitter),
        settings.retry_after_max_seconds,
    )
    circuit = max(settings.circuit_open_max_seconds, settings.circuit_open_seconds)
    seconds = settings.delivery_timeout_seconds + delay + circuit
    return timedelta(seconds=seconds)


def run_gap(settings: Settings) -> timedelta:
    """How long an endpoint may go between two failures and still be in one run of them:
    the longest wait between two attempts of a delivery being retried, or half the
    period that disables it, whichever is longer. A webhook with an event every two days
    that fails each through its retries is failing, not quiet (its retries end a day
    before the next event); one that failed on day 0 and again on day 6, with nothing
    tried in between, showed nothing of the days between."""
    half_the_period = timedelta(days=settings.endpoint_disable_after_days) / 2
    return max(retry_gap(settings), half_the_period)


def _fails_a_run(attempt: Attempt) -> bool:
    # A put-off ended by its refused retry record (``retry_refused``) asked nothing of the
    # endpoint.
    return (
        attempt.outcome == "failed"
        and attempt.kind == "event"
        and attempt.error_class != "retry_refused"
    )


def failing_run(
    since: datetime | None,
    last_failure: datetime | None,
    not_before: datetime,
    attempts: Sequence[Attempt],
    restart_after: timedelta,
) -> tuple[datetime | None, datetime | None, Attempt | None]:
    """An endpoint's run of failures after ``attempts``: when it began and its last failure
    (both None once one succeeded), and its latest failure among ``attempts``.

    ``since`` and ``last_failure`` are the run as stored; a run starts only with a failure
    made after ``not_before`` (the webhook's last edit: a reactivation or a new URL starts
    afresh). A failure more than ``restart_after`` after the one before starts a new run:
    the endpoint was quiet for that long, not shown to be failing.
    A success older than the run does not end it. Only automatic attempts (kind ``event``)
    fail a run, as only they count towards the circuit: a receiver refusing test events or
    old payloads re-sent says nothing of the live traffic. A success of any kind ends it.
    """
    if since is None:
        last_failure = None
    elif last_failure is None:
        # Only a run whose last failure could not be written (an edit won the race):
        # its start stands in, so it may start afresh: a disable comes later, not sooner.
        last_failure = since
    latest = None
    for attempt in sorted(attempts, key=lambda a: a.attempted_at):
        at = as_utc(attempt.attempted_at)
        if attempt.outcome == "delivered":
            if since is None or at >= since:
                since, last_failure, latest = None, None, None
        elif _fails_a_run(attempt) and (since is not None or at >= not_before):
            if since is None or last_failure is None or at - last_failure > restart_after:
                since = at
            last_failure = at if last_failure is None else max(last_failure, at)
            latest = attempt
    return since, last_failure, latest


async def track_failing_endpoints(
    conn: AsyncConnection,
    attempts: Sequence[Attempt],
    disable_after: timedelta,
    restart_after: timedelta,
) -> list[Attempt]:
    """Keep each webhook's run of failures (``failing_since``, ``last_failure_at``);
    returns requests to disable the webhooks that have had no success for
    ``disable_after``, as the attempts that showed it. A failure more than
    ``restart_after`` (see ``run_gap``) after the one before starts a new run."""
    by_webhook: dict[tuple[str, str], list[Attempt]] = {}
    for attempt in attempts:
        if attempt.outcome == "delivered" or _fails_a_run(attempt):
            by_webhook.setdefault((attempt.webhook_id, attempt.team_id), []).append(attempt)
    if not by_webhook:
        return []
    hooks = tables.webhooks
    rows = await conn.execute(
        select(
            hooks.c.id,
            hooks.c.team_id,
            hooks.c.active,
            hooks.c.failing_since,
            hooks.c.last_failure_at,
            hooks.c.updated_at,
        ).where(hooks.c.id.in_(sorted({webhook_id for webhook_id, _ in by_webhook})))
    )
    requests = []
    for row in rows.all():
        batch = by_webhook.get((row.id, row.team_id))
        if batch is None:
            continue  # another team's attempt records name this webhook: not its evidence
        stored = as_utc(row.failing_since)
        # A reactivation clears failing_since alone: the last failure then means nothing.
        stored_last = as_utc(row.last_failure_at) if stored is not None else None
        since, last_failure, latest = failing_run(
            stored, stored_last, as_utc(row.updated_at), batch, restart_after
        )
        if (since, last_failure) != (stored, stored_last):
            change = update(hooks).where(hooks.c.id == row.id)
            # Not over an edit made since the read (a new URL, a reactivation): it cleared
            # the clock, and failures from before it must not set it again.
            guarded = change.where(hooks.c.updated_at == row.updated_at)
            run = {"failing_since": since, "last_failure_at": last_failure}
            moved = since is not None and (await conn.execute(guarded.values(run))).rowcount
            if not moved and stored is not None and since != stored:
                # A success (or a failure after a gap) ended the stored run whatever was
                # edited since the read (a rename): a stale start must not outlive it.
                await conn.execute(change.values(failing_since=None, last_failure_at=None))
        if not row.active or since is None or latest is None:
            continue
        if as_utc(latest.attempted_at) - since >= disable_after:
            days = disable_after.total_seconds() / 86400
            reason = f"no successful delivery for {days:g} days"
            requests.append(latest.model_copy(update={"disable_reason": reason}))
    return requests


async def disable_webhooks(
    conn: AsyncConnection, attempts: Sequence[Attempt]
) -> list[tuple[Attempt, AuditNotice]]:
    """Apply the dispatcher's requests to disable webhooks; returns those that changed,
    each with the audit record that says why.

    Only an active webhook is disabled, so a repeated request audits nothing twice.
    """
    applied: list[tuple[Attempt, AuditNotice]] = []
    for attempt in attempts:
        if attempt.disable_reason is None:
            continue
        hooks = tables.webhooks
        result = await conn.execute(
            update(hooks)
            .where(
                hooks.c.id == attempt.webhook_id,
                hooks.c.team_id == attempt.team_id,
                hooks.c.active.is_(True),
                hooks.c.deleted_at.is_(None),
                # Reactivated after this attempt (or the request read again): it stands.
                hooks.c.updated_at < as_utc(attempt.attempted_at),
            )
            .values(active=False, updated_at=utcnow())
        )
        if result.rowcount == 1:
            notice = await record_audit(
                conn,
                _DISPATCHER,
                "webhook.disabled",
                "webhook",
                attempt.webhook_id,
                team_id=attempt.team_id,
                details={"reason": attempt.disable_reason, "delivery_id": attempt.delivery_id},
            )
            applied.append((attempt, notice))
    return applied
