"""A team's re-send budget: a bucket holding one replay, refilled at the hourly rate."""

from __future__ import annotations

import pytest

from services.api import resend_budget
from services.api.resend_budget import ResendBudget


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_full_bucket_holds_the_capacity_and_refills_at_the_hourly_rate() -> None:
    clock = _Clock()
    budget = ResendBudget(per_hour=3600, capacity=100, clock=clock)
    assert budget.take("team_a", 150) == 100
    assert budget.take("team_a", 1) == 0
    assert budget.seconds_until("team_a", 1) == 1
    assert budget.seconds_until("team_a", 1000) == 100, "no more than the capacity is awaited"
    clock.now += 10
    assert budget.take("team_a", 50) == 10
    assert budget.take("team_b", 5) == 5, "each team has its own"
    clock.now += 3600
    assert budget.take("team_a", 1000) == 100, "never more than the capacity"


def test_a_small_hourly_rate_is_also_the_capacity() -> None:
    clock = _Clock()
    budget = ResendBudget(per_hour=3, capacity=10_000, clock=clock)
    assert budget.take("team_a", 10_000) == 3
    assert budget.seconds_until("team_a", 1) == 1200
    clock.now += 600
    assert budget.seconds_until("team_a", 1) == 600
    clock.now += 600
    assert budget.seconds_until("team_a", 1) == 0


def test_what_is_given_back_can_be_taken_again() -> None:
    clock = _Clock()
    budget = ResendBudget(per_hour=3600, capacity=10, clock=clock)
    assert budget.take("team_a", 10) == 10
    budget.give_back("team_a", 4)
    budget.give_back("team_a", 0)
    assert budget.take("team_a", 10) == 4
    budget.give_back("team_a", 50)
    assert budget.take("team_a", 50) == 10, "never more than the capacity"


def test_full_buckets_are_forgotten_when_many_teams_were_seen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(resend_budget, "_TEAMS_REMEMBERED", 3)
    clock = _Clock()
    budget = ResendBudget(per_hour=3600, capacity=10, clock=clock)
    for team in ("a", "b", "c"):
        budget.take(team, 1)
    clock.now += 60  # all full again
    budget.take("d", 10)
    assert budget._buckets.keys() == {"d"}
    assert budget.take("d", 1) == 0
