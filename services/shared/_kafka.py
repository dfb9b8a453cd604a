"""Kafka clients built one way for every service, and the topic layout they rely on.

Settings chosen for both real Kafka and the embedded broker: idempotence stays off (the
embedded broker rejects it; every consumer de-duplicates by id instead), new groups start
from ``earliest`` (``latest`` is unreliable there), and commits are always explicit.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import itertools
import math
import random
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import timedelta
from typing import Any, NamedTuple

import aiokafka.admin.client
import aiokafka.client
import orjson
import structlog
from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
    ConsumerRecord,
    TopicPartition,
)
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.conn import CloseReason
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    InconsistentGroupProtocolError,
    InvalidGroupIdError,
    InvalidSessionTimeoutError,
    KafkaConnectionError,
    KafkaError,
    MessageSizeTooLargeError,
    NotEnoughReplicasAfterAppendError,
    RecordListTooLargeError,
    RecordTooLargeError,
    RequestTimedOutError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
    UnsupportedVersionError,
)
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.protocol.metadata import MetadataRequest

from ._contracts import DeadLetter, Topics
from ._errors import DependencyUnavailable, OutcomeUnknown, RecordTooLarge, error_text
from ._ids import utcnow
from ._lifecycle import cancel_and_wait, finish_despite_cancel, keep_cancelling
from ._metrics import Metrics
from ._settings import LONGEST_WAIT_SECONDS, Settings


class _MetadataRequestCreatingNothing(MetadataRequest):  # type: ignore[misc]
    """A client's question about topics that never has the broker create one.

    aiokafka asks with topic creation allowed, and Kafka (the embedded broker too) then
    creates a topic it lacks, with its own partition count and retention: a producer
    writing to a topic the cluster lost (a broker back without its data) made an empty
    one that nothing read, and its records were taken, acknowledged and never delivered.
    Asked this way, the write fails (the api undoes the change and answers 503) and the
    topic watch stops the process. Topics are made only by `hookwire topics`."""

    def __init__(self, topics: list[str] | None = None, allow_auto_topic_creation: bool = False):
        super().__init__(topics, allow_auto_topic_creation)


# aiokafka builds its requests inside its client, with no setting for this: every client of
# every process goes through this module, so the swap is made once, here.
aiokafka.client.MetadataRequest = _MetadataRequestCreatingNothing
aiokafka.admin.client.MetadataRequest = _MetadataRequestCreatingNothing  # describe_topics

# How often a running service checks that its topics are still there, and how many checks
# in a row must miss one before it stops (one answer from a broker still loading is not
# taken for a lost topic).
TOPIC_WATCH_SECONDS = 15.0
TOPIC_WATCH_MISSES = 2

# Broker answers no retry can change: a setting the broker refuses (a session timeout out
# of its bounds) or a permission the cluster does not grant. A consumer loop that met one
# would warn every second for ever while its process looked healthy; it ends instead, so
# /healthz fails and the process stops with the broker's reason (decision 62).
FATAL_KAFKA_ERRORS: tuple[type[KafkaError], ...] = (
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    InconsistentGroupProtocolError,
    InvalidGroupIdError,
    InvalidSessionTimeoutError,
    TopicAuthorizationFailedError,
    UnsupportedVersionError,
)

RETRY_TIERS = 7
OutRecord = tuple[str, bytes | None, bytes]
_PARTITIONER = DefaultPartitioner()
_TOPIC_EXISTS = 36


def topics_for(settings: Settings) -> Topics:
    return Topics(settings.topic_prefix)


def topic_layout(settings: Settings) -> dict[str, int]:
    """Topic name → partition count; fan-out topics get the configured parallelism."""
    topics = topics_for(settings)
    wide = settings.kafka_partitions
    layout = {
        topics.events: wide,
        topics.deliveries: wide,
        topics.attempts: wide,
        topics.dead_letter: 1,
        topics.changes: 1,
        topics.audit: 1,
    }
    layout.update({topics.retry(tier): wide for tier in range(1, RETRY_TIERS + 1)})
    return layout


def bootstrap_servers(settings: Settings) -> str:
    if not settings.kafka_bootstrap:
        raise DependencyUnavailable("HOOKWIRE_KAFKA_BOOTSTRAP is not set and no broker was started")
    return settings.kafka_bootstrap


def make_producer(settings: Settings, **overrides: Any) -> AIOKafkaProducer:
    options: dict[str, Any] = {
        "bootstrap_servers": bootstrap_servers(settings),
        "acks": "all",
        "enable_idempotence": False,
        "linger_ms": 2,
        # send_all packs a partition's records into one batch; let a busy round fit.
        "max_batch_size": 262_144,
        "request_timeout_ms": 10_000,
    }
    options.update(overrides)
    return AIOKafkaProducer(**options)


# The client's own default: five minutes between reads before the group drops a member.
_MAX_POLL_INTERVAL_MS = 300_000


# aiokafka's own default, and what a join needs beyond the broker's wait.
_REQUEST_TIMEOUT_MS = 40_000
_JOIN_MARGIN_MS = 5_000


def make_consumer(
    settings: Settings, *topics: str, group_id: str | None, **overrides: Any
) -> AIOKafkaConsumer:
    options: dict[str, Any] = {
        "bootstrap_servers": bootstrap_servers(settings),
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": settings.kafka_session_timeout_ms,
        "heartbeat_interval_ms": settings.kafka_heartbeat_interval_ms,
        # A join waits at the broker for up to the rebalance timeout (the session's): the
        # request must not give up first, or a long session could never be joined.
        "request_timeout_ms": max(
            _REQUEST_TIMEOUT_MS, settings.kafka_session_timeout_ms + _JOIN_MARGIN_MS
        ),
        "fetch_max_wait_ms": settings.kafka_fetch_max_wait_ms,
        "max_poll_records": 500,
        # A stop's drain reads nothing while it waits for deliveries in flight; the group
        # must not count the member gone meanwhile (its partitions would be sent again).
        "max_poll_interval_ms": max(
            _MAX_POLL_INTERVAL_MS, int((settings.shutdown_grace_seconds + 60) * 1000)
        ),
    }
    options.update(overrides)
    return AIOKafkaConsumer(*topics, **options)


# Retries wait seconds to hours and a changed webhook has a second to take effect, so their
# consumers can ask less often: a broker that does not answer a waiting fetch early when
# records arrive is otherwise asked 50 times a second per idle consumer.
_PATIENT_FETCH_MAX_WAIT_MS = 250


def make_patient_consumer(
    settings: Settings, *topics: str, group_id: str | None, **overrides: Any
) -> AIOKafkaConsumer:
    """A consumer for records that can wait a quarter of a second (retries, changes)."""
    wait = max(settings.kafka_fetch_max_wait_ms, _PATIENT_FETCH_MAX_WAIT_MS)
    return make_consumer(settings, *topics, group_id=group_id, fetch_max_wait_ms=wait, **overrides)


def _unreachable(settings: Settings, exc: Exception) -> DependencyUnavailable:
    return DependencyUnavailable(f"Kafka is unreachable at {settings.kafka_bootstrap}: {exc}")


# A broker busy for a moment, or restarting, refuses a connection or two; that is not
# "unreachable". Only a failure before anything started is tried again (the client can
# start afresh then).
_BOOTSTRAP_TRIES = 3
_BOOTSTRAP_PAUSE_SECONDS = 1.0


def _nothing_started(client: AIOKafkaProducer | AIOKafkaConsumer) -> bool:
    if isinstance(client, AIOKafkaConsumer):
        return client._fetcher is None
    return client._sender.sender_task is None


# How long a start cut off by a stop signal may go on to reach a point it can be closed from
# (a broker that answers at all answers a metadata request in milliseconds), how long its
# cancellation may take, and how long a start that got there has to leave its group. A
# stop while starting waits at most their sum.
_START_SETTLE_SECONDS = 1.0
_START_CANCEL_SECONDS = 1.0
_STARTED_STOP_SECONDS = 2.0
_START_CUT_OFF_SECONDS = _START_SETTLE_SECONDS + _START_CANCEL_SECONDS + _STARTED_STOP_SECONDS
_CANCEL_REPEAT_SECONDS = 0.25


async def start_client(client: AIOKafkaProducer | AIOKafkaConsumer, settings: Settings) -> None:
    for attempt in range(1, _BOOTSTRAP_TRIES + 1):
        try:
            await _start_settling(client)
            return
        except KafkaConnectionError as exc:
            if attempt < _BOOTSTRAP_TRIES and _nothing_started(client):
                await asyncio.sleep(_BOOTSTRAP_PAUSE_SECONDS)
                continue
            await stop_client(client)
            raise _unreachable(settings, exc) from exc
        except (KafkaError, OSError) as exc:
            await stop_client(client)
            raise _unreachable(settings, exc) from exc


async def start_all(
    clients: Sequence[AIOKafkaProducer | AIOKafkaConsumer], settings: Settings
) -> None:
    """Start clients together; when one fails, the others' starts are ended too (closed,
    not left running for the caller's stop to race), then the failure is raised."""
    starts = [asyncio.ensure_future(start_client(client, settings)) for client in clients]
    try:
        await asyncio.gather(*starts)
    except BaseException:
        for start in starts:
            start.cancel()
        await finish_despite_cancel(asyncio.wait(starts, timeout=_START_CUT_OFF_SECONDS + 1))
        for client, start in zip(clients, starts, strict=True):
            start.add_done_callback(_unheard)
            if not start.done():
                _close_what_is_left(client)
        raise


async def _start_settling(client: AIOKafkaProducer | AIOKafkaConsumer) -> None:
    """``client.start()``, which a cancellation (a stop signal while the broker is slow to
    answer) does not cut off where nothing could close what it opened: its bootstrap
    connection is a local of aiokafka's until the first metadata answer. The start gets a
    second to go on, however often the stop cancels again; then what began is closed
    and the cancellation goes on."""
    starting = asyncio.ensure_future(client.start())
    try:
        await asyncio.shield(starting)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is None or not task.cancelling():
            # Raised by the start itself, not a stop signal: a failed start.
            _close_what_is_left(client)
            raise KafkaError("the Kafka client's start was cancelled from within") from None
        await finish_despite_cancel(_settle_and_close(client, starting))
        raise


async def _settle_and_close(
    client: AIOKafkaProducer | AIOKafkaConsumer, starting: asyncio.Future[None]
) -> None:
    await asyncio.wait({starting}, timeout=_START_SETTLE_SECONDS)
    await keep_cancelling(starting, _START_CANCEL_SECONDS, every=_CANCEL_REPEAT_SECONDS)
    starting.add_done_callback(_unheard)
    if starting.done() and not starting.cancelled() and starting.exception() is None:
        # It started: leave the group as a stop does.
        await stop_client(client, within=_STARTED_STOP_SECONDS)
        return
    _close_what_is_left(client)
    if not starting.done():
        # Deaf to every cancellation: what it still starts is ended when it ends.
        starting.add_done_callback(lambda _: _close_what_is_left(client))


# The furthest ahead the dispatcher puts a delivery off: the longest wait a setting
# allows, at the largest jitter (which can double a delay).
_FURTHEST_AHEAD_SECONDS = 2 * LONGEST_WAIT_SECONDS
# A retry waits on its topic for as long as its delay, a broker's default retention (7 days
# on Kafka) would delete one set further off, with no dead letter to show for it: kept for
# the furthest wait and a week besides.
RETRY_RETENTION_MS = (_FURTHEST_AHEAD_SECONDS + 7 * 86400) * 1000
# A delivery's not_before further ahead than that (and a day for clocks apart) was not
# written by a dispatcher: it is refused, rather than kept waiting for years.
NOT_BEFORE_AHEAD_MAX = timedelta(seconds=_FURTHEST_AHEAD_SECONDS + 86400)
_RETRY_TOPIC_CONFIG = {"retention.ms": str(RETRY_RETENTION_MS)}


async def require_topics(
    producer: AIOKafkaProducer, settings: Settings, needed: Iterable[str]
) -> None:
    """Refuse to start on a cluster without the topics ``needed``: the clients would wait
    on them (they never have the broker create one), with no word of why. Reads every
    topic's metadata. Only the service's own topics: under least-privilege ACLs it sees no
    others."""
    try:
        cluster = await producer.client.fetch_all_metadata()
    except KafkaError as exc:
        raise _unreachable(settings, exc) from exc
    layout = topic_layout(settings)
    wanted = sorted(set(needed))
    missing = [name for name in wanted if name not in cluster.topics()]
    if missing:
        raise DependencyUnavailable(
            f"Kafka at {settings.kafka_bootstrap} has no topic {', '.join(missing)} (or does"
            " not let this service see it): run `hookwire topics` first"
        )
    for name in wanted:
        partitions = len(cluster.partitions_for_topic(name) or ())
        if name in layout and partitions != layout[name]:
            structlog.get_logger().warning(
                "topic_partitions_differ", topic=name, partitions=partitions, expected=layout[name]
            )


async def watch_topics(
    producer: AIOKafkaProducer,
    settings: Settings,
    needed: Iterable[str],
    metrics: Metrics,
    *,
    every: float | None = None,
) -> None:
    """Run while the service runs; end with an error once the cluster has lost one of the
    topics ``needed`` (``TOPIC_WATCH_MISSES`` checks in a row), which stops the process.

    A broker back without its data answers every request and every health check, yet its
    topics, offsets and groups are gone: consumers wait on topics that are not there and
    nothing is delivered, with no error anywhere. Stopped, the process starts again only
    once `hookwire topics` has made them (``require_topics``), on a clean state. A broker
    that cannot be asked is not a missing topic: the clients' own errors say that.

    Each answer is marked in ``kafka_answered_timestamp_seconds``: a broker that hangs
    (stopped, not gone) closes no connection and fails no health check, and a consumer's
    lag, counted from what it fetched, stays where it was."""
    wanted = sorted(set(needed))
    log = structlog.get_logger()
    answered = metrics.gauge(
        "kafka_answered_timestamp_seconds",
        "When Kafka last answered this process's check of its topics (every 15 s)",
    )
    answered.set_to_current_time()  # the start has just read them
    misses = 0
    while True:
        await asyncio.sleep(TOPIC_WATCH_SECONDS if every is None else every)
        try:
            missing = await _unknown_topics(producer, wanted)
        except (KafkaError, TimeoutError):
            misses = 0  # checks in a row that the broker answered, or none
            continue
        if missing is None:
            continue  # no broker known yet
        answered.set_to_current_time()
        if not missing:
            misses = 0
            continue
        misses += 1
        # The producer forgets the lost topics' partitions, which it would otherwise keep
        # writing to until its metadata ages (5 minutes): a broker that takes a write to a
        # topic it does not have (the embedded one does) acknowledges it into nothing.
        await producer.client.force_metadata_update()
        if misses >= TOPIC_WATCH_MISSES:
            raise DependencyUnavailable(
                f"Kafka at {settings.kafka_bootstrap} no longer has topic"
                f" {', '.join(missing)} (a broker back without its data?): run `hookwire"
                " topics`; this process stops and starts again once they are there"
            )
        log.warning("kafka_topics_missing", topics=missing, checks=misses)


async def _unknown_topics(producer: AIOKafkaProducer, wanted: list[str]) -> list[str] | None:
    """Which of ``wanted`` the broker says it does not have, asked for by name (which
    creates none, see above); None when no broker is known to ask. A topic answered with
    another error (not authorised after an ACL change, a leader being elected) is there:
    its own clients say what is wrong with it."""
    client = producer.client
    node = client.get_random_node()
    if node is None:
        return None
    answer = await client.send(node, _MetadataRequestCreatingNothing(wanted))
    # Each topic's entry starts with its error code and its name, in every version.
    return [entry[1] for entry in answer.topics if entry[0] == UnknownTopicOrPartitionError.errno]


class TopicsChecked(NamedTuple):
    created: list[str]
    # An existing topic whose partitions are not the layout's: (topic, has, expected).
    differing: list[tuple[str, int, int]]


async def ensure_topics(settings: Settings, layout: dict[str, int] | None = None) -> TopicsChecked:
    """Create missing topics; an existing topic is not an error, and is left as it is
    (its partitions are told, when they differ from the layout)."""
    wanted = layout if layout is not None else topic_layout(settings)
    topics = topics_for(settings)
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap_servers(settings), request_timeout_ms=10_000
    )
    try:
        await admin.start()
    except (KafkaError, OSError) as exc:
        await admin.close()
        raise _unreachable(settings, exc) from exc
    try:
        try:
            response = await admin.create_topics(
                [
                    NewTopic(
                        name,
                        partitions,
                        settings.kafka_replication_factor,
                        topic_configs=_RETRY_TOPIC_CONFIG if topics.is_retry(name) else None,
                    )
                    for name, partitions in wanted.items()
                ]
            )
        except (KafkaError, OSError) as exc:
            # Started, then lost or timed out: a broker problem, said in one line.
            raise DependencyUnavailable(
                f"could not create Kafka topics at {settings.kafka_bootstrap}: {exc}"
            ) from exc
        failed = [
            (topic, code)
            for topic, code, *_ in response.topic_errors
            if code not in (0, _TOPIC_EXISTS)
        ]
        if failed:
            raise DependencyUnavailable(f"could not create Kafka topics: {failed}")
        created = sorted(topic for topic, code, *_ in response.topic_errors if code == 0)
        existing = sorted(set(wanted) - set(created))
        differing = []
        if existing:
            try:
                described = await admin.describe_topics(existing)
            except (KafkaError, OSError) as exc:
                raise DependencyUnavailable(
                    f"could not read Kafka topics at {settings.kafka_bootstrap}: {exc}"
                ) from exc
            for topic in described:
                has = len(topic["partitions"])
                if topic["topic"] in wanted and has != wanted[topic["topic"]]:
                    differing.append((topic["topic"], has, wanted[topic["topic"]]))
        return TopicsChecked(created, sorted(differing))
    finally:
        await admin.close()


async def send_all(
    producer: AIOKafkaProducer, records: Iterable[tuple[str, bytes | None, bytes]]
) -> None:
    """Send (topic, key, value) records and wait until the broker acknowledged each one.

    Records are packed into one batch per partition, placed where the default partitioner
    would put their key. Sending record by record costs more: each ``send`` that finds its
    partition's batch in flight waits for it, and every waiter is woken when it drains.
    """
    batches, refused = await _send_packed(producer, [(*record, 0) for record in records])
    outcomes = await _outcomes(batches)
    if refused:
        raise refused[0]
    if outcomes:
        raise next(iter(outcomes.values()))


def too_large(error: BaseException) -> bool:
    """Whether a send failed on the size of what it carried: sent again as it is, it
    would fail again for ever (unlike a broker away or a leader moving)."""
    return isinstance(
        error,
        RecordTooLarge | MessageSizeTooLargeError | RecordListTooLargeError | RecordTooLargeError,
    )


async def send_each(
    producer: AIOKafkaProducer, records: Sequence[tuple[str, bytes | None, bytes]]
) -> dict[int, BaseException]:
    """Like ``send_all``, but a failure is only its own records': returns the error of
    each record (by its index) that the broker did not take. A caller that sends the
    failed ones again sends no second copy of the others."""
    batches, refused = await _send_packed(
        producer, [(*record, index) for index, record in enumerate(records)]
    )
    return {**await _outcomes(batches), **refused}


async def _send_packed(
    producer: AIOKafkaProducer, records: list[tuple[str, bytes | None, bytes, int]]
) -> tuple[list[tuple[asyncio.Future[Any], set[int]]], dict[int, BaseException]]:
    """Pack records tagged with their owner into batches and hand them to the producer.

    Returns each batch's acknowledgement with the owners of its records, and the owners
    already refused (a record that fits no batch, a topic whose partitions are unknown, a
    batch the producer would not take), so that one owner's fault is only that owner's.
    """
    partitions: dict[str, list[int]] = {}
    unknown: dict[str, KafkaError] = {}
    open_batches: dict[tuple[str, int], tuple[BatchBuilder, set[int]]] = {}
    sent: list[tuple[asyncio.Future[Any], set[int]]] = []
    refused: dict[int, BaseException] = {}

    async def hand_over(topic: str, partition: int, batch: BatchBuilder, owners: set[int]) -> None:
        try:
            sent.append((await producer.send_batch(batch, topic, partition=partition), owners))
        except (KafkaError, DependencyUnavailable) as exc:
            for owner in owners:
                refused.setdefault(owner, exc)

    for topic, key, value, owner in records:
        if owner in refused:
            continue
        if topic in unknown:
            refused[owner] = unknown[topic]
            continue
        if topic not in partitions:
            try:
                partitions[topic] = sorted(await producer.partitions_for(topic))
            except KafkaError as exc:
                # Asked once: the metadata wait is long, and a round can hold many records.
                unknown[topic] = refused[owner] = exc
                continue
        every = partitions[topic]
        partition = partition_of(key, len(every)) if key is not None else random.choice(every)  # noqa: S311
        batch, owners = open_batches.get((topic, partition), (None, set()))
        if batch is not None and batch.append(key=key, value=value, timestamp=None) is not None:
            owners.add(owner)
            continue
        if batch is not None:
            del open_batches[(topic, partition)]
            await hand_over(topic, partition, batch, owners)
        batch = producer.create_batch()
        if batch.append(key=key, value=value, timestamp=None) is None:
            refused[owner] = RecordTooLarge(f"a record of {len(value)} bytes fits no batch")
            continue
        open_batches[(topic, partition)] = (batch, {owner})
    for (topic, partition), (batch, owners) in open_batches.items():
        if owners - refused.keys():
            await hand_over(topic, partition, batch, owners)
    return sent, refused


class SentUnacknowledged(KafkaError):  # type: ignore[misc]
    """A batch that failed after reaching the broker without an answer that refused it (a
    request timed out, a connection lost while it waited, a write not replicated in time):
    the broker may have written it, and may yet show it to consumers. Unlike a refusal, it
    must not be taken back as if it never happened (a change undone whose event is out)."""

    retriable = True


# The last try's errors that leave a batch perhaps written. A connection never made
# (NodeNotReadyError), a leader not known, or a broker's refusal leave it unwritten by
# that try; earlier tries of a batch are not told apart (aiokafka keeps only the last).
_MAYBE_WRITTEN = (RequestTimedOutError, KafkaConnectionError, NotEnoughReplicasAfterAppendError)


async def _outcomes(
    batches: list[tuple[asyncio.Future[Any], set[int]]],
) -> dict[int, BaseException]:
    """Wait for every batch; the first error of each owner whose batch failed."""
    results = await asyncio.gather(*(future for future, _ in batches), return_exceptions=True)
    failed: dict[int, BaseException] = {}
    for (_, owners), result in zip(batches, results, strict=True):
        if isinstance(result, asyncio.CancelledError):
            result = DependencyUnavailable("the Kafka producer stopped before acknowledging")
        elif isinstance(result, _MAYBE_WRITTEN):
            unacknowledged = SentUnacknowledged(f"sent, not acknowledged: {result!r}")
            unacknowledged.__cause__ = result
            result = unacknowledged
        if isinstance(result, BaseException):
            for owner in owners:
                # An owner with records in several batches hears of one that may have
                # been written before one refused: it must not be taken back.
                if owner not in failed or isinstance(result, SentUnacknowledged):
                    failed[owner] = result
    return failed


@functools.lru_cache(maxsize=65_536)
def partition_of(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner gives ``key`` among ``partitions``."""
    # aiokafka's murmur2 is pure Python; keys (webhook ids, objects) repeat a lot.
    every = list(range(partitions))
    return int(_PARTITIONER(key, every, every))


def _unheard(outcome: asyncio.Future[Any]) -> None:
    # Its caller stopped waiting; taking the outcome keeps it from being reported unread.
    if not outcome.cancelled():
        outcome.exception()


# The error of each record the broker did not take, by its index in what was sent.
_Refusals = dict[int, BaseException]


class _Caller(NamedTuple):
    records: list[OutRecord]
    answer: asyncio.Future[_Refusals]
    # Told of each record refused (``send_each``), or of the first (``send``).
    each: bool


class BatchingSender:
    """Sends the records of many concurrent callers together, as ``send_all`` batches.

    Each caller waits until its own records are acknowledged. While one round is on its way
    to the broker the next one gathers, so a busy producer sends fewer, larger requests;
    ``linger_seconds`` holds each round back that long, so a moderate flow is sent in
    several records a request rather than one.
    The sending task starts with the first record; ``close()`` ends it.
    """

    def __init__(self, producer: AIOKafkaProducer, *, linger_seconds: float = 0.0) -> None:
        self._producer = producer
        self._linger = linger_seconds
        self._waiting: list[_Caller] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def producer(self) -> AIOKafkaProducer:
        """The producer under it, for a record that must go in a batch of its own (this
        sender packs the records of a round together)."""
        return self._producer

    async def send(self, records: list[OutRecord], *, within: float | None = None) -> None:
        """Return once the broker acknowledged every record; raise if any was refused.

        With ``within``: TimeoutError when the records were still waiting for a round
        (withdrawn: they will not be sent), ``OutcomeUnknown`` when they were already on
        their way (they may yet be acknowledged).
        """
        refused = await self._submit(records, within, each=False)
        if refused:
            raise refused[min(refused)]

    async def send_each(
        self, records: list[OutRecord], *, within: float | None = None
    ) -> _Refusals:
        """Like ``send``, but a record the broker did not take is reported, not raised:
        returns the error of each such record by its index. A caller that sends those
        again sends no second copy of the others. Raises as ``send`` does when the
        sender stops or time runs out."""
        return await self._submit(records, within, each=True)

    async def _submit(
        self, records: list[OutRecord], within: float | None, *, each: bool
    ) -> _Refusals:
        if not records:
            return {}
        if self._closed:
            # A caller still running after the stop's grace: no new sending task that
            # nothing would end.
            raise DependencyUnavailable("the Kafka sender has stopped")
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="batching-sender")
        done: asyncio.Future[_Refusals] = asyncio.get_running_loop().create_future()
        entry = _Caller(records, done, each)
        self._waiting.append(entry)
        self._wake.set()
        try:
            if within is None:
                return await done
            return await asyncio.wait_for(asyncio.shield(done), within)
        except (asyncio.CancelledError, TimeoutError) as exc:
            # A caller that gives up and undoes what the records announce must not see
            # them sent after all: withdrawn while they still wait for a round.
            if entry in self._waiting:
                self._waiting.remove(entry)
            elif isinstance(exc, TimeoutError):
                done.add_done_callback(_unheard)
                raise OutcomeUnknown("records sent, not acknowledged in time") from exc
            raise

    async def close(self) -> None:
        """Stop sending; a caller after it is told the sender has stopped."""
        self._closed = True
        await cancel_and_wait(self._task)

    async def _run(self) -> None:
        sending: list[_Caller] = []
        try:
            while True:
                await self._wake.wait()
                if self._linger:
                    # Callers that can wait a little share a request with those just behind.
                    await asyncio.sleep(self._linger)
                self._wake.clear()
                sending, self._waiting = self._waiting, []
                if sending:
                    await self._round(sending)
        finally:
            # Whoever still waits when the sender stops gets an answer, not a wait for ever.
            for _, done, _ in sending:
                if not done.done():
                    done.set_exception(OutcomeUnknown("the Kafka sender stopped mid-round"))
            for _, done, _ in self._waiting:
                if not done.done():
                    done.set_exception(DependencyUnavailable("the Kafka sender has stopped"))
            self._waiting = []

    async def _round(self, waiting: list[_Caller]) -> None:
        # Each caller hears about its own records only: a partition's batch refused must
        # not tell a caller whose records were all acknowledged that they were not (it
        # would undo a change whose event is in the stream). A caller of ``send`` is one
        # owner (once one of its records is refused the rest are not sent); each record
        # of a caller of ``send_each`` is its own.
        tagged: list[tuple[str, bytes | None, bytes, int]] = []
        places: list[tuple[int, int]] = []
        for caller, (records, _, each) in enumerate(waiting):
            for place, (topic, key, value) in enumerate(records):
                if each or place == 0:
                    places.append((caller, place))
                tagged.append((topic, key, value, len(places) - 1))
        batches, refused = await _send_packed(self._producer, tagged)
        answers: list[_Refusals] = [{} for _ in waiting]
        for owner, error in {**await _outcomes(batches), **refused}.items():
            caller, place = places[owner]
            answers[caller][place] = error
        for (_, done, _), answer in zip(waiting, answers, strict=True):
            if not done.done():
                done.set_result(answer)


async def stop_client(
    client: AIOKafkaProducer | AIOKafkaConsumer, *, within: float | None = None
) -> None:
    """Close a client even when the broker is gone.

    With the broker down, aiokafka's own fetch tasks can surface a CancelledError out of
    ``stop()``; that must not abort a shutdown, unless this task itself is being cancelled.
    """
    try:
        async with asyncio.timeout(_STOP_TIMEOUT_SECONDS if within is None else within):
            await client.stop()
        _seal(client)
        return
    except TimeoutError:
        # A group consumer leaving mid-rebalance has been seen to wait for ever; shutdown
        # must not.
        structlog.get_logger().warning(
            "kafka_client_stop_timed_out",
            client=type(client).__name__,
            group=getattr(client, "_group_id", None),
        )
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            _close_what_is_left(client)
            raise
    except Exception as exc:
        # A KafkaError mostly; whatever it is, the stop must still close the client.
        structlog.get_logger().warning("kafka_client_stop_failed", error=error_text(exc))
    _close_what_is_left(client)


def _close_what_is_left(client: AIOKafkaProducer | AIOKafkaConsumer) -> None:
    """End the background tasks and close the sockets of a client whose ``stop()`` did not
    finish. ``stop()`` closes its parts one after another and gives up at the first that
    fails (a coordinator whose task ended in an error, a cancelled fetch): a fetch or
    metadata task left running would keep reconnecting to the broker for as long as the
    process lives."""
    if isinstance(client, AIOKafkaConsumer):
        inner = client._client
        parts: list[Any] = [inner, client._fetcher, client._coordinator]
        # The fetcher's per-request tasks: one still waiting for a connection would open
        # it after the sockets below are closed.
        tasks = list(getattr(client._fetcher, "_pending_tasks", ()))
    else:
        inner = client.client
        parts = [inner, client._sender]
        tasks = []
        # Callers waiting for records still in the producer's queue get an error rather
        # than waiting for ever.
        queued = client._message_accumulator
        batches = [
            *itertools.chain.from_iterable(queued._batches.values()),
            *queued._pending_batches,
        ]
        queued.fail_all(KafkaConnectionError("the producer was closed"))
        for batch in batches:
            # Failed too, for a caller waiting for room in the batch; mostly none is.
            batch._drain_waiter.add_done_callback(_unheard)
    tasks += [getattr(part, name, None) for part in parts for name in _BACKGROUND_TASKS]
    for task in tasks:
        if isinstance(task, asyncio.Task) and not task.done():
            task.cancel()
    # A produce request that failed waits for the metadata refresh the cancelled metadata
    # task would have finished; without an answer it, and the sender, would wait for ever.
    refreshing = inner._md_update_fut
    if refreshing is not None and not refreshing.done():
        refreshing.set_result(False)
    _seal(client)
    client._closed = True  # what stop() would have set: nothing left for it to close


async def _no_connection(*args: Any, **kwargs: Any) -> None:
    return None


class _ClosingConnections(dict[Any, Any]):
    """A sealed client's connections: one still being opened when the seal came is closed
    as it is filed."""

    def __setitem__(self, key: Any, connection: Any) -> None:
        super().__setitem__(key, connection)
        connection.close(reason=CloseReason.SHUTDOWN)


def _seal(client: AIOKafkaProducer | AIOKafkaConsumer) -> None:
    """Close every connection of a stopped client and let it open no more. A task still
    holding the client (a request in flight when the stop began, a caller that has not
    noticed) would otherwise open a connection nothing closes; it gets "node not ready"."""
    inner = client._client if isinstance(client, AIOKafkaConsumer) else client.client
    inner._get_conn = _no_connection
    for connection in list(inner._conns.values()):
        connection.close(reason=CloseReason.SHUTDOWN)
    inner._conns = _ClosingConnections()


# The tasks aiokafka's client, fetcher, group coordinator and sender run in the background.
_BACKGROUND_TASKS = (
    "_sync_task",
    "_fetch_task",
    "_coordination_task",
    "_heartbeat_task",
    "_commit_refresh_task",
    "_reset_committed_task",
    "_sender_task",
)


async def partitions_of(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """``topic``'s partitions, its metadata asked for if the client has none yet: on Kafka,
    a client's first metadata names no topic (the embedded broker's names them all), and
    a consumer that follows no topic learns of none. Raises a ``KafkaError`` when the topic
    does not exist (after the client's request timeout)."""
    # aiokafka offers no public call for it; its producer waits on the same one.
    numbers = await consumer._client._wait_on_metadata(topic)
    return [TopicPartition(topic, number) for number in sorted(numbers)]


async def all_read(consumer: AIOKafkaConsumer) -> bool:
    """Every assigned partition read up to its end as of the last fetch (its high-water
    mark: the embedded broker's end_offsets() is wrong after a batch)."""
    partitions = consumer.assignment()
    if not partitions:
        return False
    for partition in partitions:
        end = consumer.highwater(partition)
        if end is None or await consumer.position(partition) < end:
            return False
    return True


_COMMIT_TIMEOUT_SECONDS = 10.0


async def commit_offsets(consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int]) -> bool:
    """Commit ``offsets`` within a bound; False when the commit failed.

    A failure is usually a rebalance that took the partition: its new owner re-reads from
    the last commit, so the caller keeps its records unfinished rather than raising.
    """
    try:
        async with asyncio.timeout(_COMMIT_TIMEOUT_SECONDS):
            await consumer.commit(offsets)
    except (KafkaError, TimeoutError) as exc:
        structlog.get_logger().warning("commit_failed", error=error_text(exc))
        return False
    return True


_STOP_TIMEOUT_SECONDS = 10.0


# Below this a hand-over could not finish even a short batch; above half the session less a
# heartbeat, a member told of the rebalance a heartbeat late may rejoin too late.
_HAND_OVER_MIN_SECONDS = 0.5


def hand_over_seconds(settings: Settings) -> float:
    """How long a consumer may take, once a rebalance begins, to finish what it has in hand
    and commit: the member must rejoin within the rebalance timeout (the session timeout,
    as aiokafka sets it), and may learn of the rebalance a heartbeat late."""
    session = settings.kafka_session_timeout_ms / 1000
    heartbeat = settings.kafka_heartbeat_interval_ms / 1000
    return max(_HAND_OVER_MIN_SECONDS, session / 2 - heartbeat)


class HandOver(ConsumerRebalanceListener):  # type: ignore[misc]
    """A group consumer's rebalance listener: before partitions move, the loop reading them
    finishes what it has in hand and commits it, so their next owner does not handle it
    again; when the new assignment is in, the loop may go on.

    Given to ``subscribe`` before the consumer starts; the loop sets ``before_revoke``
    (called with the seconds it has) and ``after_assign``."""

    def __init__(self, within: float) -> None:
        self.within = within
        self.before_revoke: Callable[[float], Awaitable[None]] | None = None
        self.after_assign: Callable[[], None] | None = None
        self.stopping = False

    async def stop(self) -> None:
        """Before the loop is cancelled at a stop: as before a rebalance, what it has in
        hand is finished and committed (cut short, it would be handled again by the
        partitions' next owner), and it takes nothing more."""
        self.stopping = True
        if self.before_revoke is not None:
            await self.before_revoke(self.within)

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if revoked and self.before_revoke is not None:
            await self.before_revoke(self.within)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        # Once stopping, the loop stays handed over: it is about to be cancelled, and
        # anything it began now would be cut short.
        if self.after_assign is not None and not self.stopping:
            self.after_assign()


async def commit_when_free(
    turn: asyncio.Lock, commit: Callable[[], Awaitable[object]], within: float
) -> None:
    """For a hand-over: once the loop's turn is free (what it had in hand is finished),
    commit, all within ``within`` seconds; past that, the partitions' next owner reads
    again from the last commit (logged)."""
    try:
        async with asyncio.timeout(within):
            async with turn:
                await commit()
    except TimeoutError:
        structlog.get_logger().warning("hand_over_cut_short", within_seconds=within)


def subscribe_handing_over(
    consumer: AIOKafkaConsumer, settings: Settings, *topics: str
) -> HandOver:
    """Subscribe a group consumer (before it starts) with a ``HandOver`` listener."""
    hand_over = HandOver(hand_over_seconds(settings))
    consumer.subscribe(list(topics), listener=hand_over)
    return hand_over


async def consume_forever(
    consumer: AIOKafkaConsumer,
    handle: Callable[[list[ConsumerRecord]], Awaitable[None]],
    *,
    hand_over: HandOver | None = None,
    max_records: int = 500,
    retry_delay_seconds: float = 1.0,
    commit_interval_seconds: float = 0.1,
) -> None:
    """Hand batches to ``handle``; commit what ``handle`` returned from, never more.

    ``handle`` makes each record's outcome durable first (records acknowledged, rows
    committed). When it fails nothing of that batch is committed and the consumer goes back
    to the batch's first records, so it is processed again: at-least-once, never a silent
    skip.

    Commits name the offsets of handled batches and go out at most every
    ``commit_interval_seconds``: at a moderate rate a batch is one record, and a commit per
    batch was a broker round trip per record. A crash or a rebalance re-reads at most that
    interval's records more; a clean stop tries to commit what was handled (a failed
    commit only means records handled twice). With ``hand_over`` (the consumer's
    listener) a rebalance does not re-read them either: the batch in hand is finished and
    everything handled committed before the partitions move.
    """
    log = structlog.get_logger()
    handled: dict[TopicPartition, int] = {}
    loop = asyncio.get_running_loop()
    committed_at = loop.time()
    in_hand = asyncio.Lock()

    async def commit_handled() -> None:
        nonlocal committed_at
        committed_at = loop.time()
        owned = consumer.assignment()
        # A partition taken by a rebalance is its new owner's to commit.
        points = {partition: o for partition, o in handled.items() if partition in owned}
        handled.clear()
        if not points:
            return
        committed = False
        try:
            committed = await commit_offsets(consumer, points)
        finally:
            if not committed:
                # Tried again at the next turn (or by the last commit of a stop that cut
                # this one short), unless a later batch has moved past them.
                for partition, offset in points.items():
                    handled.setdefault(partition, offset)

    if hand_over is not None:
        hand_over.before_revoke = functools.partial(commit_when_free, in_hand, commit_handled)
    try:
        while True:
            # Handled offsets wait no longer than the interval: not a whole idle fetch wait.
            wait_ms = 500
            if handled:
                due = committed_at + commit_interval_seconds - loop.time()
                wait_ms = max(0, min(wait_ms, math.ceil(due * 1000)))
            try:
                batches = await consumer.getmany(timeout_ms=wait_ms, max_records=max_records)
            except FATAL_KAFKA_ERRORS:
                raise
            except KafkaError as exc:
                # A coordinator or fetch fault must not end the loop for good: the process
                # would keep its partitions in the group and never read them again.
                log.warning("fetch_failed", error=error_text(exc))
                await asyncio.sleep(retry_delay_seconds)
                continue
            records = [record for batch in batches.values() for record in batch]
            if hand_over is not None and hand_over.stopping:
                # Fetched after the stop's hand-over: left uncommitted, for the next owner.
                records = []
            if records:
                async with in_hand:
                    failed = await _handled(handle, records, retry_delay_seconds)
                    if failed:
                        # Back to the batch's first records, without asking the broker: a
                        # rewind that needed it could fail and leave positions past
                        # unhandled records.
                        owned = consumer.assignment()
                        for partition, batch in batches.items():
                            if partition in owned:
                                consumer.seek(partition, batch[0].offset)
                        # What came before the failed batch is done: kept.
                        await commit_handled()
                    else:
                        for partition, batch in batches.items():
                            handled[partition] = batch[-1].offset + 1
                if failed:
                    await asyncio.sleep(retry_delay_seconds)
                    continue
            if handled and loop.time() - committed_at >= commit_interval_seconds:
                # Under the lock: a hand-over finding nothing left to commit must not
                # return before this commit is in.
                async with in_hand:
                    await commit_handled()
    finally:
        if handled:
            await finish_despite_cancel(commit_handled())


async def _handled(
    handle: Callable[[list[ConsumerRecord]], Awaitable[None]],
    records: list[ConsumerRecord],
    retry_in_seconds: float,
) -> bool:
    """Whether ``handle`` failed on the batch (logged)."""
    try:
        await handle(records)
    except asyncio.CancelledError:
        raise
    except FATAL_KAFKA_ERRORS:
        # A refusal the cluster will repeat (no permission to write) ends the loop, as
        # one met fetching does: handled again for ever, the process would look well.
        raise
    except Exception as exc:
        # The batch is read again from its first record after the pause.
        structlog.get_logger().exception(
            "batch_failed",
            topic=records[0].topic,
            records=len(records),
            error=error_text(exc),
            retry_in_seconds=retry_in_seconds,
        )
        return True
    return False


# A dead letter keeps its record's key only up to this size: the key and a value of up to
# MAX_RECORD_BYTES must still fit what the broker takes (an outside producer may have used
# a key of hundreds of kilobytes).
_DEAD_LETTER_KEY_MAX_BYTES = 1024


def dead_letter_record(
    topics: Topics, record: ConsumerRecord, reason: str, *, with_payload: bool = True
) -> OutRecord:
    """The dead-letter topic's copy of a record no consumer can use, with the reason.
    Without its payload: for a record whose copy the broker itself refused."""
    value = (record.value or b"") if with_payload else b""
    key = record.key
    if key is not None and len(key) > _DEAD_LETTER_KEY_MAX_BYTES:
        reason = f"{reason} (its key of {len(key)} bytes left out)"
        key = None
    try:
        payload, encoding = value.decode(), None
    except UnicodeDecodeError:
        # Kept whole: the bytes as they came are what an operator needs to find the fault.
        payload, encoding = base64.b64encode(value).decode("ascii"), "base64"
    letter = DeadLetter(
        reason=reason,
        source_topic=record.topic,
        source_partition=record.partition,
        source_offset=record.offset,
        payload=payload,
        payload_encoding=encoding,
        at=utcnow(),
    )
    return (topics.dead_letter, key, letter.to_bytes())


# A record set aside on the dead-letter topic instead, with the reason.
SetAside = tuple[ConsumerRecord, str]

# Sends records, returning the error of each the broker did not take (by index).
SendEach = Callable[[list[OutRecord]], Awaitable[dict[int, BaseException]]]

# Records a dead letter names, when many of one source are refused.
_NAMED_AT_MOST = 10


async def set_aside_too_large(
    send: SendEach,
    topics: Topics,
    out: list[OutRecord],
    sources: list[ConsumerRecord],
    failed: dict[int, BaseException],
    set_aside: list[SetAside],
    replaced: set[int] | None = None,
) -> dict[int, BaseException]:
    """Of the records of ``out`` (``sources[i]`` is the record ``out[i]`` came from) a
    packed send failed on (by index), send those refused for their size alone, then,
    refused again, replace them by a dead letter of their source (noted in ``set_aside``;
    their indices added to ``replaced``), and that one, refused too, by one without the
    payload. Returns the failures left.

    A record of ``out`` that is a dead letter already is not noted again; its copy without
    the payload keeps its reason.

    A source whose records are refused together gets one dead letter naming them all: a
    delivery's attempt and retry, an event's deliveries to several webhooks, are one record
    to look into and to replay. Every source takes its next step at the same time as the
    others: a caller holding many of them (a retry timer, its turn locked, a hand-over
    waiting for the turn) does so in three rounds, not three per record."""
    left = {index: error for index, error in failed.items() if not too_large(error)}
    big = [index for index, error in failed.items() if too_large(error)]
    # Alone first: only the batch they were packed in may have been too large.
    answers = await asyncio.gather(*(send([out[index]]) for index in big))
    refused_alone: dict[int, BaseException] = {}
    for index, refusals in zip(big, answers, strict=True):
        [*refused] = refusals.values()
        if refused and too_large(refused[0]):
            refused_alone[index] = refused[0]
        elif refused:
            left[index] = refused[0]
    by_source: dict[tuple[str, int, int], list[int]] = {}
    for index in refused_alone:
        source = sources[index]
        by_source.setdefault((source.topic, source.partition, source.offset), []).append(index)
    steps = {
        tuple(indices): _stand_ins(
            topics,
            [(out[index], refused_alone[index]) for index in indices],
            sources[indices[0]],
        )
        for indices in by_source.values()
    }
    while steps:
        trying = [(group, stand_ins.pop(0)) for group, stand_ins in steps.items()]
        answers = await asyncio.gather(*(send([record]) for _, (record, _) in trying))
        for (group, (_, note)), refusals in zip(trying, answers, strict=True):
            [*refused] = refusals.values()
            if not refused:
                if note is not None:
                    set_aside.append((sources[group[0]], note))
                if replaced is not None:
                    replaced.update(group)
            elif not too_large(refused[0]):
                left.update(dict.fromkeys(group, refused[0]))
            elif steps[group]:
                continue
            else:
                # Not even a dead letter without its payload: the topic itself is wrong,
                # which the operator must mend; the records wait for it.
                left.update({index: failed[index] for index in group})
            del steps[group]
    return left


def _stand_ins(
    topics: Topics,
    refused: list[tuple[OutRecord, BaseException]],
    source: ConsumerRecord,
) -> list[tuple[OutRecord, str | None]]:
    """What to send in turn for a source whose ``refused`` records the broker will not
    take even alone, each with the reason the source is noted as set aside (None: not a
    new dead letter)."""
    # A dead letter already is counted as one; its stand-in without the payload is not a
    # second.
    noted: str | None = None
    named = [
        f"{_for_key(key)} on {topic}"
        for (topic, key, _), _ in refused
        if topic != topics.dead_letter
    ]
    stand_ins: list[tuple[OutRecord, str | None]] = []
    error = refused[0][1]
    if named:
        # An event of a team with a thousand webhooks would name them all in 55 KB.
        listed = ",".join(named[:_NAMED_AT_MOST])
        if len(named) > _NAMED_AT_MOST:
            listed += f" and {len(named) - _NAMED_AT_MOST} more"
        noted = (
            f"its record{named[0]} is refused by the broker: {error}"
            if len(named) == 1
            else f"its records{listed} are refused by the broker: {error}"
        )
        stand_ins.append((dead_letter_record(topics, source, noted), noted))
        bare_reason = f"{noted} (payload left out)"
    else:
        # Why the record is a dead letter at all is what its reader needs most: an
        # operator looking at a bare letter has nothing else to go on.
        reason = _reason_of(refused[0][0][2])
        bare_reason = f"{reason} (payload left out: the broker refused it: {error})"
    stand_ins.append((dead_letter_record(topics, source, bare_reason, with_payload=False), noted))
    return stand_ins


def _reason_of(dead_letter: bytes | None) -> str:
    try:
        return str(orjson.loads(dead_letter or b"")["reason"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return "its dead letter is refused by the broker"


def _for_key(key: bytes | None) -> str:
    return "" if key is None else f" for {key.decode(errors='replace')}"
