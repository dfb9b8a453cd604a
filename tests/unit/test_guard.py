"""The SSRF guard's address classification."""

from __future__ import annotations

import pytest

from services.shared import is_public_address, refused_reason


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "0.0.0.0",
        "100.64.0.1",
        "224.0.0.1",
        "::1",
        "fe80::1",
        "fc00::1",
        "::ffff:127.0.0.1",
        "ff02::1",
        "64:ff9b::a9fe:a9fe",
        "64:ff9b:1::a00:1",
        "2002:7f00:1::1",
        "2002:a9fe:a9fe::1",
        "fec0::1",
        "::7f00:1",
        "4000::1",
        "240.0.0.1",
    ],
)
def test_non_public_addresses_are_refused(address: str) -> None:
    """Loopback, private, link-local (cloud metadata), CGNAT, multicast, mapped v4, v4
    reached through NAT64 or 6to4, site-local, IPv4-compatible and other reserved ranges."""
    assert not is_public_address(address)


@pytest.mark.parametrize(
    "address",
    ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "64:ff9b::808:808", "2a00:1450:4001::1"],
)
def test_public_addresses_pass(address: str) -> None:
    """Ordinary internet addresses are allowed."""
    assert is_public_address(address)


async def test_urls_resolving_to_loopback_are_refused() -> None:
    """A hostname is judged by what it resolves to, not by how it looks."""
    reason = await refused_reason("http://localhost:8080/hook")
    assert reason is not None
    assert "non-public" in reason
