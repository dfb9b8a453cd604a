"""Per-endpoint lanes over one consumer: no endpoint holds up another.

Fetched records wait as raw bytes in their webhook's lane (a queued HTTP request costs ~15
times a raw record), at most ``backlog_max`` in all (and ``backlog_max_bytes`` of them),
split evenly between the partitions;
each lane starts at most ``per_lane`` at a time, in arrival order, and optionally no faster
than ``rate`` per second. A lane's slot is held while the endpoint is being called, not
while the outcome is written to Kafka, so the broker's acknowledgement time does not cap an
endpoint's throughput. A record is finished only once its outcome is durable; offsets are
committed up to the lowest unfinished one per partition.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from services.shared import (
    FATAL_KAFKA_ERRORS,
    OutRecord,
    cancel_and_wait,
    commit_offsets,
    error_text,
    get_logger,
)

from .errors import Withdrawn
from .flow import FetchGate, in_records, record_bytes
from .offsets import AssignmentWatch, OffsetTracker
from .retry_timer import Waiting

_SWEEP_SECONDS = 5.0
_COMMIT_INTERVAL_SECONDS = 0.1
# Of a hand-over's time, what is kept at least for its commit (a commit takes
# milliseconds; a quarter of the 2.4 s default leaves it 0.6 s on a busy broker).
_HAND_OVER_COMMIT_SHARE = 0.25
_FETCH_RETRY_SECONDS = 1.0
_FETCH_RECORDS = 500
# The longest interval a webhook's own rate limit asks for (its floor is 0.1 a second).
_WEBHOOK_INTERVAL_MAX = 10.0

# Calls the endpoint and says what to write; the write makes the outcome durable.
# Waits for the endpoint's next rate slot, at the endpoint's own rate (deliveries a second)
# or, given None, the default; an attempt calls it just before it sends, so a delivery
# skipped or deferred without a request spends no slot. False: the endpoint changed during
# the wait (``Lanes.wake``), and the slot is given up; ask again with its current rate.
Pace = Callable[[float | None], Awaitable[bool]]
Attempt = Callable[[ConsumerRecord, Pace], Awaitable[list[OutRecord]]]
Publish = Callable[[ConsumerRecord, list[OutRecord]], Awaitable[None]]
# Reads what the last owner of the partitions just gained left behind; returns, per gained
# partition, per webhook (key), the offset of the last put-off first attempt already
# forwarded back to the partition and not yet sent (decision 61).
_Ahead = Mapping[TopicPartition, Mapping[bytes, int]]
TakeOver = Callable[[set[TopicPartition]], Coroutine[Any, Any, _Ahead]]


def _place(record: ConsumerRecord) -> tuple[int, int]:
    return record.partition, record.offset


def _put_off(record: ConsumerRecord) -> bool:
    """A record back from a retry topic (a put-off first attempt or a retry): it carries
    its wake time. A newly routed delivery has none. (Parsed: an event's own data may
    hold the words; only records of a partition just taken over are asked.)"""
    return b'"not_before"' in (record.value or b"") and Waiting.of(record).due_us != 0


@dataclass
class _Lane:
    waiting: deque[ConsumerRecord] = field(default_factory=deque)
    # New first attempts routed before a put-off of this webhook that the partition's last
    # owner had forwarded back and not yet sent: they wait until it has started.
    set_aside: deque[ConsumerRecord] = field(default_factory=deque)
    running: int = 0
    next_slot: float = 0.0
    # The last slot a delivery was sent in: slots handed out anew after a change start
    # from it, at the new rate.
    last_slot: float = float("-inf")
    # When the last of its deliveries was let go to send: the rate holds between requests
    # even when a wait for a sending slot bunched them.
    last_sent: float = float("-inf")
    # After a change: the lane is kept until then, however idle, so that the next
    # delivery is still spaced from the last one at whatever rate it asks.
    kept_until: float = 0.0
    # The partition its records come from (a webhook's deliveries share one).
    partition: TopicPartition | None = None
    # Set to wake the deliveries waiting for a slot (a rebalance, a stop, a change to the
    # endpoint); made when one waits, and a fresh one for the waits that follow.
    woken: asyncio.Event | None = None

    def wake(self) -> None:
        if self.woken is not None:
            self.woken.set()
            self.woken = None


# Files kept for what is not a delivery: Kafka's and the database's connections, the
# listener and the log.
_FILES_KEPT = 256


def sending_slots(open_files: int | None) -> int | None:
    """How many requests the process may have out at once, for its limit on open files
    (None: no limit). A request holds a socket; the other half of what is left is for the
    keep-alive sockets idle in the pool after them (kept 15 s each; the connector closes
    a released one beyond that bound)."""
    if open_files is None:
        return None
    return max(16, (open_files - _FILES_KEPT) // 2)


class Lanes:
    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        attempt: Attempt,
        publish: Publish,
        *,
        per_lane: int,
        backlog_max: int,
        backlog_max_bytes: int | None = None,
        rate: float | None = None,
        sending_max: int | None = None,
        on_commit: Callable[[], None] | None = None,
        on_lost: Callable[[set[TopicPartition]], None] | None = None,
        on_gained: TakeOver | None = None,
    ) -> None:
        self._consumer = consumer
        self._attempt = attempt
        self._publish = publish
        self._per_lane = per_lane
        self._backlog_max = backlog_max
        self._backlog_max_bytes = backlog_max_bytes
        self._interval = 1.0 / rate if rate else 0.0
        # Across every lane: each request holds a socket, a file of the process's limited
        # number (Kafka's and the database's connections are files too). None: no bound.
        self._sending_max = sending_max
        self._sending = 0
        # Deliveries due to send, waiting for a slot, first come first served: a slot freed
        # passes to the first of them (True), or all are woken to give up (False).
        self._slot_waiters: deque[asyncio.Future[bool]] = deque()
        self._on_commit = on_commit
        self._on_lost = on_lost
        self._on_gained = on_gained
        self._owned: set[TopicPartition] = set()
        # How many times each partition was lost: a delivery that began before its
        # partition moved must not send, or write what it would have, after (its new
        # owner does).
        self._moves: dict[TopicPartition, int] = {}
        # Partitions just gained whose last owner's state is being read (``on_gained``):
        # they are not fetched meanwhile, and the records a fetch had already brought
        # wait here, in order, unhandled.
        self._taking_over: dict[TopicPartition, asyncio.Task[_Ahead]] = {}
        # Every take-over read still running, also those of partitions lost meanwhile.
        self._take_overs: set[asyncio.Task[_Ahead]] = set()
        self._parked: dict[TopicPartition, list[ConsumerRecord]] = {}
        # Per partition taken over, per webhook: the offset of the last put-off forwarded
        # back ahead of which its new first attempts wait (set aside in their lane).
        self._put_offs_ahead: dict[TopicPartition, dict[bytes, int]] = {}
        # Those whose put-off (or a later record of the webhook) has reached its lane.
        self._put_offs_reached: set[tuple[TopicPartition, bytes]] = set()
        self._lanes: dict[bytes, _Lane] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Per partition: deliveries out of their lane whose outcome is being written; they
        # free room in the backlog once written, as those being sent do.
        self._writing: Counter[TopicPartition] = Counter()
        self._tracker = OffsetTracker()
        self._gate = FetchGate(consumer)
        self._stopping = False
        # From the moment a rebalance begins until its new assignment is in, no delivery
        # is started or sent: the partitions' next owner starts where this process stops.
        self._handing_over = False
        self._reassigned = False
        self._assignments = AssignmentWatch(consumer)
        self._swept_at = 0.0
        self._committed_at = 0.0
        self._log = get_logger("dispatcher")

    @property
    def backlog(self) -> int:
        return len(self._tracker)

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            for task in self._take_overs:
                task.cancel()

    async def _run(self) -> None:
        while not self._stopping:
            self._release_taken_over()
            fetch_size = min(_FETCH_RECORDS, self._apply_backpressure())
            try:
                batches = await self._consumer.getmany(timeout_ms=200, max_records=fetch_size)
            except FATAL_KAFKA_ERRORS:
                raise
            except KafkaError as exc:
                # Nothing was taken: the turn goes on, so that a rebalance that ended is
                # still seen and the lanes resume while fetches fail.
                self._log.warning("delivery_fetch_failed", error=error_text(exc))
                await asyncio.sleep(_FETCH_RETRY_SECONDS)
                batches = {}
            # A partition moved away and back since the last turn counts as lost here,
            # and as gained just below: read from its commit point, its put-offs read back.
            kept = self._assignments.look()
            lost = self._tracker.retain(kept) | (self._owned - kept)
            if lost:
                self._owned -= lost
                self._drop_waiting(lost)
                if self._on_lost is not None:
                    self._on_lost(lost)
            self._take_over_gained()
            self._resume_after_rebalance()
            for partition, records in batches.items():
                parked = self._parked.get(partition)
                for record in records:
                    # After a rebalance that gave a partition back, it is read again from
                    # the last commit; what already waits or was delivered is not taken twice.
                    if self._tracker.seen(partition, record.offset):
                        continue
                    self._tracker.add(partition, record.offset, record_bytes(record))
                    if parked is not None:
                        parked.append(record)
                    else:
                        self._enqueue(record)
            self._let_go_of_set_aside()
            self._forget_idle_lanes()
            # Under load the loop turns per fetched batch; a commit (a broker round trip)
            # each time would cost more than the deliveries it records.
            now = asyncio.get_running_loop().time()
            if now - self._committed_at >= _COMMIT_INTERVAL_SECONDS:
                self._committed_at = now
                await self.commit()

    def _enqueue(self, record: ConsumerRecord) -> None:
        key = record.key or b""
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane()
        lane.partition = TopicPartition(record.topic, record.partition)
        if self._put_offs_ahead and self._behind_put_offs(key, record):
            lane.set_aside.append(record)
            return
        lane.waiting.append(record)
        self._pump(key)

    def _last_put_off(self, key: bytes, record: ConsumerRecord) -> int | None:
        """The offset of the last put-off forwarded back that the webhook's new first
        attempts in ``record``'s partition wait for, if any."""
        ahead = self._put_offs_ahead.get(TopicPartition(record.topic, record.partition))
        return None if ahead is None else ahead.get(key)

    def _behind_put_offs(self, key: bytes, record: ConsumerRecord) -> bool:
        """A new first attempt ahead, in its partition, of a put-off of its webhook that
        the partition's last owner forwarded back: it must start after that put-off, as
        it would have there (the last owner held it behind the put-off)."""
        last = self._last_put_off(key, record)
        if last is None:
            return False
        if record.offset >= last:
            self._put_offs_reached.add((TopicPartition(record.topic, record.partition), key))
            return False
        return not _put_off(record)

    def _passes_put_offs(self, key: bytes, record: ConsumerRecord) -> bool:
        """Whether starting ``record`` passes the last put-off its lane's set-aside first
        attempts wait for (which is then forgotten)."""
        last = self._last_put_off(key, record)
        if last is None or record.offset < last:
            return False
        partition = TopicPartition(record.topic, record.partition)
        ahead = self._put_offs_ahead[partition]
        del ahead[key]
        self._put_offs_reached.discard((partition, key))
        if not ahead:
            del self._put_offs_ahead[partition]
        return True

    def _let_go_of_set_aside(self) -> None:
        """Records set aside go without their put-off when it cannot come: their
        partition is paused holding its share of the backlog (or the backlog is full)
        with nothing else of it waiting or being sent, so nothing will free room for the
        put-off to be fetched; or the partition was read past the put-off's offset
        without it (no longer in the log). They are merged by offset with what waits. A
        put-off that reached its lane releases them when it starts."""
        if not self._put_offs_ahead:
            return
        counts = self._waiting()
        share = max(1, self._backlog_max // max(1, len(self._consumer.assignment())))
        moving = {
            each.partition
            for each in self._lanes.values()
            if each.partition is not None and (each.waiting or each.running)
        }
        moving.update(self._writing)
        # The whole backlog full: room comes back only if some partition still moves.
        stalled = sum(counts.values()) >= self._backlog_max and not moving
        for partition, ahead in list(self._put_offs_ahead.items()):
            stuck = stalled or (counts.get(partition, 0) >= share and partition not in moving)
            read_upto = self._tracker.read_upto(partition)
            given_up = 0
            for key, last in list(ahead.items()):
                if (partition, key) in self._put_offs_reached:
                    continue
                lane = self._lanes.get(key)
                waiting = lane is not None and bool(lane.set_aside)
                if not (read_upto > last or (stuck and waiting)):
                    continue
                del ahead[key]
                if lane is not None and lane.set_aside:
                    given_up += 1
                    lane.waiting = deque(sorted([*lane.waiting, *lane.set_aside], key=_place))
                    lane.set_aside.clear()
                    self._pump(key)
            if given_up:
                self._log.warning(
                    "put_off_order_given_up", partition=partition.partition, webhooks=given_up
                )
            if not ahead:
                del self._put_offs_ahead[partition]

    def _take_over_gained(self) -> None:
        """Start reading what the last owner of each partition just gained knew about it
        (``on_gained``), in the background: the partitions owned already go on meanwhile,
        and the gained ones wait until it is read, so it orders their first record."""
        assigned = self._consumer.assignment()
        gained = assigned - self._owned
        self._owned = set(assigned)
        if not gained or self._on_gained is None:
            return
        task = asyncio.create_task(self._on_gained(gained), name="take-over")
        self._take_overs.add(task)
        task.add_done_callback(self._take_overs.discard)
        for partition in gained:
            self._taking_over[partition] = task
            self._parked[partition] = []

    def _release_taken_over(self) -> None:
        for partition, task in list(self._taking_over.items()):
            if task.done():
                if not task.cancelled() and task.exception() is not None:
                    # The partition is delivered all the same, as before any was read.
                    self._log.error("take_over_failed", error=repr(task.exception()))
                elif not task.cancelled():
                    ahead = (task.result() or {}).get(partition)
                    if ahead:
                        self._put_offs_ahead[partition] = dict(ahead)
                del self._taking_over[partition]
                for record in self._parked.pop(partition, []):
                    self._enqueue(record)

    def _drop_waiting(self, partitions: set[TopicPartition]) -> None:
        # Their new owner delivers them; sending them here as well would only duplicate.
        for partition in partitions:
            self._moves[partition] = self._moves.get(partition, 0) + 1
            self._parked.pop(partition, None)
            self._taking_over.pop(partition, None)
            self._put_offs_ahead.pop(partition, None)
            self._put_offs_reached = {r for r in self._put_offs_reached if r[0] != partition}
        for lane in self._lanes.values():
            lane.waiting = deque(
                r for r in lane.waiting if TopicPartition(r.topic, r.partition) not in partitions
            )
            lane.set_aside = deque(
                r for r in lane.set_aside if TopicPartition(r.topic, r.partition) not in partitions
            )

    def _apply_backpressure(self) -> int:
        # Each partition gets its share of the backlog: an endpoint slow enough to fill its
        # partition's share stops fetching that partition only, not every webhook's.
        return self._gate.hold_shares(
            self._waiting(), self._backlog_max, also=set(self._taking_over)
        )

    def _waiting(self) -> dict[TopicPartition, int]:
        return in_records(
            self._tracker.open_counts(),
            self._tracker.open_bytes(),
            self._backlog_max,
            self._backlog_max_bytes,
        )

    def _pump(self, key: bytes) -> None:
        lane = self._lanes[key]
        while (
            lane.running < self._per_lane
            and lane.waiting
            and not self._stopping
            and not self._handing_over
        ):
            record = lane.waiting.popleft()
            if self._put_offs_ahead and self._passes_put_offs(key, record):
                # The last put-off ahead of them has started: they go next, in order.
                lane.waiting.extendleft(reversed(lane.set_aside))
                lane.set_aside.clear()
            lane.running += 1
            # Counted now, not when the task first runs: a partition dropped in between
            # (in this same turn of the loop) has moved under it.
            moves = self._moves.get(TopicPartition(record.topic, record.partition), 0)
            task = asyncio.create_task(self._run_one(key, lane, record, moves))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run_one(self, key: bytes, lane: _Lane, record: ConsumerRecord, moves: int) -> None:
        partition = TopicPartition(record.topic, record.partition)
        sending = False
        # One of the process's sending slots, taken when the delivery is due to send.
        holds_slot = False

        def moved() -> bool:
            # Lost since this delivery began (a wait for the database can outlast the
            # rebalance's bound): its partition's new owner has it.
            return self._moves.get(partition, 0) != moves

        async def pace(rate: float | None) -> bool:
            nonlocal sending, holds_slot
            interval = 1.0 / rate if rate else self._interval
            if interval:
                now = asyncio.get_running_loop().time()
                slot = max(
                    now, lane.next_slot, lane.last_slot + interval, lane.last_sent + interval
                )
                lane.next_slot = slot + interval
                woken = lane.woken = lane.woken or asyncio.Event()
                if slot > now and not (self._handing_over or self._stopping):
                    # The slot may be seconds away, and a rebalance, a stop or a new rate
                    # wakes it.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(woken.wait(), slot - now)
                if self._handing_over or self._stopping:
                    # Unused, the slot is the next one's again.
                    lane.next_slot = min(lane.next_slot, slot)
                elif woken.is_set():
                    return False
                else:
                    lane.last_slot = slot
            if not holds_slot:
                # After the rate's wait: a delivery waiting for its slot holds no socket.
                waited = await self._sending_slot()
                holds_slot = True
                loop_time = asyncio.get_running_loop().time()
                if (
                    waited
                    and interval
                    and loop_time < lane.last_sent + interval
                    and not (self._handing_over or self._stopping)
                ):
                    # Sending slots freed together would send the lane's deliveries that
                    # waited for them at once: the rate holds between the requests
                    # themselves, so this one takes a new rate slot (its caller asks again).
                    self._free_sending_slot()
                    holds_slot = False
                    return False
            if self._handing_over or self._stopping or moved():
                raise Withdrawn("the partition may be about to move, or the process to stop")
            lane.last_sent = asyncio.get_running_loop().time()
            sending = True
            return True

        try:
            outcome = await self._attempt(record, pace)
        except asyncio.CancelledError:
            if holds_slot:
                self._free_sending_slot()
            raise
        except Withdrawn:
            if holds_slot:
                self._free_sending_slot()
            # Unfinished, back in its place: sent here once the rebalance leaves the
            # partition here, else by its next owner.
            if not moved():
                lane.waiting = deque(sorted([record, *lane.waiting], key=_place))
            self._release(key, lane)
            return
        except Exception:
            if holds_slot:
                self._free_sending_slot()
            # A bug, not bad input (handlers dead-letter that): keep the record unfinished
            # so it is read again after a restart, and let the lane go on.
            self._log.exception("delivery_handler_failed", offset=record.offset)
            self._release(key, lane)
            return
        if holds_slot:
            self._free_sending_slot()
        self._release(key, lane)
        if moved() and not sending:
            # Nothing was sent: what it would write (put off, deferred, skipped) is its
            # partition's new owner's to decide.
            return
        partition = TopicPartition(record.topic, record.partition)
        self._writing[partition] += 1
        try:
            await self._publish(record, outcome)
        except Exception as exc:
            # Only when stopping (the sender has closed): the record stays unfinished and
            # the partition's next reader sends it again.
            self._log.warning(
                "delivery_outcome_not_written", offset=record.offset, error=error_text(exc)
            )
            return
        finally:
            self._writing[partition] -= 1
            if not self._writing[partition]:
                del self._writing[partition]
        self._tracker.done(partition, record.offset)

    async def _sending_slot(self) -> bool:
        """Take one of the process's sending slots, waiting (none of the attempt's timeout
        spent) while all are held; whether it waited. Woken by a rebalance or a stop, it
        counts as taken anyway, for its caller to give back as it withdraws."""
        if self._sending_max is None or (
            self._sending < self._sending_max and not self._slot_waiters
        ):
            self._sending += 1
            return False
        waiter = asyncio.get_running_loop().create_future()
        self._slot_waiters.append(waiter)
        try:
            handed_over = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result():
                self._free_sending_slot()
            raise
        if not handed_over:
            self._sending += 1
        return True

    def _free_sending_slot(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(True)  # the slot passes to it, still counted
                return
        self._sending -= 1

    def _release(self, key: bytes, lane: _Lane) -> None:
        lane.running -= 1
        if lane.waiting:
            self._pump(key)
        elif self._idle(lane, asyncio.get_running_loop().time()) and self._lanes.get(key) is lane:
            del self._lanes[key]

    @staticmethod
    def _idle(lane: _Lane, now: float) -> bool:
        # A rate-limited lane is kept until its next slot has come, so a delivery arriving
        # to an empty lane still waits its turn.
        return (
            lane.running == 0
            and not lane.waiting
            and not lane.set_aside
            and lane.next_slot <= now
            and lane.kept_until <= now
        )

    def _forget_idle_lanes(self) -> None:
        now = asyncio.get_running_loop().time()
        if now - self._swept_at >= _SWEEP_SECONDS:
            self._swept_at = now
            for key in [k for k, lane in self._lanes.items() if self._idle(lane, now)]:
                del self._lanes[key]

    def wake(self, key: bytes) -> None:
        """The endpoint of lane ``key`` changed: its deliveries waiting for a rate slot
        give it up and ask again, at its rate now. A slot handed out at a rate since
        lowered (or at a limit since lifted) is not kept, nor is one for a webhook since
        deactivated."""
        lane = self._lanes.get(key)
        if lane is not None:
            # The slots handed out at the old rate are given up; the lane stays while the
            # slowest rate could still space the next delivery from the last one sent.
            lane.kept_until = lane.last_slot + max(_WEBHOOK_INTERVAL_MAX, self._interval)
            lane.next_slot = 0.0
            lane.wake()

    def _wake_everyone(self) -> None:
        for lane in self._lanes.values():
            lane.wake()
        waiting, self._slot_waiters = self._slot_waiters, deque()
        for waiter in waiting:
            if not waiter.done():
                waiter.set_result(False)

    def lag(self) -> dict[TopicPartition, int]:
        """Per owned partition: records in the log not yet finished here."""
        return self._tracker.lag(self._consumer)

    async def commit(self) -> None:
        # Not a partition that may have had another owner since the loop last looked:
        # this process's point for it may be behind that owner's.
        assigned = self._assignments.owned()
        points = {p: o for p, o in self._tracker.to_commit().items() if p in assigned}
        if points and await commit_offsets(self._consumer, points):
            self._tracker.committed(points)
        if self._on_commit is not None:
            self._on_commit()

    async def hand_over(self, within: float) -> None:
        """Before a rebalance moves partitions: start and send no more deliveries until
        the new assignment is in, let those being sent finish, and commit, all within
        ``within`` seconds. Their next owner then starts where this process stopped,
        rather than sending them again, and sees the first attempts they put off
        (decision 55)."""
        self._handing_over = True
        self._wake_everyone()
        # Only the assignment that ends this rebalance resumes the lanes, not one the loop
        # has not yet seen from a rebalance before it.
        self._reassigned = False
        loop = asyncio.get_running_loop()
        ends = loop.time() + within
        running = set(self._tasks)
        if running:
            # Only the wait is cut short: what has finished is committed whatever is still
            # being sent (a slow endpoint is nearly always in flight somewhere), or the
            # next owners would send again everything finished since the last commit.
            _, late = await asyncio.wait(running, timeout=within * (1 - _HAND_OVER_COMMIT_SHARE))
            if late:
                self._log.warning("hand_over_cut_short", still_sending=len(late))
        with contextlib.suppress(TimeoutError):
            # Whatever is left of the bound, at least its share.
            async with asyncio.timeout_at(ends):
                await self.commit()

    def reassigned(self) -> None:
        """The rebalance is over: the loop resumes the lanes once it has dropped the
        records of the partitions that moved."""
        self._reassigned = True
        self._assignments.reassigned()

    def _resume_after_rebalance(self) -> None:
        if not self._reassigned:
            return
        self._reassigned = False
        self._handing_over = False
        for key in list(self._lanes):
            if key in self._lanes:
                self._pump(key)

    def stop_starting(self) -> None:
        """Start no more deliveries (a stop began): the loops' cancelling before the drain
        would otherwise let every delivery that finishes meanwhile start the next, each
        with a whole grace of its own."""
        self._stopping = True
        self._wake_everyone()

    async def drain(self, grace_seconds: float) -> None:
        """Stop starting deliveries, let those in flight finish, commit what finished.

        One still waiting for its rate slot is not sent: the slot may be further off than
        the grace, and it is left uncommitted for the next process to send."""
        self.stop_starting()
        for reading in set(self._take_overs):
            await cancel_and_wait(reading)
        running = set(self._tasks)
        if running:
            _, late = await asyncio.wait(running, timeout=grace_seconds)
            for task in late:
                await cancel_and_wait(task)
        await self.commit()
