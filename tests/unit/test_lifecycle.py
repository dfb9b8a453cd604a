"""Stopping background tasks: a swallowed cancellation must not hang a shutdown."""

from __future__ import annotations

import asyncio
import gc
import os
import resource
import signal
import subprocess
import sys

import pytest

from services.shared import Loops, ServiceFailed, cancel_and_wait, run_until_signalled


async def _swallows_first_cancel(swallowed: list[int]) -> None:
    # What asyncio.wait_for does on Python 3.11 when its inner await finishes as the
    # cancel arrives: the CancelledError is lost and the caller's loop goes on.
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            if swallowed:
                raise
            swallowed.append(1)


async def test_a_task_that_swallows_a_cancel_still_stops() -> None:
    swallowed: list[int] = []
    task = asyncio.create_task(_swallows_first_cancel(swallowed))
    await asyncio.sleep(0)
    await cancel_and_wait(task, within=5)
    assert swallowed == [1]
    assert task.cancelled()


async def test_a_task_that_never_stops_is_given_up_after_the_bound() -> None:
    release = asyncio.Event()

    async def deaf() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(deaf())
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await cancel_and_wait(task, within=0.3)
    assert 0.3 <= loop.time() - started < 2
    assert not task.done()
    release.set()
    task.cancel()
    await asyncio.wait({task}, timeout=1)
    assert task.done()


async def test_a_failed_task_does_not_stop_the_shutdown(capsys: pytest.CaptureFixture[str]) -> None:
    async def fails() -> None:
        raise RuntimeError("broken")

    task = asyncio.create_task(fails(), name="broken-task")
    await asyncio.wait({task})
    await cancel_and_wait(task)
    assert "task_failed" in capsys.readouterr().out
    await cancel_and_wait(None)


class _SignalsItself:
    """A service that asks for its own stop once started and notes what stop saw."""

    name = "self-stopping"

    def __init__(self) -> None:
        self.frozen_at_stop = -1
        self.loops = Loops(self.name)

    async def start(self) -> None:
        asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)

    async def stop(self) -> None:
        self.frozen_at_stop = gc.get_freeze_count()


async def test_what_start_up_built_is_kept_out_of_later_collections() -> None:
    """Once every service started, start-up's objects are frozen: a full collection no
    longer walks them (64-98 ms per collection in the api and auth under load, ~1 ms)."""
    gc.unfreeze()
    service = _SignalsItself()
    try:
        await run_until_signalled([service])
        assert service.frozen_at_stop > 0
    finally:
        gc.unfreeze()


class _LoopDies:
    """A service whose background loop fails a moment after start."""

    name = "breakable"

    def __init__(self, error: BaseException | None) -> None:
        self.loops = Loops(self.name)
        self.error = error
        self.stopped = False
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        async def work() -> None:
            await asyncio.sleep(0.05)
            if self.error is not None:
                raise self.error

        self.task = self.loops.start(work(), name="worker")

    async def stop(self) -> None:
        self.loops.stopping()
        await cancel_and_wait(self.task)
        self.stopped = True


@pytest.mark.parametrize("error", [RuntimeError("broken"), None], ids=["raised", "returned"])
async def test_a_loop_that_ends_on_its_own_stops_the_process_with_an_error(
    capsys: pytest.CaptureFixture[str], error: BaseException | None
) -> None:
    """Not a process that looks alive while its work stands still: the failure is logged
    at once, the services are stopped, and the run ends in an error naming the loop."""
    service = _LoopDies(error)
    with pytest.raises(ServiceFailed) as failed:
        await asyncio.wait_for(run_until_signalled([service]), timeout=5)
    reason = "RuntimeError" if error is not None else "ended"
    assert f"breakable: worker: {reason}" in failed.value.message
    assert service.stopped
    assert service.loops.failures == [f"worker: {reason}"]
    assert "loop_failed" in capsys.readouterr().out


async def test_loops_cancelled_by_a_stop_are_not_failures() -> None:
    loops = Loops("quiet")
    task = loops.start(asyncio.sleep(10), name="sleeper")
    loops.stopping()
    await cancel_and_wait(task)
    assert loops.failures == []
    assert not loops.failed.is_set()


async def test_a_loop_cancelled_by_anything_but_the_stop_is_a_failure() -> None:
    """A loop awaiting a library future that was cancelled ends cancelled on its own."""
    loops = Loops("quiet")
    task = loops.start(asyncio.sleep(10), name="sleeper")
    task.cancel()
    await asyncio.wait({task})
    assert loops.failures == ["sleeper: cancelled"]
    assert loops.failed.is_set()


class _DiesWhileStopping(_LoopDies):
    """Its loop fails while the service stops, before the loops are told."""

    async def stop(self) -> None:
        assert self.task is not None
        await asyncio.wait({self.task})
        await super().stop()


async def test_a_loop_that_dies_while_the_process_stops_still_fails_the_run() -> None:
    service = _DiesWhileStopping(None)

    async def long_work() -> None:
        await asyncio.sleep(0.2)
        raise RuntimeError("late")

    async def start() -> None:
        service.task = service.loops.start(long_work(), name="worker")
        asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)

    service.start = start  # type: ignore[method-assign]
    with pytest.raises(ServiceFailed) as failed:
        await asyncio.wait_for(run_until_signalled([service]), timeout=5)
    assert "breakable: worker: RuntimeError" in failed.value.message


def test_a_service_process_raises_its_open_files_limit_to_the_hard_one() -> None:
    """Started with the 1,024 (here 256) files a container often gives, a burst to many
    webhooks would fail every connect; the process takes what the hard limit allows."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(256, hard)

    def lowered() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))

    script = (
        "import resource; from services.shared import open_files_limit;"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0]);"
        "print(open_files_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    )
    shown = subprocess.run(
        [sys.executable, "-c", script],
        preexec_fn=lowered,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    expected = "None" if hard == resource.RLIM_INFINITY else str(hard)
    assert shown == [str(low), expected, str(hard)]
