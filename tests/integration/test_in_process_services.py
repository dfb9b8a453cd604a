"""The services run in one process (as the tests and the in-process benchmarks run them)
stop every service that started, also when a later one fails to start."""

from __future__ import annotations

import socket

import pytest

from services.devstack import in_process_services
from services.shared import (
    ConfigurationError,
    Service,
    Settings,
    create_engine,
    ensure_topics,
    migrate,
)


async def test_a_service_failing_to_start_stops_those_started_before_it(
    settings: Settings,
) -> None:
    await migrate(settings.effective_database_url)
    await ensure_topics(settings)
    engine = create_engine(settings.effective_database_url)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = settings.model_copy(update={"api_port": taken.getsockname()[1]})
    stopped: list[str] = []

    async def stop(service: Service) -> None:
        stopped.append(service.name)
        await service.stop()

    try:
        with pytest.raises(ConfigurationError, match=r"cannot listen.*set HOOKWIRE_API_PORT"):
            async with in_process_services(busy, engine, with_dispatcher=True, stop=stop):
                pytest.fail("the api cannot listen on a port already taken")
        # The api's own stop runs too: its start may have opened clients before failing.
        assert stopped == ["api", "auth"]
    finally:
        taken.close()
        await engine.dispose()
