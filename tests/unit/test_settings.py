"""Settings come from HOOKWIRE_* variables and bad values name their variable."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.shared import (
    ConfigurationError,
    access_tokens,
    load_settings,
    make_consumer,
    unknown_variables,
)


def test_defaults_are_the_embedded_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """With nothing set: SQLite under .hookwire, ports 8080-8082, no external broker."""
    for name in ("HOOKWIRE_DATABASE_URL", "HOOKWIRE_KAFKA_BOOTSTRAP", "HOOKWIRE_API_PORT"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings()
    assert settings.effective_database_url == "sqlite+aiosqlite:///.hookwire/hookwire.db"
    assert (settings.api_port, settings.auth_port, settings.dispatcher_port) == (8080, 8081, 8082)
    assert settings.kafka_bootstrap is None
    assert settings.topic_prefix == "hookwire."


def test_environment_values_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Values come from the environment with their types."""
    monkeypatch.setenv("HOOKWIRE_API_PORT", "9000")
    monkeypatch.setenv("HOOKWIRE_ALLOW_PRIVATE_URLS", "true")
    monkeypatch.setenv("HOOKWIRE_KAFKA_BOOTSTRAP", "kafka:9092")
    settings = load_settings()
    assert settings.api_port == 9000
    assert settings.allow_private_urls is True
    assert settings.kafka_bootstrap == "kafka:9092"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("HOOKWIRE_API_PORT", "eighty"),
        ("HOOKWIRE_API_PORT", "70000"),
        ("HOOKWIRE_ALLOW_PRIVATE_URLS", "yes please"),
        ("HOOKWIRE_LOG_FORMAT", "xml"),
        ("HOOKWIRE_TOPIC_PREFIX", "bad prefix!"),
        ("HOOKWIRE_RETRY_SCHEDULE_SECONDS", "5,soon"),
        ("HOOKWIRE_RETRY_SCHEDULE_SECONDS", "5,0"),
        # Read as floats, these would overflow a retry's due time or never end a pause.
        ("HOOKWIRE_RETRY_SCHEDULE_SECONDS", "5,nan"),
        ("HOOKWIRE_RETRY_SCHEDULE_SECONDS", "5,inf"),
        ("HOOKWIRE_RETRY_SCHEDULE_SECONDS", "5,1e300"),
        ("HOOKWIRE_CIRCUIT_OPEN_SECONDS", "inf"),
        ("HOOKWIRE_RETRY_AFTER_MAX_SECONDS", "1e300"),
        ("HOOKWIRE_DELIVERY_RATE_PER_ENDPOINT", "nan"),
        # A webhook's own rate_limit is bounded 0.1-10,000: 1e-9 a second is a delivery
        # every 31 years.
        ("HOOKWIRE_DELIVERY_RATE_PER_ENDPOINT", "1e-9"),
        ("HOOKWIRE_DELIVERY_RATE_PER_ENDPOINT", "0.09"),
        ("HOOKWIRE_DELIVERY_RATE_PER_ENDPOINT", "10001"),
        ("HOOKWIRE_ENDPOINT_DISABLE_AFTER_DAYS", "1e20"),
        ("HOOKWIRE_RETRY_JITTER", "2"),
        # A delay left out between two commas is not one retry fewer.
        ("HOOKWIRE_RETRY_SCHEDULE_SECONDS", "5,,30"),
        ("HOOKWIRE_RETRY_SCHEDULE_SECONDS", "5,30,"),
        ("HOOKWIRE_DATABASE_URL", "postgresql://hw@db/hw"),
        ("HOOKWIRE_DATABASE_URL", "mysql:/x"),
        ("HOOKWIRE_DATABASE_URL", "not a url"),
        # The api would start, say it is ready, and answer every request 503.
        ("HOOKWIRE_AUTH_URL", "auth:8081"),
        ("HOOKWIRE_AUTH_URL", "ftp://auth"),
        ("HOOKWIRE_AUTH_URL", "http://"),
        # At or past the session, a member is taken for dead between two heartbeats.
        ("HOOKWIRE_KAFKA_HEARTBEAT_INTERVAL_MS", "5000"),
        # Past what Kafka allows (30 min by default): every join would be refused.
        ("HOOKWIRE_KAFKA_SESSION_TIMEOUT_MS", "99999999"),
        # Else the first Kafka client fails to start, on "invalid literal for int()".
        ("HOOKWIRE_KAFKA_BOOTSTRAP", "kafka1:9092;kafka2:9092"),
        ("HOOKWIRE_KAFKA_BOOTSTRAP", "kafka:abc"),
        ("HOOKWIRE_KAFKA_BOOTSTRAP", "kafka:"),
        ("HOOKWIRE_KAFKA_BOOTSTRAP", "kafka:0"),
        ("HOOKWIRE_KAFKA_BOOTSTRAP", "kafka:65536"),
        ("HOOKWIRE_KAFKA_BOOTSTRAP", ","),
        ("HOOKWIRE_KAFKA_BOOTSTRAP", "::1::2"),
        ("HOOKWIRE_KAFKA_BOOTSTRAP", ":9092"),
        ("HOOKWIRE_KAFKA_BOOTSTRAP", "kafka 2:9092"),
        ("HOOKWIRE_KAFKA_BOOTSTRAP", "[::1:9092"),
        ("HOOKWIRE_KAFKA_BOOTSTRAP", "[kafka]:9092"),
        ("HOOKWIRE_KAFKA_BOOTSTRAP", "[::1]9092"),
    ],
)
def test_bad_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    """A bad value fails at start with a message naming the variable."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    assert variable in caught.value.message


@pytest.mark.parametrize(
    "bootstrap",
    [
        "kafka:9092",
        "kafka",
        "kafka1:9092,kafka2:9093, kafka3.internal:1",
        "10.0.0.5:65535",
        "kafka_1.example.com.:9092",
        "[::1]:9092",
        "[2001:db8::1]",
        "[fe80::1%eth0]:9092,kafka:9092",
        # As the Kafka client reads them: a bare IPv6 address on port 9092, empty entries
        # passed over.
        "::1",
        "2001:db8::5,fe80::1%eth0",
        "kafka:9092,",
        "kafka:9092,,kafka2:9092",
    ],
)
def test_kafka_bootstrap_takes_host_and_port_lists(
    monkeypatch: pytest.MonkeyPatch, bootstrap: str
) -> None:
    monkeypatch.setenv("HOOKWIRE_KAFKA_BOOTSTRAP", bootstrap)
    # Handed to the client without its empty entries, which it would read as a host "".
    given = [entry.strip() for entry in bootstrap.split(",") if entry.strip()]
    assert load_settings().kafka_bootstrap == ",".join(given)


@pytest.mark.parametrize(
    ("bootstrap", "said"),
    [
        ("kafka1:9092;kafka2:9092", "'kafka1:9092;kafka2:9092' holds a ';'"),
        ("kafka:abc", "'kafka:abc' has a port that is not a number from 1 to 65535"),
        (",", "no server in it"),
        ("::1::2", "'::1::2' is neither host[:port] nor an IPv6 address"),
    ],
)
def test_a_bad_kafka_bootstrap_says_what_is_wrong(
    monkeypatch: pytest.MonkeyPatch, bootstrap: str, said: str
) -> None:
    monkeypatch.setenv("HOOKWIRE_KAFKA_BOOTSTRAP", bootstrap)
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    assert f"HOOKWIRE_KAFKA_BOOTSTRAP: Value error, {said}" in caught.value.message
    assert "host[:port] entries separated by commas" in caught.value.message


@pytest.mark.parametrize("rate", ["0.1", "2.5", "10000"])
def test_the_delivery_rate_takes_what_a_webhooks_rate_limit_takes(
    monkeypatch: pytest.MonkeyPatch, rate: str
) -> None:
    monkeypatch.setenv("HOOKWIRE_DELIVERY_RATE_PER_ENDPOINT", rate)
    assert load_settings().delivery_rate_per_endpoint == float(rate)


def test_secrets_have_no_default_and_never_print(monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing secret is named; a set one is hidden from repr."""
    monkeypatch.delenv("HOOKWIRE_TOKEN_PEPPER", raising=False)
    with pytest.raises(ConfigurationError, match="HOOKWIRE_TOKEN_PEPPER"):
        load_settings().require_secret("token_pepper")
    monkeypatch.setenv("HOOKWIRE_TOKEN_PEPPER", "s3cret-value")
    settings = load_settings()
    assert settings.require_secret("token_pepper") == "s3cret-value"
    assert "s3cret-value" not in repr(settings)


def test_retry_schedule_reads_a_comma_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOKWIRE_RETRY_SCHEDULE_SECONDS", "0.5, 2,60")
    assert load_settings().retry_schedule_seconds == (0.5, 2.0, 60.0)
    monkeypatch.delenv("HOOKWIRE_RETRY_SCHEDULE_SECONDS")
    assert load_settings().retry_schedule_seconds == (5, 300, 1800, 7200, 18000, 36000, 36000)


@pytest.mark.parametrize(
    ("variable", "value", "read"),
    [
        ("HOOKWIRE_LOG_LEVEL", "DEBUG", "debug"),
        ("HOOKWIRE_LOG_LEVEL", "Info", "info"),
        ("HOOKWIRE_LOG_LEVEL", "warning", "warning"),
        ("HOOKWIRE_LOG_FORMAT", "JSON", "json"),
        ("HOOKWIRE_LOG_FORMAT", "Console", "console"),
    ],
)
def test_log_settings_are_read_in_any_case(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, read: str
) -> None:
    """DEBUG and INFO, as the logging module spells them, are the usual spelling."""
    monkeypatch.setenv(variable, value)
    settings = load_settings()
    assert getattr(settings, variable.removeprefix("HOOKWIRE_").lower()) == read


@pytest.mark.parametrize("value", ["yes", "on", "2"])
def test_a_bad_boolean_says_what_is_accepted(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """The message names every spelling taken, 1 and 0 among them."""
    monkeypatch.setenv("HOOKWIRE_ALLOW_PRIVATE_URLS", value)
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    assert caught.value.message == (
        "invalid configuration: HOOKWIRE_ALLOW_PRIVATE_URLS: Value error,"
        " must be true, false, 1 or 0 (in any case)"
    )


@pytest.mark.parametrize(
    ("value", "read"), [("TRUE", True), ("1", True), ("False", False), ("0", False)]
)
def test_booleans_take_true_false_1_and_0(
    monkeypatch: pytest.MonkeyPatch, value: str, read: bool
) -> None:
    monkeypatch.setenv("HOOKWIRE_ALLOW_PRIVATE_URLS", value)
    assert load_settings().allow_private_urls is read


def test_an_empty_variable_is_an_unset_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Deploy files pass optional settings as `${VAR:-}`: empty means the default."""
    monkeypatch.setenv("HOOKWIRE_ACCESS_TOKEN_PRIVATE_KEY", "")
    monkeypatch.setenv("HOOKWIRE_TOKEN_MAX_LIFETIME_DAYS", "")
    settings = load_settings()
    assert settings.access_token_private_key is None
    assert settings.token_max_lifetime_days is None


def test_a_private_key_on_one_line_with_escapes_is_read() -> None:
    """An .env file holds the PEM on one line with \\n escapes; it is the same key."""
    pem = access_tokens.generate_private_key_pem()
    one_line = pem.replace("\n", "\\n")
    assert "\n" not in one_line
    original = access_tokens.load_private_key(pem)
    escaped = access_tokens.load_private_key(one_line)
    assert access_tokens.key_id(escaped.public_key()) == access_tokens.key_id(original.public_key())


# An EC key on secp112r1, a curve the cryptography library does not load (generated for
# this test and used for nothing else).
_UNSUPPORTED_CURVE_KEY = """-----BEGIN EC PRIVATE KEY-----
MD4CAQEEDqPmh5KwFnHgP8v0prMRoAcGBSuBBAAGoSADHgAEHmwghyTT4YEl9ac8
lUvMSyTAtscS26xh7yEyOA==
-----END EC PRIVATE KEY-----
"""


def _encrypted_key() -> str:
    return (
        Ed25519PrivateKey.generate()
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
        .decode()
    )


@pytest.mark.parametrize(
    "pem",
    [
        # Raised TypeError ("Password was not given but private key is encrypted").
        pytest.param(_encrypted_key(), id="encrypted"),
        pytest.param(_encrypted_key().replace("\n", "\\n"), id="encrypted-one-line"),
        # Raised cryptography's UnsupportedAlgorithm.
        pytest.param(_UNSUPPORTED_CURVE_KEY, id="unsupported-curve"),
        pytest.param("not a key", id="garbage"),
    ],
)
def test_an_unusable_private_key_is_a_configuration_error(pem: str) -> None:
    """An encrypted PEM or one the library cannot load fails as every bad key does: a
    message naming the variable, not a traceback."""
    with pytest.raises(ConfigurationError) as caught:
        access_tokens.load_private_key(pem)
    assert caught.value.message == "HOOKWIRE_ACCESS_TOKEN_PRIVATE_KEY is not a PEM private key"


def _public_pem(key: Ed25519PrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def test_previous_signing_keys_are_read_private_or_public_one_after_another() -> None:
    first = access_tokens.load_private_key(access_tokens.generate_private_key_pem())
    second = Ed25519PrivateKey.generate()
    pems = first.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode() + _public_pem(second)
    for text in (pems, pems.replace("\n", "\\n")):
        keys = access_tokens.load_previous_keys(text)
        assert [access_tokens.key_id(key) for key in keys] == [
            access_tokens.key_id(first.public_key()),
            access_tokens.key_id(second.public_key()),
        ]
    # The current key given again as a previous one is published once.
    assert len(access_tokens.jwk_set(first.public_key(), *keys)["keys"]) == 2


@pytest.mark.parametrize(
    ("pems", "message"),
    [
        ("not a key", "HOOKWIRE_ACCESS_TOKEN_PREVIOUS_KEYS holds no PEM key"),
        (
            "-----BEGIN PUBLIC KEY-----\nbm90IGEga2V5\n-----END PUBLIC KEY-----\n",
            "HOOKWIRE_ACCESS_TOKEN_PREVIOUS_KEYS holds a block that is not a PEM key",
        ),
        (
            _UNSUPPORTED_CURVE_KEY,
            "HOOKWIRE_ACCESS_TOKEN_PREVIOUS_KEYS holds a block that is not a PEM key",
        ),
        (
            rsa.generate_private_key(public_exponent=65537, key_size=2048)
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode(),
            "HOOKWIRE_ACCESS_TOKEN_PREVIOUS_KEYS must hold Ed25519 keys only",
        ),
    ],
)
def test_a_bad_previous_signing_key_is_a_configuration_error(pems: str, message: str) -> None:
    """Each names the variable; none is a traceback."""
    with pytest.raises(ConfigurationError) as caught:
        access_tokens.load_previous_keys(pems)
    assert caught.value.message == message


def test_a_misspelled_variable_is_named() -> None:
    """A typo has no effect; it is at least reported (test-suite variables are not)."""
    environ = {
        "HOOKWIRE_API_PORT": "9000",
        "HOOKWIRE_API_PROT": "9000",
        "HOOKWIRE_TEST_POSTGRES_DSN": "postgresql+asyncpg://x",
        "HOOKWIRE_FUZZ_EXAMPLES": "5",
        "PATH": "/bin",
    }
    assert unknown_variables(environ) == ["HOOKWIRE_API_PROT"]


@pytest.mark.parametrize(("grace", "interval_ms"), [(10.0, 300_000), (600.0, 660_000)])
async def test_a_consumer_outlasts_the_stop_grace_between_reads(
    grace: float, interval_ms: int
) -> None:
    """A drain reads nothing while it waits for deliveries in flight: the group must not
    drop the member (and hand its partitions on) before the grace is over."""
    settings = load_settings(shutdown_grace_seconds=grace, kafka_bootstrap="127.0.0.1:9")
    consumer = make_consumer(settings, "t", group_id="g")
    try:
        assert consumer._max_poll_interval_ms == interval_ms
    finally:
        await consumer.stop()


@pytest.mark.parametrize(("session_ms", "request_ms"), [(6000, 40_000), (120_000, 125_000)])
async def test_a_consumers_requests_outlast_a_join(session_ms: int, request_ms: int) -> None:
    """A join may wait at the broker for the whole session (the rebalance timeout): the
    request waiting for it must not time out first."""
    settings = load_settings(
        kafka_session_timeout_ms=session_ms,
        kafka_heartbeat_interval_ms=session_ms // 10,
        kafka_bootstrap="127.0.0.1:9",
    )
    consumer = make_consumer(settings, "t", group_id="g")
    try:
        assert consumer._rebalance_timeout_ms == session_ms
        assert consumer._client._request_timeout_ms == request_ms
    finally:
        await consumer.stop()


@pytest.mark.parametrize(
    ("host", "auth_url"),
    [
        ("127.0.0.1", "http://127.0.0.1:8081"),
        # A wildcard listens everywhere but is no address to dial.
        ("0.0.0.0", "http://127.0.0.1:8081"),
        ("::", "http://[::1]:8081"),
        ("::0", "http://[::1]:8081"),
        ("[::]", "http://[::1]:8081"),
        ("::1", "http://[::1]:8081"),
        ("auth.internal", "http://auth.internal:8081"),
    ],
)
def test_the_default_auth_url_is_one_the_api_can_dial(host: str, auth_url: str) -> None:
    settings = load_settings(host=host, auth_port=8081)
    assert settings.effective_auth_url == auth_url
    assert load_settings(host=host, auth_url="https://auth:9").effective_auth_url == (
        "https://auth:9"
    )
