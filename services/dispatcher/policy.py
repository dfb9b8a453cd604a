"""What happens after an attempt: the retry delay, Retry-After, the circuit breaker.

Pure decisions with the clock and randomness passed in, so they are tested without time.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from services.shared import RETRY_TIERS, Settings

# Statuses that mean "later", whose Retry-After is honoured.
BACK_OFF_STATUSES = frozenset({429, 502, 503, 504})
GONE = 410


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a Retry-After header (delay-seconds or an HTTP date)."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():  # isdigit() alone also takes "²"
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, OverflowError):  # a year or an offset past any clock's
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


@dataclass(frozen=True)
class RetryPolicy:
    schedule: tuple[float, ...]
    jitter: float
    retry_after_max: float

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(
            settings.retry_schedule_seconds, settings.retry_jitter, settings.retry_after_max_seconds
        )

    @property
    def max_attempts(self) -> int:
        return len(self.schedule) + 1

    def delay_after(
        self, attempt: int, rng: random.Random, retry_after: float | None = None
    ) -> float | None:
        """Seconds before the attempt after ``attempt``; None when that was the last."""
        if attempt > len(self.schedule):
            return None
        base = self.schedule[attempt - 1]
        delay = base * (1 + rng.uniform(-self.jitter, self.jitter))
        if retry_after is not None:
            # Honoured as a floor, bounded so a receiver cannot park a delivery for a year.
            delay = max(delay, min(retry_after, self.retry_after_max))
        return delay

    @staticmethod
    def tier(attempt: int) -> int:
        """The retry topic holding the wait before attempt ``attempt + 1``."""
        return min(attempt, RETRY_TIERS)


@dataclass
class _Endpoint:
    failures: int = 0
    open_until: float = 0.0
    # When the circuit last opened (or a probe failed): requests started before then were
    # already on their way and say nothing about the probe.
    opened_at: float | None = None
    failed_probes: int = 0
    # Asked for by the endpoint (Retry-After): nothing goes before, everything after, with
    # no probe (it is not a failing endpoint, only a busy one).
    paused_until: float = 0.0
    # When it last asked: a request sent since (a re-send or a test) that succeeds shows
    # the endpoint taking requests again.
    paused_at: float = 0.0


@dataclass
class CircuitBreaker:
    """Per endpoint: after ``threshold`` consecutive failures, stop trying for ``open_for``
    seconds, then let one probe through; its success closes the circuit.

    Each failed probe doubles the wait, up to ``open_max``: deliveries deferred by an open
    circuit wake when it half-opens, and an endpoint down for days should not send its whole
    backlog round the retry topics every ``open_for`` seconds. Only the probe's outcome
    moves an open circuit: the other requests in flight when it opened (up to the
    endpoint's concurrency) are not probes, failing or succeeding late. ``probe_for`` is
    the longest a probe can take to answer: no second probe goes before it.
    """

    threshold: int
    open_for: float
    open_max: float = 600.0
    probe_for: float = 0.0
    _endpoints: dict[str, _Endpoint] = field(default_factory=dict)
    # Per endpoint whose pause a success lifted: when that request started. A 429 to a
    # request sent before it (answered late, the endpoint slow to say no) is older news
    # than the success, and must not pause again an endpoint the operator saw recover.
    _lifted: dict[str, float] = field(default_factory=dict)

    def allows(self, endpoint: str, now: float, *, peek: bool = False) -> bool:
        """Whether a request may go now; ``peek`` asks without taking the probe's turn."""
        state = self._endpoints.get(endpoint)
        if state is None:
            return True
        if now < state.paused_until:
            return False
        if state.opened_at is None:
            return True
        if now < state.open_until:
            return False
        if peek:
            return True
        # Half-open: this delivery is the probe. Until its outcome is recorded the circuit
        # stays shut for another ``open_for``, or as long as the probe may take, so
        # deliveries behind it wait instead of circling the retry topics, and a probe that
        # never reports back cannot keep the circuit shut for ever.
        state.open_until = now + max(self.open_for, self.probe_for)
        return True

    def pause(
        self,
        endpoint: str,
        now: float,
        seconds: float,
        started: float | None = None,
        *,
        ends_turn: bool = True,
    ) -> None:
        """The endpoint asked for ``seconds`` of quiet (a Retry-After with a 429 or 503):
        no request goes to it until then; after, all go again unless the circuit is open.

        Such an answer, instead of ``record``, is no failure: a busy endpoint's requests in
        flight, answered alike, would otherwise open the circuit and turn a pause of
        seconds into ``open_for``. When it answered the probe, the probe's turn ends, and
        the first request after the pause probes again; not ``ends_turn`` (a re-send or a
        test, which is no probe), the circuit's wait stands."""
        started = now if started is None else started
        if started < self._lifted.get(endpoint, started):
            return
        self._lifted.pop(endpoint, None)
        state = self._endpoints.setdefault(endpoint, _Endpoint())
        state.paused_until = max(state.paused_until, now + max(seconds, 0.0))
        state.paused_at = now
        if ends_turn and state.opened_at is not None and started >= state.opened_at:
            state.open_until = min(state.open_until, now)

    def paused(self, endpoint: str, now: float) -> bool:
        """Whether the endpoint asked for quiet (Retry-After) that is not over yet."""
        state = self._endpoints.get(endpoint)
        return state is not None and now < state.paused_until

    def is_open(self, endpoint: str) -> bool:
        """Whether the circuit is open or half-open: a request it allows now is the probe."""
        state = self._endpoints.get(endpoint)
        return state is not None and state.opened_at is not None

    def reopens_at(self, endpoint: str) -> float:
        state = self._endpoints.get(endpoint)
        if state is None:
            return 0.0
        return max(state.paused_until, state.open_until if state.opened_at is not None else 0.0)

    def record(
        self, endpoint: str, success: bool, now: float, started: float | None = None
    ) -> None:
        """The outcome, at ``now``, of a request started at ``started`` (default: now)."""
        started = now if started is None else started
        state = self._endpoints.get(endpoint)
        if state is not None and state.opened_at is not None and started < state.opened_at:
            return  # on its way before the circuit opened: not the probe
        if success:
            if state is not None and now < state.paused_until and started < state.paused_at:
                # Sent before the endpoint last asked for quiet: the circuit closes, the
                # pause stands. One sent since (only a re-send or a test goes during a
                # pause) lifts it too, as it closes a circuit.
                self._endpoints[endpoint] = _Endpoint(
                    paused_until=state.paused_until, paused_at=state.paused_at
                )
                return
            if state is not None and now < state.paused_until:
                # No request outlives ``probe_for``: older entries can stop nothing.
                self._lifted = {
                    e: at for e, at in self._lifted.items() if at + self.probe_for > now
                }
                self._lifted[endpoint] = started
            # A healthy endpoint needs no state: the table holds only failing ones.
            self._endpoints.pop(endpoint, None)
            return
        if state is None:
            state = self._endpoints[endpoint] = _Endpoint()
        if state.opened_at is not None:
            state.failed_probes = min(state.failed_probes + 1, 30)
        else:
            state.failures += 1
            if state.failures < self.threshold:
                return
        wait = min(self.open_for * 2**state.failed_probes, max(self.open_max, self.open_for))
        state.opened_at = now
        state.open_until = now + wait

    def forget(self, endpoint: str) -> None:
        self._endpoints.pop(endpoint, None)
        self._lifted.pop(endpoint, None)

    def endpoints(self) -> list[str]:
        """The endpoints with state (failing or open)."""
        return list(self._endpoints)

    def open_count(self, now: float) -> int:
        """The circuits turning requests away now. One whose wait is over counts no longer
        until its probe goes: an endpoint that gets no more deliveries would otherwise be
        counted open for as long as the process runs."""
        return sum(
            1 for s in self._endpoints.values() if s.opened_at is not None and now < s.open_until
        )
