"""Telling every cache that an entity changed, through the ``changes`` topic."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Literal

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from ._contracts import Change, Topics, decode
from ._errors import DependencyUnavailable, InvalidRecord, error_text
from ._ids import utcnow
from ._kafka import (
    FATAL_KAFKA_ERRORS,
    all_read,
    make_patient_consumer,
    partitions_of,
    start_client,
    stop_client,
)
from ._lifecycle import Loops, cancel_and_wait
from ._metrics import Metrics
from ._settings import Settings

_FETCH_RETRY_SECONDS = 1.0
# How long a change's caller waits for its notice to be acknowledged; a notice slower than
# that still goes, and caches catch up on their own meanwhile (their TTLs, the ended-keys
# list, the dispatcher's reload).
NOTICE_WAIT_SECONDS = 1.0
_POSITION_WAIT_SECONDS = 5.0
# A change's record carries its producer's clock: one a little behind this process's
# still counts as newer than a moment this process took. (Only records written before the
# follower started are judged by it: any later one is read whatever its clock says.)
_CLOCK_SKEW_MARGIN_MS = 5_000

Entity = Literal["webhook", "token", "user", "team", "membership", "permission_group"]
Action = Literal["created", "updated", "deleted"]


class ChangeNotifier:
    def __init__(
        self,
        producer: AIOKafkaProducer,
        topics: Topics,
        local: Callable[[Change], None] | None = None,
        *,
        wait_seconds: float | None = NOTICE_WAIT_SECONDS,
    ) -> None:
        self._producer = producer
        self._wait_seconds = wait_seconds
        self._topic = topics.changes
        # This process's own caches learn at once, before the record makes its round trip.
        self._local = local
        # Notices still on their way after the caller stopped waiting (held: the event
        # loop keeps only weak references to tasks).
        self._late: set[asyncio.Future[object]] = set()

    async def notify(
        self,
        entity: Entity,
        entity_id: str,
        action: Action,
        team_id: str | None = None,
        state: str | None = None,
    ) -> bool:
        """Best effort after the change has committed: a lost notice is covered by cache TTLs
        and the dispatcher's periodic resync, so it must not fail the caller's request.
        Returns whether the broker took it."""
        change = Change(
            entity=entity,
            entity_id=entity_id,
            action=action,
            team_id=team_id,
            state=state,
            at=utcnow(),
        )
        if self._local is not None:
            self._local(change)
        sending: asyncio.Future[object] = asyncio.ensure_future(
            self._producer.send_and_wait(
                self._topic, value=change.to_bytes(), key=entity_id.encode()
            )
        )
        # Until its caller stops waiting, the caller hears how it went; after (a wait run
        # out, a caller cancelled), the notice is watched here, its failure logged.
        waited = [True]
        self._late.add(sending)
        sending.add_done_callback(
            lambda done: self._arrived(done, entity, entity_id, unheard=not waited[0])
        )
        try:
            # The change is made; its caller (a revocation, say) should not wait out a
            # broker that does not answer, up to the producer's whole timeout, to hear it.
            await asyncio.wait_for(asyncio.shield(sending), self._wait_seconds)
        except TimeoutError:
            waited[0] = False
            structlog.get_logger().warning(
                "change_notice_late",
                entity=entity,
                entity_id=entity_id,
                waited_seconds=self._wait_seconds,
            )
            return False
        except KafkaError as exc:
            _not_published(entity, entity_id, exc)
            return False
        except asyncio.CancelledError:
            waited[0] = False
            raise
        return True

    def _arrived(
        self, sending: asyncio.Future[object], entity: Entity, entity_id: str, *, unheard: bool
    ) -> None:
        self._late.discard(sending)
        # Read in every case, so asyncio never reports its error as never retrieved.
        error = None if sending.cancelled() else sending.exception()
        if error is not None and unheard:
            _not_published(entity, entity_id, error)


def _not_published(entity: Entity, entity_id: str, error: BaseException) -> None:
    structlog.get_logger().warning(
        "change_not_published", entity=entity, entity_id=entity_id, error=error_text(error)
    )


ChangeHandler = Callable[[Change], Awaitable[None] | None]
# Given every valid change of one fetch, in order: a cache that reads its source per change
# can read a burst at once.
ChangesHandler = Callable[[list[Change]], Awaitable[None]]


def one_at_a_time(handle: ChangeHandler) -> ChangesHandler:
    """A handler of single changes, fed a fetch's changes in turn; one that raises is
    logged and the next change still handled."""

    async def handle_each(changes: list[Change]) -> None:
        for change in changes:
            try:
                outcome = handle(change)
                if outcome is not None:
                    await outcome
            except Exception:
                structlog.get_logger().exception(
                    "change_handler_failed", entity=change.entity, id=change.entity_id
                )

    return handle_each


async def follow_changes(
    consumer: AIOKafkaConsumer,
    handle: ChangesHandler,
    *,
    newer_than_ms: int = 0,
    ends_at_start: Mapping[TopicPartition, int] | None = None,
    caught_up: asyncio.Event | None = None,
    on_invalid: Callable[[], None] | None = None,
    assigned_from: str | None = None,
) -> None:
    """Feed every change record to ``handle``, a fetch at a time; every process reads all
    of them (no group).

    Records older than ``newer_than_ms`` are skipped: a cache loaded after them already
    reflects them. A record's time is its producer's clock, so only the records written
    before following began are judged by it: those below their partition's end in
    ``ends_at_start``. Placed by time, a follower skips most of them unread, not all (the
    first record from a moment on may be followed by older ones: a producer whose clock is
    behind, or a broker answering the start of a batch). A record at or past the end was
    written since, and is handled even from a producer whose clock is behind; so is every
    record of a partition added since (not in ``ends_at_start``). Without the ends (the
    broker could not say) every record is judged by its time.

    Invalid records are logged, counted (``on_invalid``) and skipped, not dead-lettered
    (every process reads each one: it would be set aside once per process); a failed fetch
    is tried again; a cache stops following only on a refusal no retry changes
    (``FATAL_KAFKA_ERRORS``), which fails the process. ``caught_up`` is set once every record
    that was there when following began has been handled.

    A consumer assigned by hand the partitions of ``assigned_from`` also takes the ones
    added to that topic later (a subscription would be given them).
    """
    log = structlog.get_logger()
    while True:
        try:
            # Short waits until caught up: an empty topic answers only when the wait ends,
            # and a process waiting to catch up waits on that.
            catching_up = caught_up is not None and not caught_up.is_set()
            batches = await consumer.getmany(timeout_ms=50 if catching_up else 500)
        except FATAL_KAFKA_ERRORS:
            raise
        except KafkaError as exc:
            log.warning("changes_fetch_failed", error=error_text(exc))
            await asyncio.sleep(_FETCH_RETRY_SECONDS)
            continue
        changes = []
        for partition, batch in batches.items():
            # Written after following began: the records from this offset on (a partition
            # added since, all of them).
            end = None if ends_at_start is None else ends_at_start.get(partition, 0)
            for record in batch:
                if (end is None or record.offset < end) and record.timestamp < newer_than_ms:
                    continue
                try:
                    changes.append(decode(Change, record.value))
                except InvalidRecord as exc:
                    log.warning("change_record_invalid", reason=exc.message, offset=record.offset)
                    if on_invalid is not None:
                        on_invalid()
        if changes:
            try:
                await handle(changes)
            except Exception:
                log.exception("change_handler_failed", changes=len(changes))
        if caught_up is not None and not caught_up.is_set():
            try:
                if await all_read(consumer):
                    caught_up.set()
            except KafkaError as exc:
                log.warning("changes_position_failed", error=error_text(exc))
        if assigned_from is not None:
            # After the fetch's changes are handled: a failure here must not lose them.
            try:
                await _take_new_partitions(consumer, assigned_from)
            except KafkaError as exc:
                log.warning("changes_partitions_unknown", error=error_text(exc))


async def _start_positions(
    consumer: AIOKafkaConsumer, topic: str, since_ms: int
) -> tuple[dict[TopicPartition, int | None], bool, dict[TopicPartition, int] | None]:
    """Each partition's first record from ``since_ms`` on, looked up before the consumer
    reads anything: a lookup sent behind a fetch waits out the fetch's long poll. A
    partition with nothing that recent starts at its end; ``None`` where the broker cannot
    say (read from the start, the older records skipped one by one). Also whether no
    partition had anything that recent: nothing to catch up on; and each partition's end
    (``None`` if unknown): the records from it on are newer, whatever their time says."""
    partitions = await partitions_of(consumer, topic)
    try:
        # The end first: a record written after it is read whatever the lookup by time says.
        ends = await consumer.end_offsets(partitions)
        found = await consumer.offsets_for_times(dict.fromkeys(partitions, since_ms))
    except KafkaError as exc:
        structlog.get_logger().warning("changes_start_unknown", error=error_text(exc))
        return dict.fromkeys(partitions), False, None
    positions: dict[TopicPartition, int | None] = {}
    nothing_newer = bool(partitions)
    for partition in partitions:
        first_newer = found.get(partition)
        # No record that recent: Kafka answers None, the embedded broker a timestamp of -1.
        if first_newer is None or first_newer.timestamp < 0:
            positions[partition] = ends[partition]
        else:
            positions[partition] = first_newer.offset
            nothing_newer = False
    return positions, nothing_newer, dict(ends)


def _assign(consumer: AIOKafkaConsumer, positions: dict[TopicPartition, int | None]) -> None:
    """Assigned and placed in one step, so the fetcher never starts from anywhere else.
    Assigning by hand (not subscribing) is what allows it: a subscription is assigned later,
    by a task, with the first fetch already on its way."""
    consumer.assign(list(positions))
    for partition, position in positions.items():
        if position is not None:
            consumer.seek(partition, position)


async def _position_or_none(consumer: AIOKafkaConsumer, partition: TopicPartition) -> int | None:
    # A partition whose position is still being reset (its leader away) would keep the
    # follower waiting for good; it has given nothing yet, so it starts over as new.
    try:
        async with asyncio.timeout(_POSITION_WAIT_SECONDS):
            position: int = await consumer.position(partition)
    except TimeoutError:
        return None
    return position


async def _take_new_partitions(consumer: AIOKafkaConsumer, topic: str) -> bool:
    """Partitions added to the topic since the follower started are read from their start
    (everything in them is newer); the others keep their place. True if there were any."""
    known = consumer.partitions_for_topic(topic) or set()
    assigned = consumer.assignment()
    if known <= {partition.partition for partition in assigned}:
        return False
    kept = sorted(assigned)
    found = await asyncio.gather(*(_position_or_none(consumer, p) for p in kept))
    positions: dict[TopicPartition, int | None] = dict(zip(kept, found, strict=True))
    for number in sorted(known):
        positions.setdefault(TopicPartition(topic, number), None)
    _assign(consumer, positions)
    structlog.get_logger().info("changes_partitions_added", partitions=len(positions))
    return True


class ChangeFollower:
    """A process's subscription to ``changes``: its own consumer and the task feeding it.

    ``handle`` takes one change at a time; ``handle_many`` each fetch's changes at once.
    """

    def __init__(
        self,
        settings: Settings,
        handle: ChangeHandler | None = None,
        *,
        handle_many: ChangesHandler | None = None,
        loops: Loops | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        if handle is not None and handle_many is None:
            handle_many = one_at_a_time(handle)
        elif handle_many is None or handle is not None:
            raise TypeError("give either handle or handle_many")
        self._settings = settings
        self._handle = handle_many
        # Started among the service's loops: a follower that died would otherwise leave
        # every cache of the process stale with /healthz saying all is well.
        self._loops = loops
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._caught_up = asyncio.Event()
        # Where reading began, per partition of ``changes`` (none where the broker could not
        # say: such a partition is read from its start).
        self.started_at: dict[int, int] = {}
        self._invalid = (
            None
            if metrics is None
            else metrics.counter(
                "change_records_invalid_total", "Change records skipped as invalid"
            )
        )

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self, *, newer_than_ms: int | None = None) -> None:
        """Follow the changes made after ``newer_than_ms`` (by default, this call): what the
        caches reflect already. The records before it are not read at all: ``changes`` may
        hold days of them, and a process must not wait on them to start."""
        since = (
            int(utcnow().timestamp() * 1000) if newer_than_ms is None else newer_than_ms
        ) - _CLOCK_SKEW_MARGIN_MS
        topic = Topics(self._settings.topic_prefix).changes
        self._consumer = make_patient_consumer(self._settings, group_id=None)
        await start_client(self._consumer, self._settings)
        try:
            positions, nothing_newer, ends = await _start_positions(self._consumer, topic, since)
        except KafkaError as exc:
            await stop_client(self._consumer)
            raise DependencyUnavailable(
                f"the {topic} topic cannot be read (run `hookwire topics` if it is missing):"
                f" {exc!r}"
            ) from exc
        _assign(self._consumer, positions)
        if nothing_newer:
            # Else the first fetch would tell, once its long poll of an empty topic ended.
            self._caught_up.set()
        self.started_at = {
            partition.partition: position
            for partition, position in positions.items()
            if position is not None
        }
        following = follow_changes(
            self._consumer,
            self._handle,
            newer_than_ms=since,
            ends_at_start=ends,
            caught_up=self._caught_up,
            on_invalid=None if self._invalid is None else self._invalid.inc,
            assigned_from=topic,
        )
        if self._loops is not None:
            self._task = self._loops.start(following, name="changes")
        else:
            self._task = asyncio.create_task(following, name="changes")

    @property
    def caught_up(self) -> bool:
        return self._caught_up.is_set()

    async def wait_caught_up(self, within_seconds: float) -> bool:
        """Until the records there at the start are handled; False if that took too long."""
        try:
            await asyncio.wait_for(self._caught_up.wait(), within_seconds)
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        if self._consumer is not None:
            await stop_client(self._consumer)
