"""Retry delays, Retry-After, the circuit breaker and commit points, without a clock."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest
from aiokafka import ConsumerRecord, TopicPartition

from services.dispatcher.offsets import OffsetTracker
from services.dispatcher.policy import CircuitBreaker, RetryPolicy, parse_retry_after
from services.dispatcher.retry_timer import Waiting, to_move
from services.shared import Delivery

NOW = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)
POLICY = RetryPolicy(schedule=(5, 300, 1800), jitter=0.2, retry_after_max=3600)


def test_delays_follow_the_schedule_within_the_jitter() -> None:
    rng = random.Random(7)
    for attempt, base in ((1, 5), (2, 300), (3, 1800)):
        delays = [POLICY.delay_after(attempt, rng) for _ in range(200)]
        assert all(d is not None and base * 0.8 <= d <= base * 1.2 for d in delays)
        assert len({round(d or 0, 6) for d in delays}) > 100, "jitter spreads the delays"
    assert POLICY.delay_after(4, rng) is None, "after the last scheduled retry: dead letter"
    assert POLICY.max_attempts == 4


def test_retry_after_is_a_bounded_floor() -> None:
    rng = random.Random(1)
    assert (POLICY.delay_after(1, rng, retry_after=120) or 0) == 120
    assert (POLICY.delay_after(1, rng, retry_after=10**9) or 0) == 3600
    assert 240 <= (POLICY.delay_after(2, rng, retry_after=1) or 0) <= 360


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("Mon, 23 Nov 2026 12:01:00 GMT", 60.0),
        ("Mon, 23 Nov 2026 11:00:00 GMT", 0.0),
        ("soon", None),
        ("-5", None),
        ("1 Jan 99999999999 00:00 GMT", None),
        ("1 Jan 2030 99999999999:00 GMT", None),
        ("99999999999999999999 Jan 2030 00:00 GMT", None),
        ("1 Jan 2030 00:00 +9999999999999999999999", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_header_forms(header: str | None, seconds: float | None) -> None:
    assert parse_retry_after(header, NOW) == seconds


def test_tiers_cap_at_the_last_retry_topic() -> None:
    assert [RetryPolicy.tier(n) for n in (1, 2, 7, 8, 20)] == [1, 2, 7, 7, 7]


def test_circuit_opens_after_the_threshold_and_one_probe_closes_it() -> None:
    circuit = CircuitBreaker(threshold=3, open_for=30)
    for t in range(3):
        assert circuit.allows("wh", t)
        circuit.record("wh", success=False, now=t)
    assert circuit.open_count(10) == 1
    assert not circuit.allows("wh", 10), "open: deferred without calling"
    assert circuit.reopens_at("wh") == 32
    assert circuit.allows("wh", 33), "half-open: one probe"
    assert not circuit.allows("wh", 33), "only one probe at a time"
    assert circuit.reopens_at("wh") == 63, "those behind the probe wait, not circle"
    circuit.record("wh", success=False, now=34)
    assert not circuit.allows("wh", 93), "a failed probe opens it again, for twice as long"
    assert circuit.allows("wh", 95)
    circuit.record("wh", success=True, now=95)
    assert circuit.open_count(95) == 0
    assert circuit.allows("wh", 96)
    assert circuit.allows("other", 0), "endpoints are independent"


def test_commit_point_is_the_lowest_unfinished_offset() -> None:
    tracker = OffsetTracker()
    tp = TopicPartition("deliveries", 0)
    for offset in range(10, 15):
        tracker.add(tp, offset)
    assert tracker.to_commit() == {tp: 10}
    tracker.committed({tp: 10})
    tracker.done(tp, 12)
    tracker.done(tp, 13)
    assert tracker.to_commit() == {}, "offset 10 still unfinished: nothing moves"
    tracker.done(tp, 10)
    assert tracker.to_commit() == {tp: 11}
    tracker.done(tp, 11)
    tracker.done(tp, 14)
    assert tracker.to_commit() == {tp: 15}
    assert len(tracker) == 0


def _waiting(
    offset: int, due_us: int, *, key: bytes = b"wh", first_attempt: bool = False
) -> Waiting:
    return Waiting(due_us, "retry.7", 0, offset, key, b"{}", first_attempt)


def _put_off(offset: int, due_us: int, key: bytes = b"wh") -> Waiting:
    return _waiting(offset, due_us, key=key, first_attempt=True)


FAR, SOON = 10_000, 10


def test_a_far_off_retry_behind_forwarded_ones_moves() -> None:
    # 0 waits far off; 1 and 2 were forwarded; 3 waits.
    waiting = [_waiting(0, FAR + 1), _waiting(3, FAR + 1)]
    assert [w.offset for w in to_move(waiting, forwarded_upto=2, far_us=FAR)] == [0]


def test_what_moves_must_pass_as_many_forwarded_records() -> None:
    # 0, 1 and 3 wait far off; only 2 was forwarded: two writes to pass one record.
    waiting = [_waiting(0, FAR + 1), _waiting(1, FAR + 1), _waiting(3, FAR + 1)]
    assert to_move(waiting, forwarded_upto=2, far_us=FAR) == []
    # 0 and 2 wait far off among 1, 3 and 4, forwarded: two writes pass three records.
    waiting = [_waiting(0, FAR + 1), _waiting(2, FAR + 1), _waiting(5, FAR + 1)]
    assert [w.offset for w in to_move(waiting, forwarded_upto=4, far_us=FAR)] == [0, 2]


def test_a_record_due_soon_or_without_a_key_stays() -> None:
    forwarded_behind = [_waiting(1, SOON)]
    assert to_move(forwarded_behind, forwarded_upto=3, far_us=FAR) == []
    keyless = [Waiting(FAR + 1, "retry.7", 0, 1, None, b"{}", False)]
    assert to_move(keyless, forwarded_upto=3, far_us=FAR) == []
    # A retry below one that stays moves only if that passes enough.
    both = [_waiting(0, FAR + 1), _waiting(2, SOON)]
    assert [w.offset for w in to_move(both, forwarded_upto=3, far_us=FAR)] == [0]
    both = [_waiting(0, FAR + 1), _waiting(1, SOON)]
    assert to_move(both, forwarded_upto=3, far_us=FAR) == [], "nothing forwarded is passed"


def test_a_webhooks_put_off_first_attempts_move_together_in_the_order_they_wake() -> None:
    # wh_a's first attempts at 0 and 2 wake a microsecond apart; 1 and 3 were forwarded.
    waiting = [_put_off(0, FAR + 1, b"wh_a"), _put_off(2, FAR + 2, b"wh_a")]
    assert [w.offset for w in to_move(waiting, forwarded_upto=3, far_us=FAR)] == [0, 2]
    # One above the last forwarded record goes along, so the commit point passes them all.
    waiting = [_put_off(0, FAR + 1, b"wh_a"), _put_off(3, FAR + 2, b"wh_a")]
    assert [w.offset for w in to_move(waiting, forwarded_upto=2, far_us=FAR)] == [0, 3]
    # Two writes to pass the one forwarded record at 1: none.
    waiting = [_put_off(0, FAR + 1, b"wh_a"), _put_off(2, FAR + 2, b"wh_a")]
    assert to_move(waiting, forwarded_upto=1, far_us=FAR) == []
    # Written in the order they wake, whatever their offsets.
    swapped = [_put_off(0, FAR + 2, b"wh_a"), _put_off(1, FAR + 1, b"wh_a")]
    assert [w.offset for w in to_move(swapped, forwarded_upto=5, far_us=FAR)] == [1, 0]


def test_a_put_off_group_stays_whole_unless_the_commit_point_passes_it() -> None:
    # wh_a's 4 wakes soon, so its 0 stays too, and wh_b's retry at 1 would pass nothing.
    waiting = [
        _put_off(0, FAR + 1, b"wh_a"),
        _waiting(1, FAR + 1, key=b"wh_b"),
        _put_off(4, SOON, b"wh_a"),
    ]
    assert to_move(waiting, forwarded_upto=3, far_us=FAR) == []
    # Below wh_a's, wh_b's retry moves alone.
    lone = [
        _waiting(0, FAR + 1, key=b"wh_b"),
        _put_off(2, FAR + 1, b"wh_a"),
        _put_off(5, SOON, b"wh_a"),
    ]
    assert [w.offset for w in to_move(lone, forwarded_upto=4, far_us=FAR)] == [0]
    # A retry due soon at 3 stays: wh_a's 4 would be left above the commit point (read
    # again after a restart before 0's copy), so neither moves, nor wh_b's retry behind 0.
    split = [
        _put_off(0, FAR + 1, b"wh_a"),
        _waiting(2, FAR + 1, key=b"wh_b"),
        _waiting(3, SOON, key=b"wh_c"),
        _put_off(4, FAR + 2, b"wh_a"),
    ]
    assert to_move(split, forwarded_upto=5, far_us=FAR) == []
    # With the retry due soon above them, the group is passed whole (the commit point
    # stops at 6).
    passed = [*split[:2], _put_off(3, FAR + 2, b"wh_a"), _waiting(6, SOON, key=b"wh_c")]
    assert [w.offset for w in to_move(passed, forwarded_upto=5, far_us=FAR)] == [0, 2, 3]


def test_dropping_one_group_can_leave_another_above_the_commit_point() -> None:
    # wh_a at 5 and 10, wh_b at 1 and 7, a retry due soon at 8. wh_a is split by 8; once
    # it stays, the commit point stops at 5, which splits wh_b: nothing moves.
    waiting = [
        _put_off(1, FAR + 1, b"wh_b"),
        _put_off(5, FAR + 1, b"wh_a"),
        _put_off(7, FAR + 2, b"wh_b"),
        _waiting(8, SOON, key=b"wh_c"),
        _put_off(10, FAR + 2, b"wh_a"),
    ]
    assert to_move(waiting, forwarded_upto=11, far_us=FAR) == []


def test_put_off_first_attempts_stay_in_a_partition_not_read_to_its_end() -> None:
    waiting = [_put_off(0, FAR + 1), _waiting(1, FAR + 1, key=b"wh_b")]
    assert [w.offset for w in to_move(waiting, forwarded_upto=4, far_us=FAR)] == [0, 1]
    held = to_move(waiting, forwarded_upto=4, far_us=FAR, first_attempts=False)
    assert held == [], "the retry alone would pass nothing: the first attempt stays below"
    retry_first = [_waiting(0, FAR + 1, key=b"wh_b"), _put_off(3, FAR + 1)]
    held = to_move(retry_first, forwarded_upto=2, far_us=FAR, first_attempts=False)
    assert [w.offset for w in held] == [0]


def test_the_last_waiting_retry_moves_past_every_forwarded_one() -> None:
    # 0 waits far off; 1 and 2 were forwarded; nothing else was read.
    assert [w.offset for w in to_move([_waiting(0, FAR + 1)], 2, FAR)] == [0]
    # Only 1 was forwarded past it: one write passes one record.
    assert [w.offset for w in to_move([_waiting(0, FAR + 1)], 1, FAR)] == [0]


def _record(value: bytes, key: bytes | None = b"wh") -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord("retry.1", 0, 7, 0, 0, key, value, None, len(key or b""), len(value), [])


def test_a_waiting_record_knows_its_time_and_whether_it_may_move() -> None:
    due = '"not_before":"2026-11-23T12:00:05.000007+00:00"'
    retry = Waiting.of(_record(f'{{"attempt":2,{due}}}'.encode()))
    assert retry.due_us == int(NOW.timestamp()) * 1_000_000 + 5_000_007
    assert (retry.movable, retry.first_attempt) == (True, False)
    put_off_first = Waiting.of(_record(f'{{"attempt":1,{due}}}'.encode()))
    assert (put_off_first.movable, put_off_first.first_attempt) == (True, True)
    assert not Waiting.of(_record(f'{{"attempt":2,{due}}}'.encode(), key=None)).movable
    unreadable = Waiting.of(_record(b"not json"))
    assert (unreadable.due_us, unreadable.movable) == (0, True), "due now"
    # As pydantic writes it: "Z", and no fraction when there is none.
    written = Delivery.model_validate_json(
        b'{"id":"d","webhook_id":"wh","attempt":2,"not_before":"2026-11-23T12:00:05Z",'
        + b'"event":{"id":"e","type":"object.created","team_id":"t","object_type":"c",'
        + b'"object_id":"o","occurred_at":"2026-11-23T12:00:00Z","data":{}}}'
    ).to_bytes()
    assert Waiting.of(_record(written)).due_us == int(NOW.timestamp()) * 1_000_000 + 5_000_000
    naive = Waiting.of(_record(b'{"attempt":2,"not_before":"2026-11-23T12:00:05"}'))
    assert naive.due_us == 0, "a time without a zone is unreadable: due now"


def test_records_due_within_one_millisecond_wake_in_microsecond_order() -> None:
    first = '{"attempt":1,"not_before":"2026-11-23T12:00:05.000002+00:00"}'
    second = '{"attempt":1,"not_before":"2026-11-23T12:00:05.000003+00:00"}'
    later_offset = Waiting.of(_record(first.encode()))._replace(offset=9)
    earlier_offset = Waiting.of(_record(second.encode()))._replace(offset=1)
    assert sorted([earlier_offset, later_offset]) == [later_offset, earlier_offset]


def test_revoked_partitions_are_forgotten() -> None:
    tracker = OffsetTracker()
    kept, lost = TopicPartition("d", 0), TopicPartition("d", 1)
    tracker.add(kept, 1)
    tracker.add(lost, 1)
    assert tracker.retain([kept]) == {lost}
    assert tracker.to_commit() == {kept: 1}
    assert tracker.point(lost) is None
    assert tracker.retain([kept]) == set()


def test_records_read_again_after_a_rebalance_are_recognised() -> None:
    """A partition handed back is read again from its last commit: what waits and what
    was finished but not yet committed are both known; a forgotten partition is not."""
    tracker = OffsetTracker()
    tp = TopicPartition("d", 0)
    for offset in (5, 6, 7):
        tracker.add(tp, offset)
    tracker.done(tp, 5)
    assert [tracker.seen(tp, o) for o in (5, 6, 7, 8)] == [True, True, True, False]
    tracker.retain([])
    assert not tracker.seen(tp, 5)


def test_redaction_hides_credentials_and_signatures() -> None:
    from services.dispatcher.sender import redacted

    shown = redacted(
        {
            "webhook-signature": "v1,abc",
            "Authorization": "Bearer x",
            "X-Api-Key": "k",
            "X-Session-Token": "t",
            "Cookie": "c",
            "X-Credential": "c",
            "X-Api-Pass": "p",
            "X-Pwd": "p",
            "X-Jwt": "j",
            "X-Tenant": "acme",
            "X-Private": "v",
            "X-Passcode": "v",
            "X-ApiPass": "v",
            "webhook-id": "msg_1",
        }
    )
    assert shown == {
        "webhook-signature": "[redacted]",
        "Authorization": "[redacted]",
        "X-Api-Key": "[redacted]",
        "X-Session-Token": "[redacted]",
        "Cookie": "[redacted]",
        "X-Credential": "[redacted]",
        "X-Api-Pass": "[redacted]",
        "X-Pwd": "[redacted]",
        "X-Jwt": "[redacted]",
        "X-Tenant": "acme",
        "X-Private": "[redacted]",
        "X-Passcode": "[redacted]",
        "X-ApiPass": "[redacted]",
        "webhook-id": "msg_1",
    }


def test_failed_probes_double_the_wait_up_to_the_bound() -> None:
    circuit = CircuitBreaker(threshold=1, open_for=10, open_max=45)
    waits = []
    now = 0.0
    for _ in range(5):
        circuit.record("wh", success=False, now=now)
        waits.append(circuit.reopens_at("wh") - now)
        now = circuit.reopens_at("wh")
        assert circuit.allows("wh", now)
    assert waits == [10, 20, 40, 45, 45]


def test_a_probe_that_never_reports_back_does_not_shut_the_circuit_for_good() -> None:
    circuit = CircuitBreaker(threshold=1, open_for=10)
    circuit.record("wh", success=False, now=0)
    assert circuit.allows("wh", 10), "the probe"
    assert not circuit.allows("wh", 15)
    assert circuit.allows("wh", 20), "its outcome never came: another probe goes"


def test_no_second_probe_goes_while_the_first_may_still_answer() -> None:
    """A delivery timeout longer than the circuit's wait: the probe's turn lasts as long as
    the probe may, not one ``open_for``."""
    circuit = CircuitBreaker(threshold=1, open_for=10, probe_for=61)
    circuit.record("wh", success=False, now=0)
    assert circuit.allows("wh", 10), "the probe"
    assert not circuit.allows("wh", 25), "the probe may still answer"
    assert not circuit.allows("wh", 70)
    assert circuit.allows("wh", 71), "its outcome never came: another probe goes"
    circuit.record("wh", success=False, now=72)
    assert circuit.reopens_at("wh") == 92, "a failed probe's wait is the circuit's own"


def test_requests_in_flight_when_the_circuit_opened_are_not_probes() -> None:
    """Ten requests failing together (the endpoint's concurrency) open the circuit once,
    for ``open_for``; their late outcomes, failed or not, neither stretch nor close it."""
    circuit = CircuitBreaker(threshold=5, open_for=30, open_max=600)
    for _ in range(10):
        circuit.record("wh", success=False, now=5, started=0)
    assert circuit.reopens_at("wh") - 5 == 30
    circuit.record("wh", success=True, now=6, started=1)
    assert not circuit.allows("wh", 7), "a late success of an old request does not close it"
    assert circuit.allows("wh", 35), "the probe"
    circuit.record("wh", success=False, now=36, started=35)
    assert circuit.reopens_at("wh") - 36 == 60, "a failed probe doubles the wait"


def test_a_pause_stops_every_request_until_it_ends_then_lets_all_through() -> None:
    """A Retry-After pauses the endpoint: nothing goes until then, and after it every
    request goes (no probe: the endpoint was busy, not failing). An answer to a request
    sent before the pause does not lift it; one after it clears the endpoint's state."""
    circuit = CircuitBreaker(threshold=3, open_for=30)
    circuit.record("wh", success=False, now=99)
    circuit.pause("wh", now=100, seconds=2)
    assert not circuit.allows("wh", 101, peek=True)
    assert not circuit.allows("wh", 101.9)
    assert circuit.reopens_at("wh") == 102
    assert circuit.open_count(101.9) == 0, "a pause is not an open circuit"
    circuit.record("wh", success=True, now=101, started=99)
    assert not circuit.allows("wh", 101.5), "a late success does not lift the pause"
    assert [circuit.allows("wh", 102) for _ in range(3)] == [True] * 3, "no probe"
    circuit.record("wh", success=True, now=102.5)
    assert circuit.endpoints() == []


def test_a_success_sent_during_a_pause_lifts_it() -> None:
    """A re-send or a test sent after the endpoint asked for quiet, and answered 2xx, shows
    it taking requests again: the pause ends, as an open circuit closes. A success sent
    before a later 429 of the same pause does not lift it."""
    circuit = CircuitBreaker(threshold=3, open_for=30)
    circuit.pause("wh", now=100, seconds=3600)
    circuit.record("wh", success=True, now=200, started=150)
    assert circuit.allows("wh", 201), "lifted"
    assert circuit.endpoints() == []

    circuit.pause("wh", now=300, seconds=3600)
    circuit.pause("wh", now=310, seconds=3600)  # asked again, to a request sent at 305
    circuit.record("wh", success=True, now=320, started=305)
    assert not circuit.allows("wh", 321), "sent before the endpoint last asked: it stands"
    circuit.record("wh", success=True, now=330, started=325)
    assert circuit.allows("wh", 331)


def test_throttled_answers_in_flight_do_not_open_the_circuit() -> None:
    """Ten requests in flight all answered 429 with Retry-After: 2 (past the threshold of
    five): a pause, not five failures, so after two seconds all go again, with no probe."""
    circuit = CircuitBreaker(threshold=5, open_for=30)
    for n in range(10):
        circuit.pause("wh", now=1 + n / 100, seconds=2, started=0)
    assert circuit.open_count(2) == 0
    assert not circuit.allows("wh", 3)
    assert [circuit.allows("wh", 3.1) for _ in range(3)] == [True] * 3


def test_a_probe_answered_with_a_pause_probes_again_when_it_ends() -> None:
    circuit = CircuitBreaker(threshold=1, open_for=10)
    circuit.record("wh", success=False, now=0)
    assert circuit.allows("wh", 10)  # the probe, answered 429 with Retry-After: 60
    circuit.pause("wh", now=11, seconds=60, started=10)
    assert circuit.reopens_at("wh") == 71
    assert not circuit.allows("wh", 30)
    assert circuit.allows("wh", 71)  # the next probe
    assert not circuit.allows("wh", 72), "one probe at a time"


def test_healthy_endpoints_leave_no_state() -> None:
    circuit = CircuitBreaker(threshold=3, open_for=30)
    for n in range(1000):
        circuit.record(f"wh{n}", success=False, now=0)
        circuit.record(f"wh{n}", success=True, now=1)
    assert circuit._endpoints == {}


def test_retry_after_in_other_scripts_digits_is_ignored_not_a_crash() -> None:
    """ "²" passes str.isdigit() and fails float(): it is no delay, not an exception."""
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_retry_after("²", now) is None
    assert parse_retry_after("①", now) is None
    assert parse_retry_after("7", now) == 7.0


def test_a_circuit_whose_wait_is_over_is_not_counted_open_until_its_probe_goes() -> None:
    """An endpoint that gets no more deliveries keeps its state, but is not counted open for
    as long as the process runs; its probe going counts it again while it is out."""
    circuit = CircuitBreaker(threshold=1, open_for=30)
    circuit.record("wh", success=False, now=0)
    assert circuit.open_count(29) == 1
    assert circuit.open_count(31) == 0
    assert circuit.allows("wh", 40), "the probe"
    assert circuit.open_count(41) == 1


def test_a_pause_asked_by_a_re_send_leaves_an_open_circuits_wait() -> None:
    """A re-send or a test answered with a Retry-After pauses the webhook but is no probe:
    the open circuit's wait stands (a probe's answer would end its turn)."""
    circuit = CircuitBreaker(threshold=1, open_for=30)
    circuit.record("wh", success=False, now=0)
    circuit.pause("wh", now=5, seconds=1, started=4, ends_turn=False)
    assert not circuit.allows("wh", 10, peek=True), "still open until 30"
    assert circuit.reopens_at("wh") == 30
    circuit.pause("wh", now=6, seconds=1, started=5)
    assert circuit.reopens_at("wh") == 7, "a probe's answer ends the wait"


def test_a_429_to_a_request_sent_before_the_success_that_lifted_the_pause_is_old_news() -> None:
    """The operator re-sends during a pause and it is delivered: the pause ends. A request
    sent before that re-send, answered 429 only afterwards, must not pause the endpoint
    again; one sent after it may."""
    circuit = CircuitBreaker(threshold=3, open_for=30, probe_for=20)
    circuit.pause("wh", now=100, seconds=3600, started=99)
    circuit.record("wh", success=True, now=200, started=199)  # the re-send
    circuit.pause("wh", now=205, seconds=3600, started=150)  # on its way since 150
    assert circuit.allows("wh", 206), "a late answer to an older request does not re-pause"

    circuit.pause("wh", now=210, seconds=60, started=209)
    assert not circuit.allows("wh", 211), "a request sent after the lift may pause it"


def test_a_lifted_pause_is_forgotten_with_its_endpoint() -> None:
    circuit = CircuitBreaker(threshold=3, open_for=30, probe_for=20)
    circuit.pause("wh", now=100, seconds=3600)
    circuit.record("wh", success=True, now=200, started=199)
    circuit.forget("wh")
    circuit.pause("wh", now=205, seconds=60, started=150)
    assert not circuit.allows("wh", 206)
