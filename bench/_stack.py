"""The services running in the benchmark's own process, on SQLite and an embedded broker.

For benchmarks that time what happens inside a service (a check, a change reaching a
table) rather than what a client sees over the network.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from services.api.app import ApiService
from services.auth.admin import bootstrap_dev
from services.auth.app import AuthService
from services.devstack import in_process_services
from services.dispatcher.app import DispatcherService
from services.shared import (
    EmbeddedBroker,
    configure_logging,
    create_engine,
    ensure_topics,
    load_settings,
    migrate,
)


@dataclass(frozen=True)
class InProcessStack:
    team: str
    key: str  # an owner's key holding every permission
    auth: AuthService
    api: ApiService
    dispatcher: DispatcherService | None


@contextlib.asynccontextmanager
async def in_process_stack(
    *, with_dispatcher: bool, **overrides: Any
) -> AsyncIterator[InProcessStack]:
    """Auth and the api (and a dispatcher) on free ports, with one team and its owner's key;
    ``overrides`` are settings."""
    configure_logging("json", "warning")
    broker = EmbeddedBroker()
    broker.start()
    try:
        await broker.wait_ready()
        with tempfile.TemporaryDirectory() as data_dir:
            settings = load_settings(
                **{
                    "database_url": f"sqlite+aiosqlite:///{data_dir}/bench.db",
                    "kafka_bootstrap": broker.bootstrap,
                    "api_port": 0,
                    "auth_port": 0,
                    "dispatcher_port": 0,
                    "service_credential": "bench",
                    "token_pepper": "bench",
                    "log_level": "warning",
                    "log_format": "json",
                    **overrides,
                }
            )
            await migrate(settings.effective_database_url)
            await ensure_topics(settings)
            engine = create_engine(settings.effective_database_url)
            try:
                owner = await bootstrap_dev(
                    engine, "bench", email="bench@example.com", display_name="Bench", team="bench"
                )
                async with in_process_services(
                    settings, engine, with_dispatcher=with_dispatcher
                ) as services:
                    yield InProcessStack(
                        owner["team_id"],
                        owner["token"],
                        services.auth,
                        services.api,
                        services.dispatcher,
                    )
            finally:
                await engine.dispose()
    finally:
        broker.stop()
