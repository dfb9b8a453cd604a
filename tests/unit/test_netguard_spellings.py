"""The SSRF guard against hosts that parsers read differently, and addresses whose IPv6 form
or embedded IPv4 one is not public."""

from __future__ import annotations

import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
from packaging.requirements import Requirement

from services.api.webhooks import check_reachable
from services.shared import (
    Settings,
    ValidationFailed,
    is_public_address,
    literal_refusal,
    refused_reason,
)

# Each read as 127.0.0.1 or 10.0.0.5 by C's inet_aton (the system resolver, older aiohttp),
# and otherwise, or not at all, by c-ares.
AMBIGUOUS_HOSTS = [
    "0177.0.0.1",
    "012.0.0.5",
    "0x7f.1",
    "0X7F.0.0.1",
    "2130706433",
    "0x7f000001",
    "017700000001",
    "127.1",
    "127.0.1",
    "1.2.3.04",
    "08.0.0.1",
    "127.0.0.1.",
    "8.8.8.8.",
]


@pytest.mark.parametrize("host", AMBIGUOUS_HOSTS)
async def test_saving_a_webhook_refuses_an_ambiguous_ipv4_spelling(host: str) -> None:
    """The api's check names the problem before any lookup, rather than reading 0177.0.0.1
    as the public 177.0.0.1 (as c-ares does) or failing a DNS lookup of 0x7f.1."""
    reason = await refused_reason(f"http://{host}:8080/hook")
    assert reason == (
        f"{host.lower()} is an ambiguous IPv4 address: write it as four decimal numbers without"
        " leading zeros, like 192.0.2.1"
    )


@pytest.mark.parametrize("private_allowed", [False, True])
async def test_the_api_answers_an_ambiguous_ipv4_spelling_with_422_on_url(
    private_allowed: bool,
) -> None:
    """With private addresses allowed too (dev mode): the HTTP client would refuse the
    host at every delivery, whatever it stands for."""
    settings = cast(Settings, SimpleNamespace(allow_private_urls=private_allowed))
    with pytest.raises(ValidationFailed) as refused:
        await check_reachable(settings, "http://0177.0.0.1/hook")
    assert refused.value.status == 422
    [problem] = refused.value.details
    assert problem["field"] == "url"
    assert problem["reason"].startswith("0177.0.0.1 is an ambiguous IPv4 address")


async def test_with_private_addresses_allowed_a_private_address_is_saved() -> None:
    settings = cast(Settings, SimpleNamespace(allow_private_urls=True))
    await check_reachable(settings, "http://127.0.0.1:9/hook")


async def test_a_fullwidth_spelling_is_judged_by_the_digits_it_stands_for() -> None:
    reason = await refused_reason("http://\uff10\uff11\uff17\uff17.0.0.1/hook")
    assert reason is not None
    assert "is an ambiguous IPv4 address" in reason


@pytest.mark.parametrize("host", AMBIGUOUS_HOSTS)
def test_a_delivery_refuses_an_ambiguous_ipv4_spelling(host: str) -> None:
    """The dispatcher's check before connecting refuses it too (a URL saved before the
    api's check existed)."""
    for private_allowed in (False, True):
        assert literal_refusal(f"http://{host}/hook", private_allowed=private_allowed) == (
            f"refused: {host.lower()} is an ambiguous IPv4 address"
        )
    assert literal_refusal("http://127.0.0.1/hook", private_allowed=True) is None


@pytest.mark.parametrize("url", ["http://8.8.8.8/hook", "http://example.com/hook"])
def test_canonical_addresses_and_names_are_not_ambiguous(url: str) -> None:
    assert literal_refusal(url) is None


@pytest.mark.parametrize(
    "host", ["example.com", "1password.com", "0x.example", "a.0b", "123.example", "v1.2.3.4.io"]
)
def test_names_with_numbers_in_them_are_left_to_the_resolver(host: str) -> None:
    """Only a host that ends in a number is taken for an address: these are names."""
    assert literal_refusal(f"http://{host}/") is None


@pytest.mark.parametrize(
    "address",
    [
        # IETF protocol assignments, all of them (Python 3.11's table has only parts).
        "192.0.0.8",
        "192.0.0.9",
        "192.0.0.100",
        "192.0.0.255",
        "100.64.0.1",
        "100.127.255.254",
        "198.18.0.1",
        "198.19.255.255",
        "240.0.0.1",
        "255.255.255.255",
        "192.0.2.1",
        "2001:db8::1",
        "3fff::1",
        "3fff:fff:ffff::1",
        # The local-use NAT64 prefix, wherever its IPv4 address sits (here 8.8.8.8 read
        # from the last 32 bits, and from the bits a /64 prefix uses).
        "64:ff9b:1::808:808",
        "64:ff9b:1:0:8:808:800:0",
        # An IPv6 address that is not public itself though the IPv4 one inside is: mapped,
        # Teredo (8.8.8.8 as both server and client), 6to4.
        "::ffff:8.8.8.8",
        "2001:0:808:808::f7f7:f7f7",
        "2002:808:808::1",
        # Outside the global unicast space 2000::/3.
        "5f00::1",
        "100::1",
    ],
)
def test_addresses_python_may_count_as_global_are_refused(address: str) -> None:
    """The deny list does not depend on the tables of the running Python's patch level."""
    assert not is_public_address(address)


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "1.1.1.1",
        "192.0.1.1",
        "198.20.0.1",
        "100.128.0.1",
        "2606:4700::1111",
        "2001:4860:4860::8888",
        "2a00:1450:4001::1",
        "64:ff9b::101:101",
    ],
)
def test_public_addresses_next_to_the_denied_ranges_pass(address: str) -> None:
    assert is_public_address(address)


def test_an_ip_literal_through_the_local_use_nat64_prefix_is_refused_at_delivery() -> None:
    assert literal_refusal("http://[64:ff9b:1::808:808]/hook") == (
        "refused: 64:ff9b:1::808:808 is a non-public address"
    )


def test_no_aiohttp_that_connects_to_an_ambiguous_literal_can_be_installed() -> None:
    """aiohttp before 3.14.5 lets 127.1 or 2130706433 reach the C library (and up to 3.13.2
    decompresses without a bound, CVE-2025-69223); the dependency's floor excludes them."""
    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    [aiohttp] = [
        Requirement(line)
        for line in project["project"]["dependencies"]
        if Requirement(line).name == "aiohttp"
    ]
    assert not any(aiohttp.specifier.contains(old) for old in ("3.13.2", "3.14.4"))
    assert aiohttp.specifier.contains("3.14.5")
