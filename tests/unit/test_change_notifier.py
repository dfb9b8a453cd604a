"""A change's notice, as its caller hears of it: at once when the broker answers in
time, and watched by the notifier once the caller stopped waiting."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from typing import Any

import pytest
import structlog
from aiokafka.errors import KafkaConnectionError

from services.shared import ChangeNotifier, load_settings, topics_for


class _Broker:
    """A producer whose answer comes when the test says, and is a refusal."""

    def __init__(self) -> None:
        self.answer = asyncio.Event()

    async def send_and_wait(self, *args: Any, **kwargs: Any) -> None:
        await self.answer.wait()
        raise KafkaConnectionError("connection lost")


def _notifier(broker: _Broker, wait_seconds: float | None) -> ChangeNotifier:
    topics = topics_for(load_settings())
    return ChangeNotifier(broker, topics, wait_seconds=wait_seconds)  # type: ignore[arg-type]


@pytest.mark.parametrize("how", ["caller_cancelled", "wait_ran_out"])
async def test_a_notice_failing_after_its_caller_left_is_logged_once(how: str) -> None:
    """Its caller cancelled (a stop) or its wait run out: the refusal that comes later is
    logged as the notice not published, and asyncio has no error left unretrieved."""
    broker = _Broker()
    notifier = _notifier(broker, 0.05)
    loop = asyncio.get_running_loop()
    unretrieved: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: unretrieved.append(context))
    try:
        with structlog.testing.capture_logs() as logs:
            if how == "caller_cancelled":
                notifier = _notifier(broker, None)
                caller = asyncio.create_task(notifier.notify("token", "tok_1", "updated"))
                await asyncio.sleep(0.01)
                caller.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await caller
            else:
                assert await notifier.notify("token", "tok_1", "updated") is False
            broker.answer.set()
            for _ in range(5):
                await asyncio.sleep(0)
            gc.collect()
            await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    failed = [e for e in logs if e["event"] == "change_not_published"]
    assert len(failed) == 1
    assert failed[0]["entity_id"] == "tok_1"
    assert unretrieved == []


async def test_a_refusal_in_time_is_the_callers_and_logged_once() -> None:
    broker = _Broker()
    broker.answer.set()
    with structlog.testing.capture_logs() as logs:
        assert await _notifier(broker, 1.0).notify("token", "tok_1", "updated") is False
        await asyncio.sleep(0)
    assert [e["event"] for e in logs].count("change_not_published") == 1
