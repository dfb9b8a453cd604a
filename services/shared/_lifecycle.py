"""Running services until SIGINT/SIGTERM, then stopping them in reverse order."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import resource
import signal
import time
from collections.abc import Coroutine, Sequence
from typing import Any, Protocol, TypeVar

import structlog

from ._errors import ServiceFailed

T = TypeVar("T")


def open_files_limit() -> int | None:
    """Raise the process's soft limit on open files to its hard limit; the limit now in
    force (None: unlimited).

    Every request in flight, pooled keep-alive socket, Kafka and database connection is a
    file. The soft limit containers often start with (1,024) is reached by a burst of
    events to a thousand webhooks, and every connect then fails (EMFILE), healthy
    receivers' and the database's too; the hard limit is usually far higher.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass  # refused (a hard limit the kernel caps lower): the soft one stands
        else:
            soft = hard
    return None if soft == resource.RLIM_INFINITY else soft


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on uvloop's event loop when it is installed.

    The dispatcher spends most of its time in socket I/O (HTTP out, Kafka in and out), where
    uvloop's loop costs markedly less per request than the default one.
    """
    open_files_limit()
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


_CANCEL_REPEAT_SECONDS = 0.5
# Copies of one stop arrive together (a signal to the process group and the one `make`
# passes on to its child): only a signal this long after the first forces the exit.
_SAME_STOP_SECONDS = 0.5


async def cancel_and_wait(task: asyncio.Task[Any] | None, within: float = 10.0) -> None:
    """Cancel a background task and wait until it has ended, for at most ``within`` seconds.

    On Python 3.11 ``asyncio.wait_for`` swallows a cancellation that arrives as its inner
    await completes, and library code uses it; a single ``cancel()`` then leaves a loop
    running and a bare ``await task`` waits for ever. So the cancel is repeated until the
    task ends. An exception the task ended with is logged, not raised: a stop goes on.
    """
    if task is None:
        return
    if not await keep_cancelling(task, within):
        structlog.get_logger().error("task_did_not_stop", task=task.get_name())
        return
    if not task.cancelled() and (failure := task.exception()) is not None:
        structlog.get_logger().error("task_failed", task=task.get_name(), exc_info=failure)


async def keep_cancelling(
    future: asyncio.Future[Any], within: float, every: float = _CANCEL_REPEAT_SECONDS
) -> bool:
    """Cancel ``future`` every ``every`` seconds until it ends (see ``cancel_and_wait`` for
    why one cancellation is not enough), for at most ``within`` seconds; whether it
    ended."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not future.done():
        remaining = deadline - loop.time()
        if remaining <= 0:
            return False
        future.cancel()
        await asyncio.wait({future}, timeout=min(every, remaining))
    return True


async def finish_despite_cancel(step: Coroutine[Any, Any, Any]) -> None:
    """Run ``step`` to its end even while the calling task is being cancelled (a stop
    cancels again and again until the task ends): a last commit cut short makes a clean
    stop handle records twice. ``step`` must bound its own time."""
    last = asyncio.ensure_future(step)
    while not last.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(last)


class Loops:
    """A service's background loops, which run until the service stops.

    One that ends on its own (an error, or a return) is logged at once, fails the
    service's ``/healthz`` and, under ``run_until_signalled``, stops the process with an
    error: a process whose loop died would otherwise go on holding its work (a
    dispatcher its partitions) without doing it, until someone noticed.
    """

    def __init__(self, service: str) -> None:
        self.failed = asyncio.Event()
        self.failures: list[str] = []
        self._stopping = False
        self._log = structlog.get_logger(service=service)

    def start(self, coroutine: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coroutine, name=name)
        task.add_done_callback(self._ended)
        return task

    def stopping(self) -> None:
        """The loops are about to be cancelled: an ending from now on is expected."""
        self._stopping = True

    def _ended(self, task: asyncio.Task[Any]) -> None:
        if self._stopping:
            return
        # Cancelled by something other than the stop (a library future it awaited) is
        # ended all the same.
        error = None if task.cancelled() else task.exception()
        kind = "cancelled" if task.cancelled() else "ended"
        self._log.error(
            "loop_failed",
            loop=task.get_name(),
            error=kind if error is None else f"{type(error).__name__}: {error}",
            exc_info=error,
        )
        # The error's words stay in the log: /healthz may be reachable by more than staff.
        self.failures.append(
            f"{task.get_name()}: {kind if error is None else type(error).__name__}"
        )
        self.failed.set()


class Service(Protocol):
    name: str
    loops: Loops

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
    log = structlog.get_logger()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    first_signal_at: list[float] = []

    def on_signal(signum: int) -> None:
        if not first_signal_at:
            first_signal_at.append(time.monotonic())
            stop.set()
        elif time.monotonic() - first_signal_at[0] >= _SAME_STOP_SECONDS:
            # Asked again while stopping (a second Ctrl-C, an impatient supervisor): stop
            # now, draining nothing more; what was not committed is handled again by the
            # next owner. The status a shell gives a process the signal ended.
            log.warning("stop_forced", signal=signal.Signals(signum).name)
            os._exit(128 + signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    # From here a stop signal is heard, even while a start waits on a broker.
    log.info("services_starting", names=[service.name for service in services])
    # Each service's stop() copes with a start that did not finish.
    starting: list[Service] = []

    async def start_all() -> None:
        for service in services:
            starting.append(service)
            await service.start()
            log.info("service_started", name=service.name)

    starter = asyncio.create_task(start_all(), name="start")
    signalled = asyncio.create_task(stop.wait(), name="signalled")
    failing = [asyncio.create_task(s.loops.failed.wait(), name="failed") for s in services]
    try:
        await asyncio.wait({starter, signalled}, return_when=asyncio.FIRST_COMPLETED)
        if not starter.done():
            log.warning("stopped_while_starting")
            await cancel_and_wait(starter)
        else:
            starter.result()
            settle_heap()
            if ready_message:
                print(ready_message, flush=True)  # noqa: T201 - the dev banner is for a human
            await asyncio.wait({signalled, *failing}, return_when=asyncio.FIRST_COMPLETED)
            if any(s.loops.failures for s in services):
                log.error("shutting_down_after_loop_failed")
            else:
                log.info("shutting_down")
    finally:
        signalled.cancel()
        for waiting in failing:
            waiting.cancel()
        for service in reversed(starting):
            try:
                await service.stop()
            except Exception:
                log.exception("service_stop_failed", name=service.name)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        # The last line: without it a log ending at "shutting_down" does not say whether
        # the stop finished or the process was killed halfway.
        log.info("services_stopped", names=[service.name for service in starting])
    # Also a loop that died while the services started or stopped: the exit status says so.
    failures = [f"{s.name}: {failure}" for s in services for failure in s.loops.failures]
    if failures:
        raise ServiceFailed(f"a background loop failed ({'; '.join(failures)})")
