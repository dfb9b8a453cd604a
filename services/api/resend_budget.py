"""How many deliveries a team may re-send (retries, replays, test events) per hour.

A replay re-sends up to 10,000 deliveries, each with its event (up to 256 KiB): a script
replaying in a loop would fill ``deliveries`` with copies and keep every dispatcher busy
with one team's past. Each api process gives each team a bucket: full, it holds one
whole replay; it refills at the hourly rate. Pure bookkeeping on a monotonic clock, so
the routes stay the only I/O.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

# Buckets kept at most; past this, the full ones (as good as new) are dropped.
_TEAMS_REMEMBERED = 10_000


class ResendBudget:
    def __init__(
        self,
        per_hour: int,
        capacity: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = per_hour / 3600.0
        self._capacity = float(min(capacity, per_hour))
        self._clock = clock
        # Per team: what was left at the time, and when.
        self._buckets: dict[str, tuple[float, float]] = {}

    def _left(self, team_id: str, now: float) -> float:
        left, at = self._buckets.get(team_id, (self._capacity, now))
        return min(self._capacity, left + (now - at) * self._rate)

    def take(self, team_id: str, wanted: int) -> int:
        """Up to ``wanted`` re-sends, as many as the team has left (0: none now)."""
        now = self._clock()
        left = self._left(team_id, now)
        granted = min(wanted, math.floor(left))
        if len(self._buckets) >= _TEAMS_REMEMBERED and team_id not in self._buckets:
            self._forget_full(now)
        self._buckets[team_id] = (left - granted, now)
        return granted

    def give_back(self, team_id: str, unused: int) -> None:
        """Re-sends taken and not made (a replay with fewer rows, a publish that failed)."""
        if unused > 0:
            now = self._clock()
            self._buckets[team_id] = (self._left(team_id, now) + unused, now)

    @property
    def capacity(self) -> int:
        return int(self._capacity)

    def seconds_until(self, team_id: str, wanted: int) -> int:
        """In whole seconds, when the team may re-send ``wanted`` (0: now)."""
        missing = min(wanted, self._capacity) - self._left(team_id, self._clock())
        return max(0, math.ceil(missing / self._rate))

    def _forget_full(self, now: float) -> None:
        for team_id in [t for t in self._buckets if self._left(t, now) >= self._capacity]:
            del self._buckets[team_id]
