"""The one typed settings object, read from ``HOOKWIRE_*`` environment variables."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    IPvAnyNetwork,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from yarl import URL

from ._errors import ConfigurationError

# The longest an access token may be issued for. Tokens issued before the setting was
# lowered keep their lifetime, so whatever must outlive every token left (the list of
# ended keys) is measured against this, not against the setting in force.
ACCESS_TOKEN_TTL_MAX = 86400

_TRUE = {"true", "1"}
_FALSE = {"false", "0"}


def _strict_bool(value: object) -> object:
    # "yes", "on" and typos silently meaning False cause outages; accept only the unambiguous.
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError("must be true, false, 1 or 0 (in any case)")
    return value


StrictBool = Annotated[bool, BeforeValidator(_strict_bool)]


def _lowered(value: object) -> object:
    # Level names are usually written as the logging module spells them: DEBUG, INFO.
    return value.lower() if isinstance(value, str) else value


def _seconds_list(value: object) -> object:
    # "5,300,1800" reads better in an environment file than a JSON list.
    if isinstance(value, str):
        parts = value.split(",")
        if any(not part.strip() for part in parts):
            # "5,,30" is more likely a delay left out than two meant: refused, not read
            # as one retry fewer.
            raise ValueError("an item between its commas is empty (write them like 5,300,1800)")
        return tuple(float(part) for part in parts)
    return value


# A bound on every delay and pause the dispatcher works out a time from: far beyond any
# sensible setting, and far below what a date can hold.
_MAX_WAIT_SECONDS = 30 * 86400
# The longest a record may wait on a retry topic: a retry delay, a Retry-After or a
# circuit's wait, each bounded by the longest wait a setting allows.
LONGEST_WAIT_SECONDS = _MAX_WAIT_SECONDS


def _positive(values: tuple[float, ...]) -> tuple[float, ...]:
    if any(not 0 < value <= _MAX_WAIT_SECONDS for value in values):
        raise ValueError(f"every delay must be greater than 0 and at most {_MAX_WAIT_SECONDS}")
    return values


SecondsList = Annotated[
    tuple[float, ...], NoDecode, BeforeValidator(_seconds_list), AfterValidator(_positive)
]
Port = Annotated[int, Field(ge=0, le=65535)]


def _comma_list(value: object) -> object:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


Networks = Annotated[tuple[IPvAnyNetwork, ...], NoDecode, BeforeValidator(_comma_list)]


# Deliveries a second one endpoint may be limited to, by HOOKWIRE_DELIVERY_RATE_PER_ENDPOINT
# or a webhook's own rate_limit. More is no limit on one dispatcher; less would keep the
# deliveries waiting for their slots (each takes one as it starts waiting, up to the lane's
# concurrency) waiting minutes after the limit is raised, or years (1e-9: 31 years).
DELIVERY_RATE_MIN = 0.1
DELIVERY_RATE_MAX = 10_000


_DATABASE_DRIVERS = ("sqlite+aiosqlite", "postgresql+asyncpg")


def _http_url(url: str) -> str:
    if not url:
        return url
    try:
        parsed = URL(url)
    except ValueError:
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError("must be an http:// or https:// URL with a host, like http://auth:8081")
    return url


_BOOTSTRAP_FORM = (
    "must be host[:port] entries separated by commas, port 1-65535 (9092 if left out),"
    " an IPv6 address in brackets: like kafka1:9092,kafka2:9092 or [2001:db8::1]:9092"
)
# A host name or an IPv4 address: dot-separated labels (underscores occur in container names).
_BOOTSTRAP_HOST = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?", re.ASCII)
_BOOTSTRAP_PORT = re.compile(r"[0-9]{1,5}", re.ASCII)


def _bootstrap_entry_problem(entry: str) -> str | None:
    port: str
    if any(separator in entry for separator in "; \t"):
        return f"{entry!r} holds a ';' or a space (entries are separated by commas)"
    if entry.startswith("["):
        address, bracket, rest = entry[1:].partition("]")
        if not bracket:
            return f"{entry!r} has no closing bracket"
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            return f"{entry!r} has no IPv6 address in its brackets"
        if not rest:
            return None  # the port defaults to 9092
        if not rest.startswith(":"):
            return f"{entry!r} has something other than :port after its brackets"
        port = rest[1:]
    elif entry.count(":") > 1:
        # A bare IPv6 address is read whole, on port 9092 (so "::1:9092" is the address
        # ::1:9092): a port needs the brackets.
        try:
            ipaddress.IPv6Address(entry)
        except ValueError:
            return f"{entry!r} is neither host[:port] nor an IPv6 address"
        return None
    else:
        host, colon, port = entry.partition(":")
        if not _BOOTSTRAP_HOST.fullmatch(host):
            return f"{entry!r} has no host name or address"
        if not colon:
            return None
    if not _BOOTSTRAP_PORT.fullmatch(port) or not 1 <= int(port) <= 65535:
        return f"{entry!r} has a port that is not a number from 1 to 65535"
    return None


def _kafka_bootstrap(value: str | None) -> str | None:
    # Unchecked, a bad entry fails the first Kafka client's start with a traceback from deep
    # in aiokafka ("invalid literal for int()") that names no variable.
    if not value:
        return value
    # Empty entries (a trailing comma) are passed over, as the Kafka client does.
    entries = [entry.strip() for entry in value.split(",") if entry.strip()]
    if not entries:
        raise ValueError(f"no server in it: {_BOOTSTRAP_FORM}")
    for entry in entries:
        problem = _bootstrap_entry_problem(entry)
        if problem is not None:
            raise ValueError(f"{problem}: {_BOOTSTRAP_FORM}")
    # Given to the client without the empty entries: it would read "a,," as a host "" too.
    return ",".join(entries)


def _supported_database(url: str) -> str:
    if not url:
        return url
    try:
        driver = make_url(url).drivername
    except ArgumentError:
        driver = None
    if driver not in _DATABASE_DRIVERS:
        raise ValueError(
            "must be sqlite+aiosqlite:///<path> or postgresql+asyncpg://<user>@<host>/<db>"
        )
    return url


class Settings(BaseSettings):
    # An empty variable is an unset one: deploy files pass optional settings through as
    # `${VAR:-}`, and an empty private key must mean "no key", not a key that fails.
    model_config = SettingsConfigDict(
        env_prefix="HOOKWIRE_",
        frozen=True,
        extra="ignore",
        env_ignore_empty=True,
        # "inf" and "nan" read as floats; as a delay or a bound they would overflow the
        # time arithmetic of every delivery that reached them, or never end.
        allow_inf_nan=False,
    )

    data_dir: Path = Path(".hookwire")
    database_url: Annotated[str, AfterValidator(_supported_database)] = ""
    # PostgreSQL: a migration's table lock waits this long behind another transaction
    # before giving way (queued, it would hold up every query on the table), and the
    # migration is tried again for up to the second bound.
    migration_lock_timeout_seconds: float = Field(default=5.0, gt=0, le=600)
    migration_lock_wait_seconds: float = Field(default=300.0, ge=0, le=86_400)
    kafka_bootstrap: Annotated[str | None, AfterValidator(_kafka_bootstrap)] = None
    topic_prefix: str = Field(default="hookwire.", pattern=r"^[A-Za-z0-9._-]*$")
    kafka_partitions: int = Field(default=6, ge=1, le=1024)
    kafka_replication_factor: int = Field(default=1, ge=1, le=7)
    # The broker bounds the session too (Kafka's group.min.session.timeout.ms, 6000 by
    # default): a shorter one is refused when the group is joined.
    # Kafka refuses a session past its group.max.session.timeout.ms (30 min by default) at
    # every join; five minutes is far beyond any use a dispatcher has for one.
    kafka_session_timeout_ms: int = Field(default=6000, ge=1000, le=300_000)
    kafka_heartbeat_interval_ms: int = Field(default=600, ge=100)
    kafka_fetch_max_wait_ms: int = Field(default=20, ge=1, le=10000)

    @field_validator("kafka_heartbeat_interval_ms")
    @classmethod
    def _heartbeat_within_session(cls, heartbeat: int, info: ValidationInfo) -> int:
        # Three heartbeats a session, as Kafka advises: at or past the session, a member
        # is taken for dead between two and the group rebalances without end.
        session = info.data.get("kafka_session_timeout_ms")
        if isinstance(session, int) and heartbeat * 3 > session:
            raise ValueError(
                f"must be at most a third of HOOKWIRE_KAFKA_SESSION_TIMEOUT_MS ({session})"
            )
        return heartbeat

    host: str = "127.0.0.1"
    api_port: Port = 8080
    auth_port: Port = 8081
    dispatcher_port: Port = 8082
    dev_receiver_port: Port = 8090
    # `hookwire dev`'s embedded broker: 0 for any free port (it is printed in the banner).
    dev_broker_port: Port = 0
    auth_url: Annotated[str, AfterValidator(_http_url)] = ""

    service_credential: SecretStr | None = None
    token_pepper: SecretStr | None = None
    access_token_private_key: SecretStr | None = None
    # Keys that signed before the current one (a planned replacement): still published, so
    # their access tokens verify until they expire.
    access_token_previous_keys: SecretStr | None = None
    access_token_ttl_seconds: int = Field(default=3600, ge=60, le=ACCESS_TOKEN_TTL_MAX)

    allow_private_urls: StrictBool = False
    allow_query_keys: StrictBool = False
    # Proxies (load balancers, ingresses) whose X-Forwarded-For names the client: a key's
    # allowed_cidrs is checked against that address rather than the proxy's.
    trusted_proxies: Networks = ()
    publish_timeout_seconds: float = Field(default=10.0, ge=1, le=120)
    max_body_bytes: int = Field(default=262_144, ge=1024)
    # Each webhook is in every dispatcher's memory and is looked at for every event of its
    # team: one team must not grow that for all.
    max_webhooks_per_team: int = Field(default=1000, ge=1, le=1_000_000)
    token_max_lifetime_days: int | None = Field(default=None, ge=1, le=3650)
    auth_cache_ttl_seconds: float = Field(default=1.0, ge=0, le=60)
    # How often an api process asks auth which keys have ended (revoked, deactivated,
    # expired): the backstop for a change record lost on its way.
    ended_keys_sync_seconds: float = Field(default=10.0, ge=0.1, le=3600)
    # A delivery (with its event and attempts) leaves the log this long after its last
    # change: the log would otherwise grow with every event for good.
    delivery_log_retention_days: float = Field(default=30.0, gt=0, le=3650)
    # Deliveries a team may re-send (retries, replays, test events) per hour, per api
    # process; a full bucket holds one whole replay (10,000) or this, if fewer.
    resends_per_team_per_hour: int = Field(default=20_000, ge=1, le=10_000_000)
    token_cache_seconds: float = Field(default=30.0, ge=0, le=300)
    delivery_timeout_seconds: float = Field(default=15.0, gt=0, le=300)
    delivery_concurrency_per_endpoint: int = Field(default=10, ge=1, le=1000)
    response_body_limit_bytes: int = Field(default=4096, ge=0, le=65_536)
    # An api process can leave the delivery log to others (it still serves it).
    record_attempts: StrictBool = True
    delivery_rate_per_endpoint: float | None = Field(
        default=None, ge=DELIVERY_RATE_MIN, le=DELIVERY_RATE_MAX
    )
    delivery_backlog_max: int = Field(default=10_000, ge=10)
    # Records reach 900 KB: counted alone, 10,000 of them would be 9 GB.
    delivery_backlog_max_bytes: int = Field(default=100 * 2**20, ge=2**20)
    retry_schedule_seconds: SecondsList = Field(
        default=(5, 300, 1800, 7200, 18000, 36000, 36000), min_length=1, max_length=20
    )
    retry_jitter: float = Field(default=0.2, ge=0, le=1)
    retry_after_max_seconds: float = Field(default=3600, ge=0, le=_MAX_WAIT_SECONDS)
    retry_pending_max: int = Field(default=100_000, ge=10)
    retry_pending_max_bytes: int = Field(default=100 * 2**20, ge=2**20)
    circuit_failure_threshold: int = Field(default=5, ge=1)
    circuit_open_seconds: float = Field(default=30.0, gt=0, le=_MAX_WAIT_SECONDS)
    circuit_open_max_seconds: float = Field(default=600.0, gt=0, le=_MAX_WAIT_SECONDS)
    endpoint_disable_after_days: float = Field(default=5.0, gt=0, le=3650)
    shutdown_grace_seconds: float = Field(default=10.0, ge=0, le=600)
    # How long auth and the api keep answering after SIGTERM, unready, before closing
    # their listener: the time a load balancer takes to stop sending them requests.
    stop_delay_seconds: float = Field(default=0.0, ge=0, le=30)

    log_format: Annotated[Literal["auto", "json", "console"], BeforeValidator(_lowered)] = "auto"
    log_level: Annotated[
        Literal["debug", "info", "warning", "error"], BeforeValidator(_lowered)
    ] = "info"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'hookwire.db'}"

    @property
    def effective_auth_url(self) -> str:
        if self.auth_url:
            return self.auth_url
        # Auth on this host: a wildcard listens on every address but is none to dial, and an
        # IPv6 address needs its brackets in a URL (yarl adds them, and escapes a zone).
        host = self.host.strip("[]")
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            address = None
        if not host or (address is not None and address.is_unspecified):
            host = "::1" if address is not None and address.version == 6 else "127.0.0.1"
        return str(URL.build(scheme="http", host=host, port=self.auth_port))

    def require_secret(
        self, name: Literal["service_credential", "token_pepper", "access_token_private_key"]
    ) -> str:
        value: SecretStr | None = getattr(self, name)
        if value is None or not value.get_secret_value():
            raise ConfigurationError(f"HOOKWIRE_{name.upper()} is required and has no default")
        return value.get_secret_value()


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment; a bad value names its variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(
            f"HOOKWIRE_{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigurationError(f"invalid configuration: {problems}") from exc


# Read by the test suite, not by the services.
_TEST_VARIABLES = ("HOOKWIRE_TEST_", "HOOKWIRE_FUZZ_")


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """``HOOKWIRE_*`` names no setting reads: most likely typos, which would otherwise
    have no effect and no word said."""
    known = {f"HOOKWIRE_{name.upper()}" for name in Settings.model_fields}
    return sorted(
        name
        for name in environ
        if name.startswith("HOOKWIRE_")
        and name not in known
        and not name.startswith(_TEST_VARIABLES)
    )
