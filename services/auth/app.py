"""The auth service's HTTP surface and lifecycle."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import time
from datetime import datetime
from importlib.metadata import version
from typing import Annotated, Any, cast

from aiohttp import web
from aiokafka import AIOKafkaProducer
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from sqlalchemy.ext.asyncio import AsyncEngine

from services.shared import (
    ACCESS_TOKEN_TTL_MAX,
    MAX_TEAM_ID_CHARS,
    MAX_TOKEN_CHARS,
    READINESS_KEY,
    ChangeFollower,
    ChangeNotifier,
    Loops,
    Metrics,
    OpenApi,
    Settings,
    access_tokens,
    bound_port,
    build_app,
    cancel_and_wait,
    check_listenable,
    check_ready,
    error_text,
    get_logger,
    json_response,
    make_producer,
    parse_body,
    require_topics,
    start_client,
    start_site,
    stop_client,
    stop_site,
    topics_for,
    unknown_permissions,
    utcnow,
    watch_topics,
)

from . import store
from .audit_routes import AuditRoutes
from .cache import MISSING, TokenCache
from .callers import Callers, KeyUsage
from .errors import InvalidServiceCredential, MalformedToken, UnknownPermission
from .exchange import ExchangeRoutes
from .group_routes import GroupRoutes
from .introspection import TokenState, decide, idle_too_long, inactive
from .token_routes import TokenRoutes
from .tokens import check_format, hash_token

_VERSION = version("hookwire")
_LAST_USED_FLUSH_SECONDS = 1.0
_COUNT_EVERY_TICKS = 15


def _one_address(value: str | None) -> str | None:
    if not value:
        return None  # not known: a key limited to some networks is refused
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(
            "must be one IP address (IPv4 or IPv6), as the connection came from: not a"
            " forwarded-for list, a host name or an address with a port"
        ) from None
    return value


class IntrospectRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str = Field(max_length=MAX_TOKEN_CHARS)
    team_id: str | None = Field(default=None, max_length=MAX_TEAM_ID_CHARS)
    permission: str | None = Field(default=None, max_length=64)
    # Shown to the key's owner as its last use, and matched against its networks.
    client_ip: Annotated[str | None, AfterValidator(_one_address)] = Field(
        default=None, max_length=64
    )

    @field_validator("permission")
    @classmethod
    def _permission_in_a_team(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("team_id") is None:
            # A key's grant is capped by the user's role in each team: without one, the
            # grant alone would say yes to what no team lets the user do.
            raise ValueError(
                "needs a team_id: a permission is held in a team, the key's grant capped by"
                " the user's role there"
            )
        return value


class AuthService:
    name = "auth"

    def __init__(self, settings: Settings, engine: AsyncEngine) -> None:
        self.settings = settings
        self.engine = engine
        self._pepper = settings.require_secret("token_pepper")
        self._service_credential = settings.require_secret("service_credential").encode()
        self._access_key = (
            access_tokens.load_private_key(settings.require_secret("access_token_private_key"))
            if settings.access_token_private_key is not None
            else None
        )
        previous = settings.access_token_previous_keys
        self._previous_keys = tuple(
            access_tokens.load_previous_keys(previous.get_secret_value())
            if previous is not None and previous.get_secret_value()
            else ()
        )
        self.metrics = Metrics("auth")
        self._introspections = self.metrics.counter(
            "introspections_total", "Introspection answers", ("result", "reason")
        )
        self._latency = self.metrics.histogram(
            "introspection_seconds", "Time to answer an introspection"
        )
        self._tokens_by_state = self.metrics.gauge("tokens", "Tokens by state", ("state",))
        self._cache_lookups = self.metrics.counter(
            "token_cache_lookups_total", "Token lookups by cache result", ("result",)
        )
        self.cache = TokenCache(settings.token_cache_seconds)
        self._log = get_logger("auth")
        self.usage = KeyUsage(engine)
        self._flusher: asyncio.Task[None] | None = None
        self._topic_watch: asyncio.Task[None] | None = None
        self.loops = Loops(self.name)
        self._follower = ChangeFollower(
            settings, self.cache.apply, loops=self.loops, metrics=self.metrics
        )
        self._runner: web.AppRunner | None = None
        self.app: web.Application | None = None
        self._producer: AIOKafkaProducer | None = None
        self.port: int | None = None

    def build_app(self, producer: AIOKafkaProducer) -> web.Application:
        app = build_app(
            "auth",
            self.metrics,
            max_body_bytes=self.settings.max_body_bytes,
            loops=self.loops,
            trusted_proxies=self.settings.trusted_proxies,
        )
        spec = OpenApi("hookwire auth", _VERSION, "Personal access tokens and introspection")
        spec.route(
            app,
            "POST",
            "/v1/introspect",
            self.introspect,
            body=IntrospectRequest,
            auth="service",
            errors=(401, 422),
            summary="RFC 7662 introspection of a token (service credential)",
        )
        spec.route(
            app,
            "GET",
            "/v1/ended-keys",
            self.ended_keys,
            auth="service",
            errors=(401,),
            summary="Ids of keys whose access tokens must be refused (service credential)",
        )
        changes = ChangeNotifier(producer, topics_for(self.settings), local=self.cache.apply)
        callers = Callers(self.engine, self._pepper, self.usage, self.settings.allow_query_keys)
        TokenRoutes(self.settings, self.engine, self._pepper, callers, changes).add_to(app, spec)
        GroupRoutes(self.settings, self.engine, callers, changes).add_to(app, spec)
        ExchangeRoutes(
            self.settings, self.engine, callers, self._access_key, self._previous_keys
        ).add_to(app, spec)
        AuditRoutes(self.settings, self.engine, callers).add_to(app, spec)
        spec.serve(app)

        async def database_ready() -> None:
            await check_ready(self.engine)

        app[READINESS_KEY].append(database_ready)
        return app

    async def start(self) -> None:
        await check_ready(self.engine)
        check_listenable(self.settings.host, self.settings.auth_port, "HOOKWIRE_AUTH_PORT")
        self._producer = make_producer(self.settings)
        await start_client(self._producer, self.settings)
        needed = [topics_for(self.settings).changes]
        await require_topics(self._producer, self.settings, needed)
        await self._follower.start()
        self._flusher = self.loops.start(self._flush_last_used_forever(), name="last-used")
        self._topic_watch = self.loops.start(
            watch_topics(self._producer, self.settings, needed, self.metrics), name="topics"
        )
        self.app = self.build_app(self._producer)
        self._runner = await start_site(
            self.app, self.settings.host, self.settings.auth_port, port_setting="HOOKWIRE_AUTH_PORT"
        )
        self.port = bound_port(self._runner)

    async def stop(self) -> None:
        if self._runner is not None:
            await stop_site(self._runner, self.settings.stop_delay_seconds)
        self.loops.stopping()
        await cancel_and_wait(self._flusher)
        await cancel_and_wait(self._topic_watch)
        await self._follower.stop()
        try:
            await self.usage.flush()
        except Exception:
            # The last second of uses is lost (the database is away); the producer must
            # still be closed.
            self._log.exception("last_use_flush_failed")
        if self._producer is not None:
            await stop_client(self._producer)

    def _check_service_credential(self, request: web.Request) -> None:
        sent = request.headers.getall("authorization", ())
        if len(sent) > 1:
            raise InvalidServiceCredential(
                f"send one Authorization header: this request has {len(sent)}"
            )
        scheme, _, presented = (sent[0] if sent else "").partition(" ")
        # Bytes the HTTP parser could not decode arrive as surrogates: kept as they came.
        given = presented.strip().encode(errors="surrogateescape")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, self._service_credential):
            raise InvalidServiceCredential(
                f"{request.path} needs the service credential"
                " (`Authorization: Bearer <HOOKWIRE_SERVICE_CREDENTIAL>`)"
            )

    async def introspect(self, request: web.Request) -> web.Response:
        self._check_service_credential(request)
        body = await parse_body(request, IntrospectRequest)
        if body.permission is not None and unknown_permissions([body.permission]):
            # No key holds a permission the catalog lacks: "permission_denied" would hide
            # a caller's typo behind an answer that looks like the key's fault.
            raise UnknownPermission(
                f"unknown permission: {body.permission}",
                details=[{"field": "permission", "reason": f"unknown: {body.permission}"}],
            )
        started = time.perf_counter()
        try:
            check_format(body.token)
        except MalformedToken:
            answer = inactive("malformed")
        else:
            secret_hash = hash_token(body.token, self._pepper)
            now = utcnow()
            token, role = await self._lookup(secret_hash, body.team_id)
            answer = self._decide(token, role, body, now)
            if token is not None and not answer["active"] and idle_too_long(token, now):
                # A cached row knows only the uses made before it was read and those this
                # process made since; another process's (or a flushed one) may be newer.
                # Only the database's last use may refuse a key as idle.
                token, role = await self._lookup(secret_hash, body.team_id, fresh=True)
                answer = self._decide(token, role, body, now)
            if answer["active"] and token is not None:
                self.usage.used(token.id, now, body.client_ip)
                if body.permission is not None and body.permission not in answer["permissions"]:
                    # Active, but not for what the caller wants to do with it.
                    answer = {**inactive("permission_denied"), "permission": body.permission}
            elif token is not None:
                await self.usage.refused(token, answer["reason"], body.client_ip)
        self._latency.observe(time.perf_counter() - started)
        self._introspections.labels(
            "active" if answer["active"] else "inactive", answer.get("reason", "")
        ).inc()
        return json_response(answer)

    def _decide(
        self,
        token: TokenState | None,
        role: str | None,
        body: IntrospectRequest,
        now: datetime,
    ) -> dict[str, Any]:
        if token is not None:
            # A use not yet written still counts against inactivity expiry.
            token = self.usage.latest(token)
        return decide(token, team_id=body.team_id, role=role, client_ip=body.client_ip, now=now)

    async def ended_keys(self, request: web.Request) -> web.Response:
        """What the change records say one by one, in full: a verifier that missed one
        (lost on its way, or published while the broker was away) learns it here."""
        self._check_service_credential(request)
        # Past the longest lifetime a token may have been issued with (and some clock skew)
        # no token of the key is left: not the lifetime in force, which may have been
        # lowered since a key's tokens were issued.
        within = ACCESS_TOKEN_TTL_MAX + 300
        async with self.engine.connect() as conn:
            token_ids = await store.ended_token_ids(conn, utcnow(), within)
        return json_response({"token_ids": token_ids})

    async def _lookup(
        self, secret_hash: str, team_id: str | None, *, fresh: bool = False
    ) -> tuple[TokenState | None, str | None]:
        """The token and the user's role in the team, from the cache or one connection."""
        cached = MISSING if fresh else self.cache.token(secret_hash)
        self._cache_lookups.labels("miss" if cached is MISSING else "hit").inc()
        token = None if cached is MISSING else cast(TokenState | None, cached)
        roles = self.cache.roles(token.user_id) if token is not None else None
        if cached is MISSING or (token is not None and team_id is not None and roles is None):
            read_at = self.cache.generation
            async with self.engine.connect() as conn:
                if cached is MISSING:
                    token = await store.find_token(conn, secret_hash)
                    self.cache.put_token(secret_hash, token, read_at)
                if token is not None and team_id is not None:
                    roles = self.cache.roles(token.user_id)
                    if roles is None:
                        roles = await store.memberships_of(conn, token.user_id)
                        self.cache.put_roles(token.user_id, roles, read_at)
        if token is None or team_id is None or roles is None:
            return token, None
        return token, roles.get(team_id)

    async def _count_tokens(self) -> None:
        async with self.engine.connect() as conn:
            counts = await store.token_counts_by_state(conn, utcnow())
        for state, count in counts.items():
            self._tokens_by_state.labels(state).set(count)

    async def _flush_last_used_forever(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(_LAST_USED_FLUSH_SECONDS)
            try:
                await self.usage.flush()
                if ticks % _COUNT_EVERY_TICKS == 0:
                    await self._count_tokens()
            except Exception as exc:
                # Last uses stay in memory for the next round; the loop goes on.
                self._log.exception(
                    "background_upkeep_failed",
                    error=error_text(exc),
                    retry_in_seconds=_LAST_USED_FLUSH_SECONDS,
                )
            ticks += 1
