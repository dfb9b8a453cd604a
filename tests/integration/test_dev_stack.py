"""`hookwire dev` (what `make run` starts): bootstrap, the printed example, clean shutdown."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

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
    assert tokens[0] != tokens[1]


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
        if process.poll() is None:
            process.kill()
            process.wait()
        assert process.stdout is not None
        process.stdout.close()
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
