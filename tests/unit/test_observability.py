"""Every metric the docs, the alert rules and the dashboard name is one the services make,
and every metric the services make is in the operations reference."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from services.shared import Metrics

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("auth", "api", "dispatcher")
_DEFINED = re.compile(r'\.(counter|gauge|histogram)\(\s*"([a-z0-9_]+)"')
_NAMED = re.compile(r"hookwire_(auth|api|dispatcher|<service>)_([a-z0-9_]+)")
_SERIES_SUFFIXES = ("_bucket", "_sum", "_count")


def _defined() -> set[str]:
    """Full metric names, as a scrape shows them."""
    names = set()
    for path in (ROOT / "services").rglob("*.py"):
        relative = path.relative_to(ROOT / "services").parts
        owners = SERVICES if relative[0] == "shared" else (relative[0],)
        for kind, name in _DEFINED.findall(path.read_text()):
            for service in owners:
                names.add(f"hookwire_{service}_{name}")
                if kind == "histogram":
                    names.update(f"hookwire_{service}_{name}{s}" for s in _SERIES_SUFFIXES)
    return names


def _named(path: Path) -> set[str]:
    names = set()
    for service, name in _NAMED.findall(path.read_text()):
        for owner in SERVICES if service == "<service>" else (service,):
            names.add(f"hookwire_{owner}_{name}")
    return names


def test_the_metric_scan_finds_the_services_metrics() -> None:
    defined = _defined()
    assert "hookwire_dispatcher_deliveries_total" in defined
    assert "hookwire_api_http_request_seconds_bucket" in defined
    assert "hookwire_auth_http_requests_total" in defined


def test_docs_alerts_and_dashboard_name_only_real_metrics() -> None:
    defined = _defined()
    sources = [
        *(ROOT / "docs").glob("*.md"),
        ROOT / "README.md",
        ROOT / "deploy" / "prometheus" / "alerts.yml",
        *(ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"),
    ]
    for source in sources:
        unknown = _named(source) - defined
        assert not unknown, f"{source.relative_to(ROOT)} names {sorted(unknown)}"


def test_every_metric_is_in_the_operations_reference() -> None:
    listed = _named(ROOT / "docs" / "operations.md")
    for name in _defined():
        if name.endswith(_SERIES_SUFFIXES) and name.rsplit("_", 1)[0] in listed:
            continue
        assert name in listed, f"{name} is not in docs/operations.md"


def test_a_counter_asked_for_again_is_the_same_one_with_the_same_labels() -> None:
    metrics = Metrics("api")
    first = metrics.counter("things_total", "Things", ("kind",), from_zero=("a",))
    assert metrics.counter("things_total", "Things", ("kind",)) is first
    assert metrics.registry.get_sample_value("hookwire_api_things_total", {"kind": "a"}) == 0
    with pytest.raises(ValueError, match="has labels"):
        metrics.counter("things_total", "Things", ("sort",))
