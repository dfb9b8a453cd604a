"""Which address a request is taken to come from, behind trusted proxies or not."""

from __future__ import annotations

from ipaddress import ip_address, ip_network
from unittest import mock

import pytest
from aiohttp.test_utils import make_mocked_request

from services.shared import ip_in_ranges
from services.shared._http import _from_client

PROXIES = (ip_network("127.0.0.1/32"), ip_network("10.0.0.0/8"), ip_network("fd00::/8"))


def _from(peer: str, *forwarded: str) -> str | None:
    # The peer's address comes from the connection, which a test request stands in for.
    transport = mock.Mock()
    transport.get_extra_info.return_value = (peer, 1234)
    headers = [("X-Forwarded-For", value) for value in forwarded]
    request = make_mocked_request("GET", "/", headers=headers, transport=transport)
    return _from_client(request, PROXIES).remote


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        # The nearest hop not itself a proxy is the client; hops further out are the
        # client's to write and are not believed.
        ("127.0.0.1", ["198.51.100.9, 203.0.113.5"], "203.0.113.5"),
        ("127.0.0.1", ["203.0.113.5, 10.2.3.4"], "203.0.113.5"),
        # Several header lines read as one list, in order.
        ("127.0.0.1", ["198.51.100.9", "203.0.113.5"], "203.0.113.5"),
        ("fd00::1", ["2001:db8::7"], "2001:db8::7"),
        # A peer that is no trusted proxy: its header is anyone's to write.
        ("192.0.2.1", ["203.0.113.5"], "192.0.2.1"),
        # Nothing forwarded, only proxies, or a hop that is no address: the peer stands.
        ("127.0.0.1", [], "127.0.0.1"),
        ("127.0.0.1", ["10.9.9.9, 10.1.1.1"], "127.0.0.1"),
        ("127.0.0.1", ["unknown"], "127.0.0.1"),
        ("127.0.0.1", ["203.0.113.5:4711"], "127.0.0.1"),
        # A dual-stack proxy writes IPv4 addresses IPv4-mapped: a mapped proxy is still
        # one, as a peer and as a hop (the address is kept as written).
        ("::ffff:127.0.0.1", ["203.0.113.5"], "203.0.113.5"),
        ("::ffff:10.0.0.7", ["::ffff:203.0.113.5, ::ffff:10.2.3.4"], "::ffff:203.0.113.5"),
        ("127.0.0.1", ["::ffff:10.9.9.9, ::ffff:10.1.1.1"], "127.0.0.1"),
        ("::ffff:192.0.2.1", ["203.0.113.5"], "::ffff:192.0.2.1"),
    ],
)
def test_the_client_is_the_nearest_hop_not_a_trusted_proxy(
    peer: str, forwarded: list[str], client: str
) -> None:
    taken = _from(peer, *forwarded)
    assert taken is not None
    assert ip_address(taken) == ip_address(client)


def test_without_trusted_proxies_the_header_is_never_read() -> None:
    transport = mock.Mock()
    transport.get_extra_info.return_value = ("127.0.0.1", 1234)
    request = make_mocked_request(
        "GET", "/", headers={"X-Forwarded-For": "203.0.113.5"}, transport=transport
    )
    assert _from_client(request, ()).remote == "127.0.0.1"


@pytest.mark.parametrize(
    ("client", "cidrs", "allowed"),
    [
        ("203.0.113.5", ("203.0.113.0/24",), True),
        # The same client through a dual-stack proxy: IPv4-mapped, in the same range.
        ("::ffff:203.0.113.5", ("203.0.113.0/24",), True),
        ("::ffff:203.0.113.5", ("203.0.113.5/32",), True),
        ("::ffff:203.0.113.5", ("198.51.100.0/24",), False),
        # A range written as mapped addresses holds them too; other IPv6 ranges do not.
        ("::ffff:203.0.113.5", ("::ffff:203.0.113.0/120",), True),
        ("::ffff:203.0.113.5", ("2001:db8::/32",), False),
        ("2001:db8::7", ("2001:db8::/32", "203.0.113.0/24"), True),
        ("2001:db8::7", ("203.0.113.0/24",), False),
        (None, ("0.0.0.0/0",), False),
        ("unknown", ("0.0.0.0/0",), False),
    ],
)
def test_a_keys_ranges_hold_ipv4_mapped_clients(
    client: str | None, cidrs: tuple[str, ...], allowed: bool
) -> None:
    assert ip_in_ranges(client, cidrs) is allowed
