"""Sending one delivery as a signed POST and classifying what happened."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass
from importlib.metadata import version
from typing import Literal

import aiohttp

from services.shared import Delivery, Settings, refused_reason

from .routing import WebhookRoute
from .signing import signature_header

USER_AGENT = f"hookwire/{version('hookwire')} (+webhooks)"


@dataclass(frozen=True)
class Outcome:
    outcome: Literal["delivered", "failed"]
    status_code: int | None
    latency_ms: float
    error: str | None


def signed_headers(
    route: WebhookRoute, delivery: Delivery, body: bytes, timestamp: int
) -> dict[str, str]:
    headers = dict(route.headers)
    headers.update(
        {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "webhook-id": delivery.id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature_header(route.signing_keys, delivery.id, timestamp, body),
        }
    )
    return headers


def payload(delivery: Delivery) -> bytes:
    return delivery.event.to_bytes()


class Sender:
    def __init__(self, session: aiohttp.ClientSession, settings: Settings) -> None:
        self._session = session
        self._settings = settings
        self._timeout = aiohttp.ClientTimeout(total=settings.delivery_timeout_seconds)
        self._limits: defaultdict[str, asyncio.Semaphore] = defaultdict(
            lambda: asyncio.Semaphore(settings.delivery_concurrency_per_endpoint)
        )

    async def send(self, route: WebhookRoute, delivery: Delivery) -> Outcome:
        started = time.perf_counter()

        def elapsed() -> float:
            return round((time.perf_counter() - started) * 1000, 3)

        if not self._settings.allow_private_urls:
            reason = await refused_reason(route.url)
            if reason is not None:
                return Outcome("failed", None, elapsed(), f"refused: {reason}")
        body = payload(delivery)
        headers = signed_headers(route, delivery, body, int(time.time()))
        async with self._limits[route.id]:
            try:
                async with self._session.post(
                    route.url,
                    data=body,
                    headers=headers,
                    allow_redirects=False,
                    timeout=self._timeout,
                ) as response:
                    await response.content.read(self._settings.response_body_limit_bytes)
                    status = response.status
            except TimeoutError:
                return Outcome("failed", None, elapsed(), "timeout")
            except aiohttp.ClientError as exc:
                return Outcome("failed", None, elapsed(), f"{type(exc).__name__}: {exc}")
        outcome: Literal["delivered", "failed"] = "delivered" if 200 <= status < 300 else "failed"
        return Outcome(
            outcome, status, elapsed(), None if outcome == "delivered" else f"HTTP {status}"
        )
