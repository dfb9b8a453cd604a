"""``hookwire dev`` allows private addresses (its sample receiver is local) unless the
operator set ``HOOKWIRE_ALLOW_PRIVATE_URLS`` themselves."""

from __future__ import annotations

from typing import Any

import pytest
import structlog
from click.testing import CliRunner

from services import cli, devstack
from services.shared import Settings


def _dev_settings(monkeypatch: pytest.MonkeyPatch) -> tuple[Settings, list[dict[str, Any]]]:
    started: list[Settings] = []

    async def run_dev(settings: Settings) -> None:
        started.append(settings)

    monkeypatch.setattr(devstack, "run_dev", run_dev)
    # Left as the test set it up, so that its log lines are captured.
    monkeypatch.setattr(cli, "configure_logging", lambda *_, **__: None)
    with structlog.testing.capture_logs() as logs:
        result = CliRunner().invoke(cli.main, ["dev"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    [settings] = started
    return settings, logs


@pytest.mark.parametrize("unset", [None, ""])
def test_dev_allows_private_addresses_by_default(
    monkeypatch: pytest.MonkeyPatch, unset: str | None
) -> None:
    """Unset, or set empty (a deploy file's ``${VAR:-}``: the settings read that as unset)."""
    if unset is None:
        monkeypatch.delenv("HOOKWIRE_ALLOW_PRIVATE_URLS", raising=False)
    else:
        monkeypatch.setenv("HOOKWIRE_ALLOW_PRIVATE_URLS", unset)
    settings, logs = _dev_settings(monkeypatch)
    assert settings.allow_private_urls is True
    assert [log for log in logs if log["event"] == "private_urls_refused"] == []


@pytest.mark.parametrize("name", ["HOOKWIRE_ALLOW_PRIVATE_URLS", "hookwire_allow_private_urls"])
def test_dev_keeps_an_explicit_refusal_and_says_what_it_costs(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.delenv("HOOKWIRE_ALLOW_PRIVATE_URLS", raising=False)
    monkeypatch.setenv(name, "false")
    settings, logs = _dev_settings(monkeypatch)
    assert settings.allow_private_urls is False
    [warned] = [log for log in logs if log["event"] == "private_urls_refused"]
    assert warned["log_level"] == "warning"
    assert "sample receiver" in warned["detail"]


def test_dev_takes_an_explicit_allowance(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOKWIRE_ALLOW_PRIVATE_URLS", "true")
    settings, _ = _dev_settings(monkeypatch)
    assert settings.allow_private_urls is True
