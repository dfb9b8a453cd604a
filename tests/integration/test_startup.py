"""Start-up failures end in one clear line naming what and where, never a traceback."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaTimeoutError
from sqlalchemy.engine import make_url

from services.shared import (
    RETRY_RETENTION_MS,
    RETRY_TIERS,
    DependencyUnavailable,
    EmbeddedBroker,
    ensure_topics,
    free_port,
    load_settings,
    migrate,
    topic_layout,
)
from tests.conftest import POSTGRES_DSN, drop_topics

HOOKWIRE = str(Path(sys.executable).parent / "hookwire")


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOOKWIRE_")}
    env.update(
        HOOKWIRE_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}",
        HOOKWIRE_SERVICE_CREDENTIAL="cred",
        HOOKWIRE_TOKEN_PEPPER="pepper",
        HOOKWIRE_API_PORT=str(free_port()),
        HOOKWIRE_AUTH_PORT=str(free_port()),
        HOOKWIRE_DISPATCHER_PORT=str(free_port()),
        HOOKWIRE_LOG_FORMAT="json",
    )
    env.update(extra)
    return env


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [HOOKWIRE, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def _assert_clean_failure(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.fixture
def migrated(tmp_path: Path) -> Path:
    asyncio.run(migrate(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}"))
    return tmp_path


@pytest.mark.parametrize("service", ["api", "dispatcher"])
def test_unreachable_broker_is_named(migrated: Path, service: str) -> None:
    """A service that needs Kafka exits naming the bootstrap address it could not reach."""
    address = f"127.0.0.1:{free_port()}"
    result = _run([service], _env(migrated, HOOKWIRE_KAFKA_BOOTSTRAP=address))
    _assert_clean_failure(result, "Kafka is unreachable", address)


@pytest.mark.parametrize("service", ["auth", "api", "dispatcher"])
def test_unmigrated_database_is_refused(tmp_path: Path, service: str) -> None:
    """Services refuse an unmigrated database and say what to run."""
    result = _run([service], _env(tmp_path, HOOKWIRE_KAFKA_BOOTSTRAP="127.0.0.1:1"))
    _assert_clean_failure(result, "hookwire migrate")


def test_unreachable_database_is_named(tmp_path: Path) -> None:
    """An unreachable PostgreSQL is named with its URL, password hidden."""
    port = free_port()
    url = f"postgresql+asyncpg://hw:topsecret@127.0.0.1:{port}/hw"
    result = _run(["auth"], _env(tmp_path, HOOKWIRE_DATABASE_URL=url))
    _assert_clean_failure(result, "unreachable", f"127.0.0.1:{port}")
    assert "topsecret" not in result.stderr
    migrate_result = _run(["migrate"], _env(tmp_path, HOOKWIRE_DATABASE_URL=url))
    _assert_clean_failure(migrate_result, "unreachable", f"127.0.0.1:{port}")


if POSTGRES_DSN:
    # Only a server can refuse: SQLite has none.

    def test_a_database_that_refuses_the_connection_is_not_called_unreachable(
        tmp_path: Path,
    ) -> None:
        """A server that answers with a refusal (here: no such database) is named as
        such, in one line: not "unreachable", and without SQLAlchemy's pointer to its
        own docs."""
        assert POSTGRES_DSN is not None
        url = str(make_url(POSTGRES_DSN).set(database=f"no_such_{uuid.uuid4().hex[:8]}"))
        for command in (["auth"], ["migrate"]):
            result = _run(command, _env(tmp_path, HOOKWIRE_DATABASE_URL=url))
            _assert_clean_failure(result, "refused the connection", "does not exist")
            assert "unreachable" not in result.stderr
            assert "sqlalche.me" not in result.stderr


@pytest.mark.parametrize(
    ("service", "setting"),
    [
        ("auth", "HOOKWIRE_AUTH_PORT"),
        ("api", "HOOKWIRE_API_PORT"),
        ("dispatcher", "HOOKWIRE_DISPATCHER_PORT"),
    ],
)
def test_a_port_taken_ends_the_start_before_kafka(
    migrated: Path, service: str, setting: str
) -> None:
    """Found before any Kafka client starts (a process about to exit would join its
    consumer groups and make them rebalance): with the broker unreachable too, the port
    is what the start names."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = str(taken.getsockname()[1])
        env = _env(migrated, HOOKWIRE_KAFKA_BOOTSTRAP=f"127.0.0.1:{free_port()}", **{setting: port})
        result = _run([service], env)
    finally:
        taken.close()
    _assert_clean_failure(result, f"cannot listen on 127.0.0.1:{port}", f"set {setting}")
    assert "Kafka" not in result.stderr


def test_a_host_that_cannot_be_listened_on_names_the_host_setting(migrated: Path) -> None:
    result = _run(["auth"], _env(migrated, HOOKWIRE_HOST="999.1.1.1"))
    _assert_clean_failure(result, "cannot listen on 999.1.1.1", "check HOOKWIRE_HOST")
    assert "_PORT" not in result.stderr


def test_migrate_leaves_a_database_a_newer_release_migrated(migrated: Path) -> None:
    """After a rollback the database is at a migration this release does not know: the
    migration step succeeds and says so (the services run on it), rather than failing
    and keeping every service that waits for it down."""
    with sqlite3.connect(migrated / "db.sqlite") as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999_newer'")
    result = _run(["migrate"], _env(migrated))
    assert result.returncode == 0, result.stderr
    assert "at migration 9999_newer, which a newer release applied" in result.stdout


def test_a_failed_migration_is_not_called_unreachable(tmp_path: Path) -> None:
    """The database answers but a migration fails (here: a table in its way): the line
    says the migration failed and why, not that the database is unreachable."""
    with sqlite3.connect(tmp_path / "db.sqlite") as conn:
        conn.execute("CREATE TABLE users (id TEXT)")
    result = _run(["migrate"], _env(tmp_path))
    _assert_clean_failure(result, "migrating the database at", "from none failed", "users")
    assert "unreachable" not in result.stderr


def test_bad_setting_is_named(tmp_path: Path) -> None:
    """A bad value stops the process with the variable's name."""
    result = _run(["api"], _env(tmp_path, HOOKWIRE_API_PORT="eighty"))
    _assert_clean_failure(result, "HOOKWIRE_API_PORT")


def test_missing_secret_is_named(migrated: Path) -> None:
    """Outside dev mode the token pepper has no default."""
    env = _env(migrated)
    del env["HOOKWIRE_TOKEN_PEPPER"]
    _assert_clean_failure(_run(["auth"], env), "HOOKWIRE_TOKEN_PEPPER")


def test_admin_bootstrap_from_the_command_line(tmp_path: Path) -> None:
    """migrate, then create a user, a team, a membership and a token; unknown permissions fail."""
    env = _env(tmp_path)
    assert _run(["migrate"], env).returncode == 0
    user = _run(["admin", "create-user", "--email", "a@example.com", "--name", "A"], env)
    user_id = user.stdout.strip()
    assert user_id.startswith("usr_")
    again = _run(["admin", "create-user", "--email", "a@example.com", "--name", "A"], env)
    assert again.stdout.strip() == user_id
    team_id = _run(["admin", "create-team", "--name", "acme"], env).stdout.strip()
    assert team_id.startswith("team_")
    member = _run(
        ["admin", "add-member", "--user", user_id, "--team", team_id, "--role", "admin"], env
    )
    assert member.returncode == 0
    token = _run(
        ["admin", "create-token", "--user", user_id, "--name", "ci", "--permission", "object:read"],
        env,
    )
    token_id, plaintext = token.stdout.split()
    assert token_id.startswith("tok_")
    assert plaintext.startswith("hwk_")
    duplicate = _run(["admin", "create-token", "--user", user_id, "--name", "ci"], env)
    _assert_clean_failure(duplicate, "already exists")
    unknown = _run(
        ["admin", "create-token", "--user", user_id, "--name", "x", "--permission", "object:nuke"],
        env,
    )
    _assert_clean_failure(unknown, "object:nuke")
    nobody = _run(["admin", "create-token", "--user", "usr_nobody", "--name", "ci"], env)
    _assert_clean_failure(nobody, "user usr_nobody not found")
    stranger = _run(["admin", "add-member", "--user", "usr_nobody", "--team", team_id], env)
    _assert_clean_failure(stranger, "usr_nobody")
    listed = _run(["admin", "list-tokens", "--user", user_id], env).stdout
    assert token_id in listed
    assert "active" in listed
    assert plaintext not in listed
    revoked = _run(["admin", "revoke-token", "--token", token_id], env)
    assert revoked.returncode == 0
    assert "revoked" in revoked.stdout
    assert "revoked" in _run(["admin", "list-tokens", "--user", user_id], env).stdout
    _assert_clean_failure(_run(["admin", "revoke-token", "--token", "tok_nope"], env), "tok_nope")
    _assert_clean_failure(_run(["admin", "list-tokens", "--user", "usr_typo"], env), "usr_typo")
    # What the api would refuse is refused here too, naming the option (exit 2), rather
    # than stored (SQLite) or a database error (PostgreSQL).
    for option, bad in (
        ("--email", ["create-user", "--email", "", "--name", "B"]),
        ("--email", ["create-user", "--email", "not-an-email", "--name", "B"]),
        ("--email", ["create-user", "--email", f"{'b' * 320}@example.com", "--name", "B"]),
        ("--name", ["create-user", "--email", "b@example.com", "--name", "  "]),
        ("--name", ["create-team", "--name", "t" * 201]),
        ("--name", ["create-token", "--user", user_id, "--name", ""]),
        ("--name", ["create-token", "--user", user_id, "--name", "n" * 201]),
    ):
        refused = _run(["admin", *bad], env)
        _assert_clean_failure(refused, f"Invalid value for '{option}'")
        assert refused.returncode == 2, bad
    shape = _run(["admin", "create-user", "--email", "nope", "--name", "B"], env)
    assert "must be an address like name@example.com" in shape.stderr
    with sqlite3.connect(tmp_path / "db.sqlite") as db:
        [(users,)] = db.execute("SELECT count(*) FROM users")
        [(teams,)] = db.execute("SELECT count(*) FROM teams")
    assert (users, teams) == (1, 1)
    spaced = _run(["admin", "create-team", "--name", "  beta  "], env)
    assert spaced.returncode == 0, spaced.stderr
    with sqlite3.connect(tmp_path / "db.sqlite") as db:
        assert db.execute("SELECT 1 FROM teams WHERE name = 'beta'").fetchall() == [(1,)]
    # A maximum lifetime binds the command line as it binds the api.
    bounded = {**env, "HOOKWIRE_TOKEN_MAX_LIFETIME_DAYS": "30"}
    for extra in ([], ["--expires-in-days", "31"]):
        refused = _run(["admin", "create-token", "--user", user_id, "--name", "b", *extra], bounded)
        _assert_clean_failure(refused, "--expires-in-days of at most 30")
        assert refused.returncode == 2
    # A date past any calendar: refused as a usage error, not a traceback.
    absurd = ["admin", "create-token", "--user", user_id, "--name", "c", "--expires-in-days"]
    _assert_clean_failure(_run([*absurd, "3000000"], env), "--expires-in-days")
    made = _run(
        ["admin", "create-token", "--user", user_id, "--name", "b", "--expires-in-days", "30"],
        bounded,
    )
    assert made.returncode == 0, made.stderr
    bounded_id = made.stdout.split()[0]
    with sqlite3.connect(tmp_path / "db.sqlite") as db:
        [(expires_at,)] = db.execute("SELECT expires_at FROM tokens WHERE id = ?", (bounded_id,))
    days_left = (datetime.fromisoformat(expires_at).replace(tzinfo=UTC) - datetime.now(UTC)).days
    assert days_left in (29, 30), expires_at


def _log_until(process: subprocess.Popen[str], marker: str, within: float) -> str:
    """What the process has logged, read straight from the pipe (nothing left in a
    buffer ``communicate`` would not see), once it holds ``marker``."""
    assert process.stderr is not None
    fd = process.stderr.fileno()
    chunks: list[bytes] = []
    seen = threading.Event()

    def read() -> None:
        while marker.encode() not in b"".join(chunks):
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            chunks.append(chunk)
        seen.set()

    threading.Thread(target=read, daemon=True).start()
    assert seen.wait(within), f"no {marker} line: {b''.join(chunks).decode()}"
    return b"".join(chunks).decode()


@pytest.mark.parametrize("service", ["api", "dispatcher"])
def test_sigterm_while_starting_stops_the_service(migrated: Path, service: str) -> None:
    """A broker that accepts connections and never answers holds start-up; SIGTERM still
    ends the process at once and cleanly."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    address = f"127.0.0.1:{silent.getsockname()[1]}"
    try:
        process = subprocess.Popen(
            [HOOKWIRE, service],
            env=_env(migrated, HOOKWIRE_KAFKA_BOOTSTRAP=address),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # Signalled once it listens for signals (a loaded machine may take seconds to
        # import everything), and while its start waits on the broker.
        logged = _log_until(process, "services_starting", within=60)
        time.sleep(0.5)
        assert process.poll() is None, "still starting against a silent broker"
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=20)
        stderr = logged + rest
        # Against the minute a start waits for a silent broker; interpreter exit included.
        assert time.monotonic() - signalled < 10, "stopped promptly"
        assert process.returncode == 0, stderr
        assert "stopped_while_starting" in stderr
        assert "Traceback" not in stderr
    finally:
        silent.close()


def test_topics_are_created_from_the_command_line(tmp_path: Path, broker: EmbeddedBroker) -> None:
    """`hookwire topics` creates every topic of the layout, is safe to run again, and
    names an unreachable broker."""
    prefix = f"t{uuid.uuid4().hex[:10]}."
    env = _env(tmp_path, HOOKWIRE_KAFKA_BOOTSTRAP=broker.bootstrap, HOOKWIRE_TOPIC_PREFIX=prefix)
    try:
        wanted = set(topic_layout(load_settings(topic_prefix=prefix)))
        created = _run(["topics"], env)
        assert created.returncode == 0, created.stderr
        assert created.stdout.strip() == (
            f"created {len(wanted)} topics: {', '.join(sorted(wanted))}"
        )
        again = _run(["topics"], env)
        assert again.returncode == 0, again.stderr
        assert again.stdout.strip() == "topics are in place: none was missing"
        assert wanted == asyncio.run(_topics_named(broker.bootstrap, prefix))
        # A retry may wait up to 30 days, doubled by the largest jitter: its topic keeps it
        # past that, whatever the broker's default (7 days on Kafka); the others keep the
        # broker's.
        retention = asyncio.run(_retention_ms(broker.bootstrap, sorted(wanted)))
        retry_topics = {name for name in wanted if ".retry." in name}
        assert len(retry_topics) == RETRY_TIERS
        for name in retry_topics:
            assert retention[name] == RETRY_RETENTION_MS > 60 * 86400 * 1000
        assert retention[f"{prefix}events"] != RETRY_RETENTION_MS
    finally:
        asyncio.run(drop_topics(broker.bootstrap, prefix))
    address = f"127.0.0.1:{free_port()}"
    unreachable = _run(["topics"], _env(tmp_path, HOOKWIRE_KAFKA_BOOTSTRAP=address))
    _assert_clean_failure(unreachable, "Kafka is unreachable", address)


@pytest.mark.parametrize("service", ["auth", "api", "dispatcher"])
def test_a_service_refuses_a_cluster_without_its_topics_and_creates_none(
    migrated: Path, broker: EmbeddedBroker, service: str
) -> None:
    """Started before `hookwire topics`, a service says what to run and exits. Asking
    for a missing topic by name would have the broker create it with its own defaults
    (the wrong partitions, no retention for the retry topics), which `hookwire topics`
    then leaves as it is."""
    prefix = f"t{uuid.uuid4().hex[:10]}."
    env = _env(migrated, HOOKWIRE_KAFKA_BOOTSTRAP=broker.bootstrap, HOOKWIRE_TOPIC_PREFIX=prefix)
    try:
        result = _run([service], env)
        _assert_clean_failure(result, f"has no topic {prefix}", "run `hookwire topics` first")
        assert asyncio.run(_topics_named(broker.bootstrap, prefix)) == set()
    finally:
        asyncio.run(drop_topics(broker.bootstrap, prefix))


def test_an_admin_change_before_the_topics_exist_creates_none(
    migrated: Path, broker: EmbeddedBroker
) -> None:
    """`hookwire admin revoke-token` run before `hookwire topics` revokes the key and says
    why running services were not told; its change record would have had the broker
    create `changes` with its own partition count, which `hookwire topics` keeps."""
    prefix = f"t{uuid.uuid4().hex[:10]}."
    env = _env(migrated, HOOKWIRE_KAFKA_BOOTSTRAP=broker.bootstrap, HOOKWIRE_TOPIC_PREFIX=prefix)
    try:
        user_id = _run(
            ["admin", "create-user", "--email", "a@example.com", "--name", "A"], env
        ).stdout.strip()
        created = _run(["admin", "create-token", "--user", user_id, "--name", "ci"], env)
        token_id = created.stdout.split()[0]
        revoked = _run(["admin", "revoke-token", "--token", token_id], env)
        assert revoked.returncode == 0, revoked.stderr
        assert f"{token_id} revoked (services not told (" in revoked.stdout
        assert f"has no topic {prefix}changes" in revoked.stdout
        assert "run `hookwire topics` first" in revoked.stdout
        assert "revoked" in _run(["admin", "list-tokens", "--user", user_id], env).stdout
        assert asyncio.run(_topics_named(broker.bootstrap, prefix)) == set()
    finally:
        asyncio.run(drop_topics(broker.bootstrap, prefix))


def test_topics_with_other_partitions_are_named(tmp_path: Path, broker: EmbeddedBroker) -> None:
    """`hookwire topics` leaves an existing topic as it is, and warns when its partitions
    are not what the settings ask for."""
    prefix = f"t{uuid.uuid4().hex[:10]}."
    env = _env(tmp_path, HOOKWIRE_KAFKA_BOOTSTRAP=broker.bootstrap, HOOKWIRE_TOPIC_PREFIX=prefix)
    try:
        assert _run(["topics"], env).returncode == 0
        wider = _run(["topics"], {**env, "HOOKWIRE_KAFKA_PARTITIONS": "8"})
        assert wider.returncode == 0, wider.stderr
        assert f"warning: {prefix}events has 6 partitions, not 8" in wider.stderr
        assert f"{prefix}changes" not in wider.stderr, "one partition whatever the setting"
    finally:
        asyncio.run(drop_topics(broker.bootstrap, prefix))


async def _retention_ms(bootstrap: str, names: list[str]) -> dict[str, int | None]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        answers = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, name) for name in names]
        )
    finally:
        await admin.close()
    retention: dict[str, int | None] = {}
    for answer in answers:
        for _, _, _, name, entries in answer.resources:
            values = {entry[0]: entry[1] for entry in entries}
            value = values.get("retention.ms")
            retention[name] = None if value is None else int(value)
    return retention


async def _topics_named(bootstrap: str, prefix: str) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        return {name for name in await admin.list_topics() if name.startswith(prefix)}
    finally:
        await admin.close()


@pytest.mark.parametrize("apart", [2.0, 0.0], ids=["seconds_apart", "together"])
def test_a_second_stop_signal_ends_the_process_at_once(
    migrated: Path, broker: EmbeddedBroker, apart: float
) -> None:
    """Auth keeps answering for its stop delay after SIGTERM; a second signal a moment
    later ends it at once, saying so, with the status a shell gives a process SIGTERM
    ended (143). Two copies of one stop arriving together (a process group's signal and
    the one `make` passes on) are one stop."""
    prefix = f"t{uuid.uuid4().hex[:10]}."
    env = _env(
        migrated,
        HOOKWIRE_KAFKA_BOOTSTRAP=broker.bootstrap,
        HOOKWIRE_TOPIC_PREFIX=prefix,
        HOOKWIRE_STOP_DELAY_SECONDS="30" if apart else "2",
    )
    assert _run(["topics"], env).returncode == 0
    process = None
    try:
        process = subprocess.Popen(
            [HOOKWIRE, "auth"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        health = f"http://127.0.0.1:{env['HOOKWIRE_AUTH_PORT']}/healthz"
        deadline = time.monotonic() + 30
        while not _answers(health):
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "auth never started"
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        time.sleep(apart)
        assert process.poll() is None, "still answering through its stop delay"
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
        if apart:
            assert time.monotonic() - signalled < 10, "forced, not the 30 s stop delay"
            assert process.returncode == 128 + signal.SIGTERM, stderr
            assert "stop_forced" in stderr
        else:
            assert time.monotonic() - signalled >= 1.5, "the stop delay was kept"
            assert process.returncode == 0, stderr
            assert "stop_forced" not in stderr
    finally:
        if process is not None and process.poll() is None:
            process.kill()
        asyncio.run(drop_topics(broker.bootstrap, prefix))


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - built here
            return bool(response.status == 200)
    except OSError:
        return False


async def test_a_topic_creation_the_broker_does_not_answer_is_one_clear_error(
    broker: EmbeddedBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker answered the start, then not the creation (a timeout, seen on a busy
    cluster): a dependency error naming the broker, which the command prints in one line."""

    async def times_out(self: AIOKafkaAdminClient, *args: object, **kwargs: object) -> None:
        raise KafkaTimeoutError("no answer in 10 s")

    monkeypatch.setattr(AIOKafkaAdminClient, "create_topics", times_out)
    settings = load_settings(kafka_bootstrap=broker.bootstrap, topic_prefix="t_unused.")
    with pytest.raises(DependencyUnavailable) as failed:
        await ensure_topics(settings)
    assert failed.value.message == (
        f"could not create Kafka topics at {broker.bootstrap}: KafkaTimeoutError: no answer in 10 s"
    )
