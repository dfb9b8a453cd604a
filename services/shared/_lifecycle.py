"""Running services until SIGINT/SIGTERM, then stopping them in reverse order."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Sequence
from typing import Protocol

import structlog


class Service(Protocol):
    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def run_until_signalled(services: Sequence[Service], ready_message: str = "") -> None:
    log = structlog.get_logger(service="hookwire")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    started: list[Service] = []
    try:
        for service in services:
            await service.start()
            started.append(service)
            log.info("service_started", name=service.name)
        if ready_message:
            print(ready_message, flush=True)  # noqa: T201 - the dev banner is for a human
        await stop.wait()
        log.info("shutting_down")
    finally:
        for service in reversed(started):
            try:
                await service.stop()
            except Exception:
                log.exception("service_stop_failed", name=service.name)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
