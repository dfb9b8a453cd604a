"""Prometheus metrics behind one small helper; each service owns its registry and prefix.

A registry per service (rather than the process-global default) lets ``hookwire dev`` and
the tests run all three services in one process without name clashes.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self, service: str) -> None:
        self.prefix = f"hookwire_{service}"
        self.registry = CollectorRegistry()
        self._counters: dict[str, tuple[Counter, tuple[str, ...]]] = {}

    def counter(
        self,
        name: str,
        doc: str,
        labels: tuple[str, ...] = (),
        *,
        from_zero: tuple[str, ...] = (),
    ) -> Counter:
        """A counter; asked for again by name (two parts of a service counting the same
        thing), the same one. ``from_zero`` names values of its one label shown at 0 from
        the start: an alert on ``increase()`` misses the first count of a series that
        only appears with it."""
        labels = tuple(labels)
        made = self._counters.get(name)
        if made is None:
            counter = Counter(f"{self.prefix}_{name}", doc, labels, registry=self.registry)
            made = self._counters[name] = (counter, labels)
        counter, made_with = made
        if made_with != labels:
            raise ValueError(f"counter {name} has labels {made_with}, not {labels}")
        for value in from_zero:
            counter.labels(value)
        return counter

    def gauge(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
        return Gauge(f"{self.prefix}_{name}", doc, labels, registry=self.registry)

    def histogram(
        self,
        name: str,
        doc: str,
        labels: tuple[str, ...] = (),
        buckets: tuple[float, ...] = LATENCY_BUCKETS,
    ) -> Histogram:
        return Histogram(
            f"{self.prefix}_{name}", doc, labels, registry=self.registry, buckets=buckets
        )

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
