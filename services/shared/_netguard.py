"""The SSRF guard: webhook URLs must not reach private, loopback or link-local addresses."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit


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
