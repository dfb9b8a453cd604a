"""The SSRF guard's address classification."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any, ClassVar, cast

import pytest

from services.shared import (
    GuardedResolver,
    _netguard,
    is_public_address,
    literal_refusal,
    refused_reason,
)


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


class _NameServer(asyncio.DatagramProtocol):
    """A real DNS server on UDP for names under `.test`: `public*` has a public IPv4
    address, `private*` a private one, `missing*` does not exist, and `silent*` is never
    answered (a name server that hangs). No name has an IPv6 address."""

    addresses: ClassVar[dict[str, str]] = {"public": "93.184.216.34", "private": "10.0.0.7"}
    # `added*` names with a public address, once the test has added them; no such name
    # before (answered with the zone's SOA, as a real server does).
    added: ClassVar[set[str]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's datagram transport is not an asyncio.DatagramTransport subclass.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        labels, end = [], 12
        while data[end]:
            labels.append(data[end + 1 : end + 1 + data[end]].decode())
            end += data[end] + 1
        question = data[12 : end + 5]
        query_type = int.from_bytes(data[end + 1 : end + 3], "big")
        kind = labels[0].rstrip("0123456789")
        if kind == "silent":
            return
        if kind == "added":
            # No such name until the test adds its record.
            if labels[0] not in self.added:
                self._no_such_name(data, end, addr)
                return
            kind = "public"
        answers = b""
        if kind in self.addresses and query_type == 1:
            answers = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + socket.inet_aton(
                self.addresses[kind]
            )
        flags = b"\x81\x83" if kind == "missing" else b"\x81\x80"
        counts = b"\x00\x01" + (b"\x00\x01" if answers else b"\x00\x00") + b"\x00\x00" * 2
        self.transport.sendto(data[:2] + flags + counts + question + answers, addr)

    def _no_such_name(self, data: bytes, end: int, addr: tuple[str | Any, int]) -> None:
        """NXDOMAIN with the zone's SOA, which lets a resolver keep the answer 5 minutes."""
        soa = b"\x00\x00" + struct.pack(">5I", 1, 3600, 600, 86400, 300)
        authority = b"\x00\x00\x06\x00\x01" + struct.pack(">IH", 300, len(soa)) + soa
        counts = b"\x00\x01\x00\x00\x00\x01\x00\x00"
        self.transport.sendto(
            data[:2] + b"\x81\x83" + counts + data[12 : end + 5] + authority, addr
        )


@pytest.fixture
async def nameserver() -> AsyncIterator[str]:
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        _NameServer, local_addr=("127.0.0.1", 0)
    )
    try:
        yield f"127.0.0.1:{transport.get_extra_info('sockname')[1]}"
    finally:
        transport.close()
        _NameServer.added.clear()


async def test_the_guard_judges_names_by_what_a_name_server_answers(nameserver: str) -> None:
    """At connect time a name with a public address resolves, and one a name server
    points at a private address (DNS rebinding) is refused with the reason."""
    resolver = GuardedResolver([nameserver])
    try:
        [found] = await resolver.resolve("public.test", 443, socket.AF_UNSPEC)
        assert (found["host"], found["port"]) == ("93.184.216.34", 443)
        with pytest.raises(OSError, match="non-public") as refused:
            await resolver.resolve("private.test", 443, socket.AF_UNSPEC)
        # The address stays in the operator's log: the team sees only that it is private.
        assert refused.value.strerror == "refused: private.test resolves to a non-public address"
    finally:
        await resolver.close()


async def test_a_name_server_that_never_answers_holds_no_other_lookup_back(
    nameserver: str,
) -> None:
    """Lookups hold no thread: fifty hanging ones (more than the event loop's thread pool
    has threads) leave a lookup of another name as quick as ever."""
    resolver = GuardedResolver([nameserver])
    hanging = [
        asyncio.create_task(resolver.resolve(f"silent{n}.test", 443, socket.AF_UNSPEC))
        for n in range(50)
    ]
    try:
        await asyncio.sleep(0.1)
        # Lookups queued behind the hanging ones would wait for c-ares to give up on them
        # (seconds per try); an answer from a name server on this machine takes far less.
        async with asyncio.timeout(2):
            [found] = await resolver.resolve("public2.test", 443, socket.AF_UNSPEC)
        assert found["host"] == "93.184.216.34"
        assert not any(task.done() for task in hanging)
    finally:
        for task in hanging:
            task.cancel()
        await asyncio.gather(*hanging, return_exceptions=True)
        await resolver.close()


async def test_saving_a_webhook_judges_its_url_by_the_name_server_and_waits_a_bounded_time(
    nameserver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The api's check when a webhook is saved: the reason for a private address, an
    unknown name, an invalid name and a name server that never answers (bounded)."""
    servers = [nameserver]
    assert await refused_reason("https://public.test/hook", servers) is None
    assert await refused_reason("https://private.test/hook", servers) == (
        "private.test resolves to a non-public address"
    )
    missing = await refused_reason("https://missing.test/hook", servers)
    assert missing is not None
    assert missing.startswith("cannot resolve missing.test: ")
    assert await refused_reason("https://a..test/hook", servers) == (
        "a..test is not a valid host name"
    )
    # Bounded by the api's own wait (shortened here), not by c-ares giving up.
    monkeypatch.setattr(_netguard, "LOOKUP_SECONDS", 0.5)
    async with asyncio.timeout(4):
        silent = await refused_reason("https://silent.test/hook", servers)
    assert silent == "cannot resolve silent.test: no answer within 0.5 s"


def _fullwidth(name: str) -> str:
    """The name in fullwidth letters, which IDNA maps back to the ASCII ones."""
    return "".join(chr(ord(letter) + 0xFEE0) for letter in name)


@pytest.mark.parametrize("host", ["\u2603.test", f"{_fullwidth('missing')}.test", "\ufb01le.test"])
async def test_international_names_are_looked_up_as_a_delivery_would(
    nameserver: str, host: str
) -> None:
    """A snowman, fullwidth letters, a ligature: names the resolver's own stricter IDNA
    rules would not encode are looked up in the ASCII form the delivery uses, and answered
    (here: no such name), never a crash."""
    reason = await refused_reason(f"https://{host}/hook", [nameserver])
    assert reason is not None
    assert reason.startswith(f"cannot resolve {host}: ")


async def test_a_fullwidth_name_is_judged_by_the_name_it_stands_for(nameserver: str) -> None:
    public, private = _fullwidth("public"), _fullwidth("private")
    assert await refused_reason(f"https://{public}.test/hook", [nameserver]) is None
    assert await refused_reason(f"https://{private}.test/hook", [nameserver]) == (
        f"{private}.test resolves to a non-public address"
    )


async def test_a_name_just_added_is_found_at_the_next_save(nameserver: str) -> None:
    """The first save finds no such name (its record not yet added); the next one, a
    moment later, looks again rather than repeating a remembered "no"."""
    first = await refused_reason("https://added7.test/hook", [nameserver])
    assert first is not None
    assert first.startswith("cannot resolve added7.test: ")
    _NameServer.added.add("added7")
    assert await refused_reason("https://added7.test/hook", [nameserver]) is None


@pytest.mark.parametrize(
    ("url", "refused_host"),
    [
        ("http://127.0.0.1:8080/hook", "127.0.0.1"),
        ("https://[::1]/hook", "::1"),
        ("http://[::ffff:10.0.0.1]/", "::ffff:a00:1"),
        ("http://169.254.169.254/latest", "169.254.169.254"),
        ("http://8.8.8.8/hook", None),
        ("https://example.com/hook", None),
    ],
)
def test_an_ip_literal_is_judged_without_a_lookup(url: str, refused_host: str | None) -> None:
    """The dispatcher's check before connecting: a literal host skips the resolver, so it
    is judged here; a name is left to the guarded resolver."""
    refusal = literal_refusal(url)
    if refused_host is None:
        assert refusal is None
    else:
        assert refusal == f"refused: {refused_host} is a non-public address"
