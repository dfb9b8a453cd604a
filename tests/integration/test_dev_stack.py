"""`hookwire dev` (what `make run` starts): bootstrap, the printed example, clean shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from services.devstack import SampleReceiver
from services.shared import free_port
from tests.integration.test_end_to_end import standard_webhooks_verify

HOOKWIRE = str(Path(sys.executable).parent / "hookwire")


def _children(pid: int) -> list[int]:
    found = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False
    )
    return [int(line) for line in found.stdout.split()]


def _start(
    tmp_path: Path, env: dict[str, str], *, own_group: bool = False
) -> subprocess.Popen[str]:
    # The banner goes to stdout, the services' log lines to stderr.
    with (tmp_path / "dev.log").open("w") as log:
        return subprocess.Popen(
            [HOOKWIRE, "dev"],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            # As a terminal runs it: a Ctrl-C goes to every process of the group.
            process_group=0 if own_group else None,
        )


def _dev_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOOKWIRE_")}
    env.update(
        HOOKWIRE_API_PORT=str(free_port()),
        HOOKWIRE_AUTH_PORT=str(free_port()),
        HOOKWIRE_DISPATCHER_PORT=str(free_port()),
        HOOKWIRE_DEV_RECEIVER_PORT=str(free_port()),
        HOOKWIRE_DEV_BROKER_PORT=str(free_port()),
        HOOKWIRE_DATA_DIR="state",
    )
    return env


def _errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if '"level":"error"' in line]


def _wait_for_banner(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    lines = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.strip().startswith("curl -s http"):
            return "".join(lines)
    pytest.fail("hookwire dev never printed its example:\n" + "".join(lines))


def _stop(process: subprocess.Popen[str]) -> float:
    children = _children(process.pid)
    assert children, "the embedded broker runs as a child"
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=15)
    elapsed = time.monotonic() - started
    time.sleep(0.2)
    for child in children:
        with pytest.raises(ProcessLookupError):
            os.kill(child, 0)
    return elapsed


def test_dev_runs_the_printed_example_and_stops_cleanly(tmp_path: Path) -> None:
    """The banner's example, run verbatim by a shell, produces a signed delivery; SIGTERM
    stops everything within seconds with no child left; a second start works. A healthy
    start logs no error (a first run should not look broken)."""
    env = _dev_env()
    tokens = []
    for _ in range(2):
        process = _start(tmp_path, env)
        try:
            banner = _wait_for_banner(process)
            log = (tmp_path / "dev.log").read_text()
            assert "service_started" in log
            assert _errors(log) == []
            dev_file = tmp_path / "state" / "dev.json"
            assert "(saved to state/dev.json)" in banner
            assert stat.S_IMODE(dev_file.stat().st_mode) == 0o600
            info = orjson.loads(dev_file.read_bytes())
            assert set(info) >= {"token", "team_id", "api_url", "auth_url"}
            assert info["token"] in banner
            # Where a producer of the user's writes events: the embedded broker, reachable.
            assert f"kafka       {info['kafka_bootstrap']}" in banner
            # On the port asked for: a port range of the user's holds it.
            assert info["kafka_bootstrap"] == f"127.0.0.1:{env['HOOKWIRE_DEV_BROKER_PORT']}"
            assert info["events_topic"] in asyncio.run(_topics_at(info["kafka_bootstrap"]))
            tokens.append(info["token"])
            example = banner.split("Try it:", 1)[1]
            shell = subprocess.run(
                ["bash", "-c", "set -e\n" + example],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert shell.returncode == 0, shell.stderr
            received = orjson.loads(shell.stdout[shell.stdout.rindex("[{") :])
            # What came is shown whole: the signature checks out with the webhook's secret.
            # The second start keeps the first one's webhook (same state), whose delivery
            # of the same event may arrive last: the example's is the one its secret signs.
            created, _ = json.JSONDecoder().raw_decode(shell.stdout)
            [ours] = [
                got
                for got in received
                if standard_webhooks_verify(
                    created["secret"], got["headers"], got["raw_body"].encode()
                )
            ]
            assert ours["headers"]["webhook-signature"].startswith("v1,")
            assert ours["body"]["type"] == "object.created"
            assert ours["body"]["data"] == {"email": "ada@example.com"}
        finally:
            if process.poll() is None:
                assert _stop(process) < 10
            assert process.stdout is not None
            process.stdout.close()
        assert process.returncode == 0
        # The log says the stop finished, not only that it began.
        last = orjson.loads((tmp_path / "dev.log").read_text().strip().splitlines()[-1])
        assert last["event"] == "services_stopped"
    assert tokens[0] != tokens[1]


async def _topics_at(bootstrap: str) -> set[str]:
    client = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await client.start()
    try:
        return set(await client.list_topics())
    finally:
        await client.close()


def _ended(process: subprocess.Popen[str]) -> None:
    """A stack a test leaves: killed if it still runs, its output pipe closed."""
    if process.poll() is None:
        process.kill()
        process.wait()
    assert process.stdout is not None
    process.stdout.close()


@contextlib.contextmanager
def _slow_receiver(answer_after: float) -> Iterator[tuple[str, threading.Event]]:
    """A webhook endpoint answering 200 ``answer_after`` seconds after a POST came (the
    event is set as it comes): a delivery stays in flight that long."""
    came = threading.Event()

    class Slow(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            came.set()
            time.sleep(answer_after)
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass  # pytest shows the test's own output only

    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", came
    finally:
        server.shutdown()
        server.server_close()


def _post(url: str, token: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(  # noqa: S310 - the dev stack's own URL
        url,
        data=orjson.dumps(body),
        headers={"Authorization": f"Bearer {token}", "content-type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        answer: dict[str, Any] = orjson.loads(response.read())
        return answer


def test_a_delivery_finishing_during_the_stop_reaches_the_delivery_log(tmp_path: Path) -> None:
    """SIGTERM while a delivery is in flight: the dispatcher drains it and publishes its
    attempt, and the api writes it to the delivery log before it stops. The embedded
    broker forgets it at the stop, so an attempt the api had not read yet was lost."""
    with _slow_receiver(answer_after=3.0) as (url, came):
        process = _start(tmp_path, _dev_env())
        try:
            _wait_for_banner(process)
            info = orjson.loads((tmp_path / "state" / "dev.json").read_bytes())
            team = f"{info['api_url']}/v1/teams/{info['team_id']}"
            hook = {"name": "slow", "url": url, "topics": ["object.created"]}
            _post(f"{team}/webhooks", info["token"], hook)
            time.sleep(1)  # as the printed example does: the dispatcher hears of the webhook
            _post(f"{team}/objects/contact", info["token"], {"email": "ada@example.com"})
            assert came.wait(20), "the delivery never reached the receiver"
            assert _stop(process) < 12
        finally:
            _ended(process)
    assert process.returncode == 0
    log = (tmp_path / "dev.log").read_text()
    assert _errors(log) == []
    with contextlib.closing(sqlite3.connect(tmp_path / "state" / "hookwire.db")) as db:
        attempts = db.execute("SELECT outcome, status_code FROM delivery_attempts").fetchall()
    assert attempts == [("delivered", 200)]


def test_ctrl_c_stops_the_services_before_the_broker(tmp_path: Path) -> None:
    """A terminal's Ctrl-C reaches every process of its group. The services must stop
    while the broker still answers: a broker that died first made every Kafka client log
    errors on the way out."""
    process = _start(tmp_path, _dev_env(), own_group=True)
    try:
        _wait_for_banner(process)
        children = _children(process.pid)
        started = time.monotonic()
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=15)
        assert time.monotonic() - started < 10
        time.sleep(0.2)
        for child in children:
            with pytest.raises(ProcessLookupError):
                os.kill(child, 0)
    finally:
        _ended(process)
    assert process.returncode == 0
    log = (tmp_path / "dev.log").read_text()
    assert "shutting_down" in log
    assert _errors(log) == []


def test_a_second_stack_on_the_same_directory_is_refused_before_touching_it(
    tmp_path: Path,
) -> None:
    """One stack holds the directory (here: its lock, held by the test); a second one
    exits at once naming the directory, and leaves the first one's token file alone (it
    used to replace the dev token, then fail on the ports)."""
    state = tmp_path / "state"
    state.mkdir()
    saved = state / "dev.json"
    saved.write_text('{"token": "the first stack\'s"}')
    with (state / "dev.lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        refused = subprocess.run(
            [HOOKWIRE, "dev"],
            env=_dev_env(),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert refused.returncode == 1
    assert "another `hookwire dev` (make run) is using" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert saved.read_text() == '{"token": "the first stack\'s"}'
    assert not (state / "hookwire.db").exists()


def test_a_broker_that_dies_stops_the_stack_with_an_error(tmp_path: Path) -> None:
    """The embedded broker killed under a running stack (kill -9, the OOM killer): it
    says so and stops everything with a failing exit, rather than running on for ever
    against a broker that is gone."""
    process = _start(tmp_path, _dev_env())
    try:
        _wait_for_banner(process)
        [broker] = _children(process.pid)
        os.kill(broker, signal.SIGKILL)
        process.wait(timeout=20)
    finally:
        _ended(process)
    assert process.returncode == 1
    log = (tmp_path / "dev.log").read_text()
    exited = [json.loads(line) for line in _errors(log) if "embedded_broker_exited" in line]
    assert [(line["exit_code"], line["signal"]) for line in exited] == [(-9, "SIGKILL")]
    assert "error: the embedded broker exited (code -9)" in log
    assert "Traceback" not in log


def test_every_port_taken_is_named_at_once_before_anything_starts(tmp_path: Path) -> None:
    """A second stack (another data directory, the same ports) names every port it cannot
    have and its setting in one message, before it starts anything: it used to fail on
    the first, and the user found the others one run at a time."""
    env = _dev_env()
    held = []
    try:
        for setting in (
            "HOOKWIRE_DEV_RECEIVER_PORT",
            "HOOKWIRE_API_PORT",
            "HOOKWIRE_DEV_BROKER_PORT",
        ):
            sock = socket.socket()
            held.append(sock)
            sock.bind(("127.0.0.1", int(env[setting])))
            sock.listen()
        refused = subprocess.run(
            [HOOKWIRE, "dev"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        for sock in held:
            sock.close()
    assert refused.returncode == 1
    [message] = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    for setting in ("HOOKWIRE_DEV_RECEIVER_PORT", "HOOKWIRE_API_PORT", "HOOKWIRE_DEV_BROKER_PORT"):
        assert f"{env[setting]} ({setting}: " in message
    for free in ("HOOKWIRE_AUTH_PORT", "HOOKWIRE_DISPATCHER_PORT"):
        assert free not in message
    assert "Traceback" not in refused.stderr
    assert not (tmp_path / "state" / "hookwire.db").exists()


async def test_the_sample_receiver_masks_credentials_and_keeps_any_body() -> None:
    """Its page answers anyone who can reach it: a webhook's own credential headers are
    masked as the api shows them, hookwire's (the signature) are not; a body that is not
    JSON is kept as it came rather than failing the request."""
    receiver = SampleReceiver("127.0.0.1", free_port())
    await receiver.start()
    try:
        base = f"http://127.0.0.1:{receiver.port}"
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{base}/hook",
                data=b"not json",
                headers={"Authorization": "Bearer s3cret", "webhook-signature": "v1,abc"},
            ) as response:
                assert response.status == 204
            async with session.get(f"{base}/received") as response:
                [got] = await response.json()
    finally:
        await receiver.stop()
    assert got["headers"]["authorization"] == "[redacted]"
    assert got["headers"]["webhook-signature"] == "v1,abc"
    assert (got["body"], got["raw_body"]) == (None, "not json")
