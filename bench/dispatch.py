"""Dispatch benchmark: deliveries/s of one and two dispatcher processes against a bare client.

Starts the embedded broker, a fast receiver in its own process (`bench/receiver.py`), and
`hookwire auth` + `hookwire api` (SQLite) only long enough to create the webhooks through the
api. Events are written straight onto the events topic, as an external producer would. Then:

- ceiling: a bare aiohttp client loop posting the same ~1 KB body to the receiver with the
  dispatcher's per-endpoint concurrency, measured before and after the next phase;
- one dispatcher, one webhook: deliveries/s measured at the receiver (first to last
  arrival), over the mean of the two ceilings around it;
- one, two, then one dispatcher again, one webhook per partition of the deliveries topic:
  deliveries/s, and two over the mean of the ones around it. A webhook's deliveries share
  one partition (its id is the key), so only several webhooks spread over processes; one
  webhook per partition gives both processes the same share, rather than whatever split a
  handful of hashed ids happens to give (eight random ids over six partitions are often
  5:3 or 6:2);
- publish→receive latency p50/p99 at a fixed rate (default 200 events/s), and the CPU the
  dispatcher and the broker use meanwhile;
- dispatcher RSS with 10,000 deliveries pending retry (the endpoint answers 500; the retry
  schedule's first delay is an hour, so every one waits in the retry timer).

    python -m bench.dispatch [--events 20000] [--rate 200] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.introspect import HOOKWIRE, _log, _percentile, _run, _wait_healthy
from services.shared import (
    EmbeddedBroker,
    Event,
    ensure_topics,
    free_port,
    load_settings,
    make_producer,
    partition_of,
    run,
    send_all,
    settle_heap,
    topics_for,
)

PAD = "x" * 900
CONCURRENCY = 10


def _environment(data_dir: str, bootstrap: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOOKWIRE_")}
    env.update(
        HOOKWIRE_DATABASE_URL=f"sqlite+aiosqlite:///{data_dir}/bench.db",
        HOOKWIRE_KAFKA_BOOTSTRAP=bootstrap,
        HOOKWIRE_KAFKA_SESSION_TIMEOUT_MS="3000",
        HOOKWIRE_KAFKA_HEARTBEAT_INTERVAL_MS="300",
        HOOKWIRE_SERVICE_CREDENTIAL="bench",
        HOOKWIRE_TOKEN_PEPPER="bench",
        HOOKWIRE_ALLOW_PRIVATE_URLS="true",
        HOOKWIRE_DELIVERY_CONCURRENCY_PER_ENDPOINT=str(CONCURRENCY),
        # The first retry waits an hour: a failed delivery stays pending in the retry timer.
        HOOKWIRE_RETRY_SCHEDULE_SECONDS="3600",
        HOOKWIRE_LOG_LEVEL="warning",
        HOOKWIRE_LOG_FORMAT="json",
    )
    return env


class Dispatchers:
    """Dispatcher processes, each on its own port, stopped with SIGTERM."""

    def __init__(self, env: dict[str, str], log_dir: Path | None) -> None:
        self.env = env
        self.log_dir = log_dir
        self.started = 0
        self.phase = 0
        self.stop_seconds: list[float] = []
        self.processes: list[tuple[asyncio.subprocess.Process, int]] = []

    async def start(self, session: aiohttp.ClientSession, count: int) -> str:
        """Start ``count`` dispatchers on topics and groups of their own; the events topic.

        Fresh groups for every phase: the embedded broker has been seen to leave a new
        member's join hanging in a group whose members just left.
        """
        self.phase += 1
        settings = load_settings(
            kafka_bootstrap=self.env["HOOKWIRE_KAFKA_BOOTSTRAP"], topic_prefix=f"b{self.phase}."
        )
        await ensure_topics(settings)
        for _ in range(count):
            port = free_port()
            self.started += 1
            log = self._log_target()
            process = await asyncio.create_subprocess_exec(
                HOOKWIRE,
                "dispatcher",
                env={
                    **self.env,
                    "HOOKWIRE_DISPATCHER_PORT": str(port),
                    "HOOKWIRE_TOPIC_PREFIX": settings.topic_prefix,
                },
                stdout=log,
                stderr=log,
            )
            self.processes.append((process, port))
        for _, port in self.processes:
            await _wait_healthy(session, f"http://127.0.0.1:{port}", "/readyz", within=60)
        # Ready means started; give the group time to settle its partition assignment.
        await asyncio.sleep(4)
        return topics_for(settings).events

    def _log_target(self) -> Any:
        if self.log_dir is None:
            return subprocess.DEVNULL
        return (self.log_dir / f"dispatcher-{self.started}.log").open("wb")

    async def stop(self) -> None:
        for process, _ in self.processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        for process, _ in self.processes:
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                process.kill()
                await process.wait()
        if self.processes:
            self.stop_seconds.append(round(time.monotonic() - started, 2))
        self.processes.clear()

    def rss_mb(self) -> list[float]:
        return [_rss_mb(process.pid) for process, _ in self.processes]

    def cpu_seconds(self) -> float:
        return sum(_cpu_seconds(process.pid) for process, _ in self.processes)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no VmRSS for process {pid}")


async def _gauge(session: aiohttp.ClientSession, port: int, name: str) -> float:
    async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
        text = await response.text()
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(f"hookwire_dispatcher_{name}") and not line.startswith("#")
    )


def _event(team: str, object_type: str, number: int, stamped: bool = False) -> Event:
    data: dict[str, Any] = {"n": number, "note": PAD}
    if stamped:
        data["sent_at"] = time.time()
    return Event(
        id=f"evt_b{time.monotonic_ns()}_{number}",
        type="object.created",
        team_id=team,
        object_type=object_type,
        object_id=f"o{number}",
        occurred_at=datetime.now(UTC),
        data=data,
    )


def _mean_rate(runs: list[dict[str, Any]]) -> float:
    return round(sum(run["deliveries_per_second"] for run in runs) / len(runs), 1)


def _key(event: Event) -> bytes:
    # As the api keys it.
    return f"{event.team_id}/{event.object_id}".encode()


async def _send(producer: Any, topic: str, event: Event) -> Any:
    """Queue one event; returns the future of its acknowledgement."""
    return await producer.send(topic, value=event.to_bytes(), key=_key(event))


class Receiver:
    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url

    async def reset(self) -> None:
        async with self.session.post(f"{self.url}/reset") as response:
            response.raise_for_status()

    async def stats(self) -> dict[str, Any]:
        async with self.session.get(f"{self.url}/stats") as response:
            return dict(await response.json(loads=orjson.loads))

    async def until(self, count: int, within: float) -> dict[str, Any]:
        deadline = time.monotonic() + within
        while True:
            stats = await self.stats()
            if stats["distinct"] >= count:
                return stats
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {stats['distinct']} of {count} deliveries arrived")
            await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def _process(*args: str, env: dict[str, str]) -> AsyncIterator[int]:
    """The process runs while the block does; yields its pid."""
    process = await asyncio.create_subprocess_exec(*args, env=env, stderr=subprocess.DEVNULL)
    try:
        yield process.pid
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()


async def bare_ceiling(
    session: aiohttp.ClientSession, url: str, team: str, seconds: float
) -> dict[str, Any]:
    """The receiver driven by a plain client loop: no Kafka, no signing, no bookkeeping."""
    settle_heap()
    body = _event(team, "t0", 0).to_bytes()
    headers = {
        "content-type": "application/json",
        "webhook-id": "dlv_bare",
        "webhook-timestamp": str(int(time.time())),
        "webhook-signature": "v1," + "A" * 44,
    }
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                response.raise_for_status()
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return {"deliveries_per_second": round(done / (time.perf_counter() - started), 1)}


async def delivered_rate(
    receiver: Receiver,
    dispatchers: Dispatchers,
    producer: Any,
    topic: str,
    team: str,
    types: list[str],
    count: int,
    others: dict[str, int],
) -> dict[str, Any]:
    """Publish ``count`` events at once; rate measured at the receiver.

    The events are encoded before the clock starts and written in whole batches: the load
    generator shares the machine with the dispatchers, and the less it takes the more the
    figure describes them. What each process (``others``: the broker, the receiver, by pid)
    spent per delivery shows how the two cores were shared.
    """
    records = [
        (topic, _key(event), event.to_bytes())
        for event in (_event(team, types[n % len(types)], n) for n in range(count))
    ]
    settle_heap()
    await receiver.reset()
    others_before = {name: _cpu_seconds(pid) for name, pid in others.items()}
    cpu_before, started = dispatchers.cpu_seconds(), time.monotonic()
    await send_all(producer, records)
    stats = await receiver.until(count, within=max(120.0, count / 50))
    cpu_seconds = dispatchers.cpu_seconds() - cpu_before
    others_cpu = {name: _cpu_seconds(pid) - others_before[name] for name, pid in others.items()}
    window = stats["last"] - stats["first"]
    per_delivery = {"dispatchers": cpu_seconds, **others_cpu}
    return {
        "dispatcher_cpu_percent": round(cpu_seconds / (time.monotonic() - started) * 100),
        "deliveries_per_dispatcher_cpu_second": round(stats["count"] / cpu_seconds),
        "cpu_us_per_delivery": {
            name: round(seconds / stats["count"] * 1e6) for name, seconds in per_delivery.items()
        },
        "deliveries": stats["count"],
        "distinct": stats["distinct"],
        "seconds": round(window, 2),
        "deliveries_per_second": round((stats["count"] - 1) / window, 1),
    }


async def latency_at_rate(
    receiver: Receiver,
    dispatchers: Dispatchers,
    broker: EmbeddedBroker,
    producer: Any,
    topic: str,
    team: str,
    rate: float,
    seconds: float,
) -> dict[str, Any]:
    """Open loop: events stamped at their scheduled send time, latency taken on arrival.

    Also what a moderate flow costs: the dispatcher's and the broker's CPU meanwhile.
    """
    settle_heap()
    await receiver.reset()
    count = int(rate * seconds)
    assert broker.pid is not None
    dispatcher_cpu_before, broker_cpu_before = dispatchers.cpu_seconds(), _cpu_seconds(broker.pid)
    start = time.perf_counter()
    futures = []
    for number in range(count):
        delay = start + number / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        event = _event(team, "t0", number, stamped=True)
        futures.append(await _send(producer, topic, event))
    await asyncio.gather(*futures)
    stats = await receiver.until(count, within=60)
    elapsed = time.perf_counter() - start
    dispatcher_cpu = dispatchers.cpu_seconds() - dispatcher_cpu_before
    broker_cpu = _cpu_seconds(broker.pid) - broker_cpu_before
    latencies = sorted(stats["latencies_ms"])
    return {
        "rate": rate,
        "events": count,
        "dispatcher_cpu_percent": round(dispatcher_cpu / elapsed * 100),
        "broker_cpu_percent": round(broker_cpu / elapsed * 100),
        "p50_ms": round(_percentile(latencies, 0.50), 1),
        "p99_ms": round(_percentile(latencies, 0.99), 1),
        "max_ms": round(latencies[-1], 1),
    }


async def rss_with_pending_retries(
    session: aiohttp.ClientSession,
    dispatchers: Dispatchers,
    producer: Any,
    topic: str,
    team: str,
    count: int,
) -> dict[str, Any]:
    futures = []
    for number in range(count):
        event = _event(team, "fail", number)
        futures.append(await _send(producer, topic, event))
    await asyncio.gather(*futures)
    port = dispatchers.processes[0][1]
    deadline = time.monotonic() + max(120.0, count / 20)
    pending = 0.0
    while pending < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {pending:.0f} of {count} retries pending")
        await asyncio.sleep(0.5)
        pending = await _gauge(session, port, "retries_pending")
    return {
        "retries_pending": int(pending),
        "rss_mb": dispatchers.rss_mb()[0],
        "circuits_open": int(await _gauge(session, port, "circuits_open")),
    }


async def _create_webhooks(
    session: aiohttp.ClientSession,
    api: str,
    team: str,
    token: str,
    receiver_url: str,
    partitions: int,
) -> list[str]:
    """Webhooks filtered on object types; returns the types, one per deliveries partition."""
    headers = {"authorization": f"Bearer {token}"}
    hooks = f"{api}/v1/teams/{team}/webhooks"

    async def create(object_type: str, path: str) -> str:
        async with session.post(
            hooks,
            headers=headers,
            json={
                "name": object_type,
                "url": f"{receiver_url}/{path}/{object_type}",
                "topics": ["object.created"],
                "object_types": [object_type],
            },
        ) as response:
            if response.status != 201:
                raise RuntimeError(f"webhook not created: {await response.text()}")
            return str((await response.json())["id"])

    await create("fail", "fail")
    # One webhook per partition: a webhook whose id lands on a partition already taken is
    # deleted and another is created.
    taken: dict[int, str] = {}
    number = 0
    while len(taken) < partitions:
        object_type = f"t{number}"
        number += 1
        webhook_id = await create(object_type, "ok")
        partition = partition_of(webhook_id.encode(), partitions)
        if partition not in taken:
            taken[partition] = object_type
            continue
        async with session.delete(
            f"{hooks}/{webhook_id}", params={"force": "true"}, headers=headers
        ) as response:
            if response.status != 204:
                raise RuntimeError(f"webhook not deleted: {await response.text()}")
    return [taken[partition] for partition in sorted(taken)]


async def main(args: argparse.Namespace) -> dict[str, Any]:
    broker = EmbeddedBroker()
    broker.start()
    results: dict[str, Any] = {"benchmark": "dispatch", "events": args.events}
    try:
        await broker.wait_ready()
        with tempfile.TemporaryDirectory() as data_dir:
            env = _environment(data_dir, broker.bootstrap)
            settings = load_settings(kafka_bootstrap=broker.bootstrap)
            await ensure_topics(settings)
            _run(env, "migrate")
            user = _run(env, "admin", "create-user", "--email", "b@example.com", "--name", "B")
            team = _run(env, "admin", "create-team", "--name", "bench")
            _run(env, "admin", "add-member", "--user", user, "--team", team, "--role", "owner")
            token = _run(env, "admin", "create-token", "--user", user, "--name", "b").split()[1]
            receiver_port, auth_port, api_port = free_port(), free_port(), free_port()
            receiver_url = f"http://127.0.0.1:{receiver_port}"
            env.update(HOOKWIRE_AUTH_PORT=str(auth_port), HOOKWIRE_API_PORT=str(api_port))
            connector = aiohttp.TCPConnector(limit=0)
            async with (
                aiohttp.ClientSession(connector=connector) as session,
                _process(
                    sys.executable, "-m", "bench.receiver", str(receiver_port), env=env
                ) as receiver_pid,
            ):
                await _wait_healthy(session, receiver_url)
                async with (
                    _process(HOOKWIRE, "auth", env=env),
                    _process(HOOKWIRE, "api", env=env),
                ):
                    await _wait_healthy(session, f"http://127.0.0.1:{auth_port}")
                    await _wait_healthy(session, f"http://127.0.0.1:{api_port}")
                    spread = await _create_webhooks(
                        session,
                        f"http://127.0.0.1:{api_port}",
                        team,
                        token,
                        receiver_url,
                        settings.kafka_partitions,
                    )
                receiver = Receiver(session, receiver_url)
                producer = make_producer(settings, linger_ms=5, max_batch_size=262_144)
                await producer.start()
                dispatchers = Dispatchers(env, args.log_dir)
                assert broker.pid is not None
                others = {"broker": broker.pid, "receiver": receiver_pid, "load": os.getpid()}
                try:
                    bare_url = f"{receiver_url}/ok/bare"
                    _log("bare client ceiling")
                    await bare_ceiling(session, bare_url, team, 1.0)
                    ceiling_before = await bare_ceiling(session, bare_url, team, args.seconds)
                    topic = await dispatchers.start(session, 1)
                    _log("one dispatcher, one webhook")
                    await delivered_rate(
                        receiver, dispatchers, producer, topic, team, ["t0"], 500, others
                    )
                    one = await delivered_rate(
                        receiver, dispatchers, producer, topic, team, ["t0"], args.events, others
                    )
                    _log(f"latency at {args.rate:.0f}/s")
                    latency = await latency_at_rate(
                        receiver,
                        dispatchers,
                        broker,
                        producer,
                        topic,
                        team,
                        args.rate,
                        args.seconds,
                    )
                    rss_after = dispatchers.rss_mb()
                    await dispatchers.stop()
                    _log("bare client ceiling again")
                    ceiling_after = await bare_ceiling(session, bare_url, team, args.seconds)
                    spread_runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
                    for count in (1, 2, 1):
                        _log(f"{count} dispatcher(s), {len(spread)} webhooks")
                        topic = await dispatchers.start(session, count)
                        spread_runs[count].append(
                            await delivered_rate(
                                receiver,
                                dispatchers,
                                producer,
                                topic,
                                team,
                                spread,
                                args.events,
                                others,
                            )
                        )
                        await dispatchers.stop()
                    _log("10,000 deliveries pending retry")
                    topic = await dispatchers.start(session, 1)
                    pending = await rss_with_pending_retries(
                        session, dispatchers, producer, topic, team, args.pending
                    )
                finally:
                    await dispatchers.stop()
                    await producer.stop()
    finally:
        broker.stop()
    # The machine's speed drifts (it is shared): each figure is compared with the mean of
    # its reference measured just before and just after it.
    ceiling = _mean_rate([ceiling_before, ceiling_after])
    one_spread = _mean_rate(spread_runs[1])
    (two_spread,) = spread_runs[2]
    results.update(
        concurrency_per_endpoint=CONCURRENCY,
        bare_client={"deliveries_per_second": ceiling, "runs": [ceiling_before, ceiling_after]},
        one_dispatcher=one,
        ratio_to_bare=round(one["deliveries_per_second"] / ceiling, 2),
        webhooks_spread=len(spread),
        one_dispatcher_spread={"deliveries_per_second": one_spread, "runs": spread_runs[1]},
        two_dispatchers_spread=two_spread,
        two_to_one=round(two_spread["deliveries_per_second"] / one_spread, 2),
        latency=latency,
        rss_mb_after_throughput=rss_after[0],
        stop_seconds=dispatchers.stop_seconds,
        pending_retries=pending,
        targets={
            "ratio_to_bare": 0.6,
            "two_to_one": 1.6,
            "p99_ms_at_200_per_second": 100,
            "rss_mb_with_10000_pending": 200,
        },
        python=platform.python_version(),
        cpu_count=os.cpu_count(),
    )
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--pending", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--log-dir", type=Path, help="keep each dispatcher's log here")
    arguments = parser.parse_args()
    if arguments.quick:
        arguments.events, arguments.pending, arguments.seconds = 2_000, 1_000, 2.0
    # The bare client runs on the dispatcher's event loop (uvloop when installed): a fair ceiling.
    print(orjson.dumps(run(main(arguments)), option=orjson.OPT_INDENT_2).decode())
