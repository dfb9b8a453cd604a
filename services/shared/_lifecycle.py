"""Running services until SIGINT/SIGTERM, then stopping them in reverse order."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from collections.abc import Coroutine, Sequence
from typing import Any, Protocol, TypeVar

import structlog

T = TypeVar("T")


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on uvloop's event loop when it is installed.

    The dispatcher spends most of its time in socket I/O (HTTP out, Kafka in and out), where
    uvloop's loop costs markedly less per request than the default one.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


_CANCEL_REPEAT_SECONDS = 0.5


async def cancel_and_wait(task: asyncio.Task[Any] | None, within: float = 10.0) -> None:
    """Cancel a background task and wait until it has ended, for at most ``within`` seconds.

    On Python 3.11 ``asyncio.wait_for`` swallows a cancellation that arrives as its inner
    await completes, and library code uses it; a single ``cancel()`` then leaves a loop
    running and a bare ``await task`` waits for ever. So the cancel is repeated until the
    task ends. An exception the task ended with is logged, not raised: a stop goes on.
    """
    if task is None:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not task.done():
        remaining = deadline - loop.time()
        if remaining <= 0:
            structlog.get_logger().error("task_did_not_stop", task=task.get_name())
            return
        task.cancel()
        await asyncio.wait({task}, timeout=min(_CANCEL_REPEAT_SECONDS, remaining))
    if not task.cancelled() and (failure := task.exception()) is not None:
        structlog.get_logger().error("task_failed", task=task.get_name(), exc_info=failure)


async def finish_despite_cancel(step: Coroutine[Any, Any, Any]) -> None:
    """Run ``step`` to its end even while the calling task is being cancelled (a stop
    cancels again and again until the task ends): a last commit cut short makes a clean
    stop handle records twice. ``step`` must bound its own time."""
    last = asyncio.ensure_future(step)
    while not last.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(last)


class Service(Protocol):
    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def settle_heap() -> None:
    """Keep what has been built so far out of every later garbage collection.

    Modules, settings, pools and caches live as long as the process, yet each full
    collection walks them all. Measured under `bench/publish.py`, the auth and api
    processes' full collections took 64-98 ms; frozen after start-up, 0.4-1.5 ms.
    """
    gc.collect()
    gc.freeze()


async def run_until_signalled(services: Sequence[Service], ready_message: str = "") -> None:
    """Start the services, run until SIGINT/SIGTERM, stop them in reverse order.

    A signal that arrives while a service is still starting (waiting on a broker, say)
    cancels the start: a stuck start must not make a process deaf to SIGTERM.
    """
    log = structlog.get_logger(service="hookwire")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # Each service's stop() copes with a start that did not finish.
    starting: list[Service] = []

    async def start_all() -> None:
        for service in services:
            starting.append(service)
            await service.start()
            log.info("service_started", name=service.name)

    starter = asyncio.create_task(start_all(), name="start")
    signalled = asyncio.create_task(stop.wait(), name="signalled")
    try:
        await asyncio.wait({starter, signalled}, return_when=asyncio.FIRST_COMPLETED)
        if not starter.done():
            log.warning("stopped_while_starting")
            await cancel_and_wait(starter)
            return
        starter.result()
        settle_heap()
        if ready_message:
            print(ready_message, flush=True)  # noqa: T201 - the dev banner is for a human
        await signalled
        log.info("shutting_down")
    finally:
        signalled.cancel()
        for service in reversed(starting):
            try:
                await service.stop()
            except Exception:
                log.exception("service_stop_failed", name=service.name)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
