"""The SSRF guard: webhook URLs must not reach private, loopback or link-local addresses."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from urllib.parse import urlsplit

from aiohttp import ThreadedResolver
from aiohttp.abc import AbstractResolver, ResolveResult

REFUSED = "refused:"


def is_public_address(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


async def refused_reason(url: str) -> str | None:
    """Why the URL may not be called, or None when every address it resolves to is public."""
    host = urlsplit(url).hostname
    if host is None:
        return "URL has no host"
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        return f"cannot resolve {host}: {exc.strerror}"
    for *_, sockaddr in infos:
        if not is_public_address(str(sockaddr[0])):
            return f"{host} resolves to non-public address {sockaddr[0]}"
    return None


def literal_refusal(host: str) -> str | None:
    """For an IP-literal host (which skips DNS), why it is refused; None otherwise."""
    try:
        public = is_public_address(host.strip("[]"))
    except ValueError:
        return None
    return None if public else f"{REFUSED} {host} is a non-public address"


class GuardedResolver(AbstractResolver):
    """Resolves like the default resolver but refuses hosts with a non-public address.

    The connection is made to the addresses returned here, so the check happens at connect
    time: a name that resolved to a public address when the webhook was saved and to a
    private one now (DNS rebinding) is refused.
    """

    def __init__(self) -> None:
        self._inner = ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            if not is_public_address(result["host"]):
                # errno and strerror, so aiohttp's connection error carries the reason.
                reason = f"{REFUSED} {host} resolves to non-public address {result['host']}"
                raise OSError(errno.EACCES, reason)
        return results

    async def close(self) -> None:
        await self._inner.close()
