"""A port or host a service cannot listen on is named before anything starts."""

from __future__ import annotations

import socket

import pytest

from services.shared import ConfigurationError, check_listenable


def test_an_address_this_host_does_not_have_names_the_host_setting() -> None:
    with pytest.raises(ConfigurationError) as caught:
        check_listenable("10.255.255.1", 8080, "HOOKWIRE_API_PORT")
    assert "check HOOKWIRE_HOST" in caught.value.message
    assert "HOOKWIRE_API_PORT" not in caught.value.message


def test_a_port_in_use_names_the_port_setting() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigurationError) as caught:
            check_listenable("127.0.0.1", port, "HOOKWIRE_API_PORT")
    assert caught.value.message == (
        f"cannot listen on 127.0.0.1:{port}: Address already in use"
        " (set HOOKWIRE_API_PORT to use another port)"
    )


def test_any_free_port_is_not_checked() -> None:
    check_listenable("127.0.0.1", 0, "HOOKWIRE_API_PORT")
