"""The aiohttp scaffolding every service shares.

Errors become HTTP in one middleware, with one body shape; every request gets an id that
rides along in the logs; ``/healthz``, ``/readyz`` and ``/metrics`` are always there.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import re
import socket
import time
import traceback
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any, TypeVar

import orjson
import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from pydantic import BaseModel, ConfigDict, ValidationError
from sqlalchemy import exc as sql_errors

from ._contracts import json_problem
from ._credentials import QUERY_KEY_PARAM, Network, in_networks
from ._db import database_error_codes
from ._errors import (
    BadRequest,
    ClientClosedRequest,
    ConfigurationError,
    DependencyUnavailable,
    HookwireError,
    PayloadTooLarge,
    ValidationFailed,
)
from ._ids import new_id
from ._lifecycle import Loops
from ._logging import scrubbed
from ._metrics import Metrics

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ReadinessCheck = Callable[[], Awaitable[None]]
M = TypeVar("M", bound=BaseModel)

METRICS_KEY = web.AppKey("metrics", Metrics)
MAX_BODY_KEY = web.AppKey("max_body_bytes", int)
READINESS_KEY = web.AppKey("readiness", list[ReadinessCheck])
LOOPS_KEY = web.AppKey("loops", Loops)
# Set when a stop begins: readiness fails and every answer closes its connection, so load
# balancers and pooled clients move to another process while this one still serves.
STOPPING_KEY = web.AppKey("stopping", asyncio.Event)
# How long requests in flight when the listener closes may take to finish. With the stop
# delay (5 s in the manifests) and the closes after it, a stop stays inside the 30 s a
# Kubernetes pod is given between SIGTERM and SIGKILL.
REQUESTS_FINISH_SECONDS = 15.0
_UNMONITORED = frozenset({"/healthz", "/readyz", "/metrics"})
# How long one readiness check may take before it counts as failed.
READY_CHECK_SECONDS = 2.0


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


def error_response(error: HookwireError) -> web.Response:
    return json_response(error.to_body(), status=error.status, headers=error.headers() or None)


def _refuse_nul(request: web.Request) -> None:
    # PostgreSQL text cannot hold NUL: an id or cursor with one would reach the database
    # and fail there (500) instead of being refused here.
    if "\x00" in request.path or any("\x00" in v for v in request.query.values()):
        raise BadRequest("the path and query must not contain NUL characters")


# A client's own id is kept when it can be: it is logged, echoed and stored with audit
# records (up to 64 characters), so a longer one, or one with spaces or control characters
# that would break a log line or a header, is replaced rather than refused or cut.
_CLIENT_REQUEST_ID = re.compile(r"[!-~]{1,64}")


def _request_id(request: web.Request) -> str:
    given = request.headers.get("x-request-id", "")
    return given if _CLIENT_REQUEST_ID.fullmatch(given) else new_id("req")


def _refuse_repeats(request: web.Request, names: Collection[str] | None = None) -> None:
    # A route reads one value per parameter; which of two it took would be a guess
    # (``?state=failed&state=retrying`` listing only one state, without a word). Checked
    # where a route reads its query, after the route and the credential were found.
    query = request.query
    if len(query) == len(set(query.keys())):
        return
    repeated = sorted(
        {
            name
            for name in query
            if (names is None or name in names)
            and name != QUERY_KEY_PARAM
            and len(query.getall(name)) > 1
        }
    )
    if not repeated:
        return
    raise ValidationFailed(
        f"invalid query parameters: {', '.join(repeated)}",
        details=[{"field": name, "reason": "given more than once"} for name in repeated],
    )


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _internal_error(request_id: str) -> web.Response:
    return json_response(
        {
            "error": {
                "code": "internal_error",
                "message": "internal error",
                "details": {"request_id": request_id},
            }
        },
        status=500,
    )


# aiohttp's parser errors show their status before their words ("400, message:" and a
# line break), once for each time one was wrapped in another.
_PARSER_STATUS = re.compile(r"\s*\d{3}, message:\s*")


def _parser_words(error: Exception) -> str:
    text = str(error)
    while status := _PARSER_STATUS.match(text):
        text = text[status.end() :]
    return text.strip()


def _from_client(request: web.Request, trusted: Sequence[Network]) -> web.Request:
    """The request as the client sent it: when it came through a trusted proxy, with the
    address ``X-Forwarded-For`` names for the client (the nearest hop not itself trusted).
    The header is read only from a trusted peer: anyone else could write it."""
    if not trusted or not in_networks(request.remote, trusted):
        return request
    hops = [
        hop.strip()
        for line in request.headers.getall("X-Forwarded-For", ())
        for hop in line.split(",")
    ]
    for hop in reversed(hops):
        if not in_networks(hop, trusted):
            try:
                address = ipaddress.ip_address(hop)
            except ValueError:
                return request  # a hop that is no address: the proxy's own address stands
            return request.clone(remote=str(address))
    return request


_DATABASE_MODULES = ("sqlalchemy", "asyncpg", "aiosqlite")
# PostgreSQL's answers that say "not now" rather than "not this": a connection exception
# (08), insufficient resources (53: too many connections, disk full), the server shutting
# down or starting up (57P01-57P03), a statement cancelled (57014: a statement timeout), a
# serialization failure or deadlock (40001, 40P01), a lock not available (55P03).
_UNAVAILABLE_SQLSTATES = ("08", "53", "57P0", "57014", "40001", "40P01", "55P03")
# SQLite's: busy or locked past the busy timeout, a file it cannot open, read or grow.
_UNAVAILABLE_SQLITE = (
    "SQLITE_BUSY",
    "SQLITE_LOCKED",
    "SQLITE_CANTOPEN",
    "SQLITE_IOERR",
    "SQLITE_FULL",
)


def _raised_in(
    exc: BaseException, modules: tuple[str, ...], functions: Collection[str] | None = None
) -> bool:
    """Whether ``exc`` was raised through one of ``modules`` (in one of ``functions``)."""
    return any(
        str(frame.f_globals.get("__name__", "")).startswith(modules)
        and (functions is None or frame.f_code.co_name in functions)
        for frame, _ in traceback.walk_tb(exc.__traceback__)
    )


def _committing(exc: BaseException) -> bool:
    """Raised while a COMMIT was on its way: it may have taken effect."""
    return _raised_in(exc, _DATABASE_MODULES, ("commit", "_commit_impl", "do_commit"))


# A COMMIT the database answered with a refusal that leaves nothing done: a
# serialization failure or deadlock found at commit (PostgreSQL rolls the transaction
# back), SQLite busy or locked (the transaction stays open, to be rolled back).
_COMMIT_REFUSED_SQLSTATES = ("40001", "40P01")
_COMMIT_REFUSED_SQLITE = ("SQLITE_BUSY", "SQLITE_LOCKED")


def _commit_refused(exc: Exception) -> bool:
    if not isinstance(exc, sql_errors.DBAPIError) or exc.connection_invalidated:
        return False
    sqlstate, sqlite_errorname = database_error_codes(exc)
    if sqlstate is not None:
        return sqlstate in _COMMIT_REFUSED_SQLSTATES
    return sqlite_errorname.startswith(_COMMIT_REFUSED_SQLITE)


def _database_unavailable(exc: Exception) -> bool:
    if isinstance(exc, sql_errors.TimeoutError):  # no pooled connection came free
        return True
    if isinstance(exc, OSError):
        # asyncpg raises the socket's own errors, unwrapped (refused, unreachable, several
        # addresses each refused); told from a peer's by where they were raised.
        return _raised_in(exc, _DATABASE_MODULES)
    if not isinstance(exc, sql_errors.DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    sqlstate, sqlite_errorname = database_error_codes(exc)
    if sqlstate is not None:
        return sqlstate.startswith(_UNAVAILABLE_SQLSTATES)
    return sqlite_errorname.startswith(_UNAVAILABLE_SQLITE)


def _as_unavailable(exc: Exception) -> DependencyUnavailable | None:
    """What a request that failed on a dependency answers: 503 with Retry-After (the
    caller may try again), not a 500 for a fault of ours. A database that refused the
    connection, went away, timed out its pool, or answered "not now" (busy, locked,
    starting up, out of connections) is unavailable. One that refused the statement
    (a missing table, a constraint, a value it cannot take) is a fault of ours: a retry
    would fail the same way. So is a COMMIT whose answer was lost: it may have taken
    effect, and a retry could make the change twice; one the database refused as busy
    or as a serialization failure did not, and is unavailable."""
    if _committing(exc) and not _commit_refused(exc):
        return None
    if _database_unavailable(exc):
        return DependencyUnavailable("the database is unavailable")
    if isinstance(exc, ConnectionError | TimeoutError | socket.gaierror):
        return DependencyUnavailable("a service this request needs is unavailable")
    return None


def _build_middlewares(
    service: str, metrics: Metrics, trusted_proxies: Sequence[Network] = ()
) -> list[Any]:
    requests = metrics.counter("http_requests_total", "HTTP requests", ("route", "status"))
    latency = metrics.histogram("http_request_seconds", "HTTP request latency", ("route",))
    log = structlog.get_logger(service=service)

    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        request_id = _request_id(request)
        route = request.match_info.route.resource
        route_name = route.canonical if route is not None else "unmatched"
        started = time.perf_counter()

        def failed(exc: Exception) -> web.Response:
            unavailable = _as_unavailable(exc)
            if unavailable is None:
                log.exception("unhandled_error", path=request.path)
                return _internal_error(request_id)
            log.error(
                "request_failed",
                error=unavailable.message,
                cause=scrubbed(f"{type(exc).__name__}: {exc}"),
                path=request.path,
            )
            return error_response(unavailable)

        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                _refuse_nul(request)
                request = _from_client(request, trusted_proxies)
                response = await handler(request)
            except HookwireError as exc:
                response = error_response(exc)
                if exc.status >= 500:
                    # What went wrong below (a peer's address, a library's words) is for
                    # the log; the client's answer says only what is unavailable.
                    cause = exc.__cause__
                    log.error(
                        "request_failed",
                        error=exc.message,
                        cause=None
                        if cause is None
                        else scrubbed(f"{type(cause).__name__}: {cause}"),
                        path=request.path,
                    )
            except web.HTTPRequestEntityTooLarge:
                response = error_response(
                    PayloadTooLarge(
                        "request body is too large",
                        details={"max_bytes": request.app[MAX_BODY_KEY]},
                    )
                )
            except (HttpProcessingError, RequestPayloadError) as exc:
                # A body that cannot be read as sent (gzip that is not gzip, broken chunk
                # framing) is the client's fault, not ours.
                response = error_response(
                    BadRequest(f"the request body cannot be read: {_parser_words(exc)}")
                )
            except ConnectionResetError as exc:
                if not _client_gone(request):
                    # A connection of ours (to a peer, the database) reset.
                    response = failed(exc)
                else:
                    # The client went away mid-request (a timeout while uploading): nothing
                    # of ours failed, and no one is left to answer. Counted apart from the
                    # 5xx, as proxies count it.
                    log.info("client_disconnected", path=request.path)
                    response = error_response(ClientClosedRequest("the client closed the request"))
            except web.HTTPException as exc:
                body = {
                    "error": {
                        "code": exc.reason.lower().replace(" ", "_"),
                        "message": exc.reason,
                        "details": None,
                    }
                }
                response = json_response(body, status=exc.status)
                if "Allow" in exc.headers:  # a 405 says which methods the route takes
                    response.headers["Allow"] = exc.headers["Allow"]
            except Exception as exc:
                response = failed(exc)
            elapsed = time.perf_counter() - started
            response.headers["x-request-id"] = request_id
            if request.app[STOPPING_KEY].is_set():
                response.force_close()
            if request.path not in _UNMONITORED:
                requests.labels(route_name, str(response.status)).inc()
                latency.labels(route_name).observe(elapsed)
                log.info(
                    "request",
                    method=request.method,
                    path=request.path,
                    status=response.status,
                    ms=round(elapsed * 1000, 2),
                )
            return response

    return [observe]


async def _healthz(request: web.Request) -> web.Response:
    loops = request.app.get(LOOPS_KEY)
    if loops is not None and loops.failures:
        # A loop the process needs has died: a liveness probe should restart it.
        return json_response({"status": "failing", "reasons": loops.failures}, status=503)
    return json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    if request.app[STOPPING_KEY].is_set():
        return json_response({"status": "unavailable", "reasons": ["stopping"]}, status=503)
    failures = []
    for check in request.app[READINESS_KEY]:
        try:
            # A database that does not answer would hold a pooled connection per probe for
            # its whole connect timeout, a minute, and probes come every few seconds.
            async with asyncio.timeout(READY_CHECK_SECONDS):
                await check()
        except TimeoutError:
            failures.append(f"no answer within {READY_CHECK_SECONDS:g} s")
        except Exception as exc:
            failures.append(str(exc))
    if failures:
        return json_response({"status": "unavailable", "reasons": failures}, status=503)
    return json_response({"status": "ready"})


async def _metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[METRICS_KEY].exposition()
    return web.Response(body=body, headers={"content-type": content_type})


def build_app(
    service: str,
    metrics: Metrics,
    *,
    max_body_bytes: int = 1 << 20,
    loops: Loops | None = None,
    trusted_proxies: Sequence[Network] = (),
) -> web.Application:
    app = web.Application(
        middlewares=_build_middlewares(service, metrics, trusted_proxies),
        client_max_size=max_body_bytes,
    )
    app[METRICS_KEY] = metrics
    app[MAX_BODY_KEY] = max_body_bytes
    app[READINESS_KEY] = []
    if loops is not None:
        app[LOOPS_KEY] = loops
    app[STOPPING_KEY] = asyncio.Event()
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    return app


def _malformed(reason: str) -> ValidationFailed:
    return ValidationFailed(
        "request body is not valid JSON", details=[{"field": "body", "reason": reason}]
    )


# A run of digits long enough to be an integer past 64 bits (or just digits in a string).
_LONG_DIGITS = re.compile(rb"\d{19,}")


async def read_json(request: web.Request) -> Any:
    raw = await request.read()
    if not raw.strip():
        raise _malformed("the body is empty")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _malformed(str(exc)) from exc
    if _LONG_DIGITS.search(raw):
        # orjson reads an integer past 64 bits as a float, silently: stored, it would not
        # be the number sent. The standard parser keeps it exact, so it can be refused.
        try:
            problem = json_problem(json.loads(raw))
        except RecursionError:
            problem = "nests too deep"
        if problem is not None:
            raise ValidationFailed.for_field("body", problem)
    return value


class NoFields(BaseModel):
    """No field: nothing, or an empty object."""

    # Read as a body (left out, or {}) or a query (no parameter): anything given is refused
    # (422 naming it) rather than ignored, so no field or filter the caller believes
    # applied is silently dropped.

    model_config = ConfigDict(extra="forbid", strict=True)


async def parse_body(request: web.Request, model: type[M], *, optional: bool = False) -> M:
    """Validate a JSON body against a model; every problem names its field. An
    ``optional`` body may be left out, which means every field's default."""
    raw = await request.read()
    if not raw.strip():
        if optional:
            return model.model_validate({})
        raise _malformed("the body is empty")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors()
        if errors and errors[0]["type"] == "json_invalid":
            raise _malformed(errors[0]["msg"]) from exc
        problems = _problems(exc, "body")
        fields = ", ".join(p["field"] for p in problems)
        raise ValidationFailed(f"invalid request body: {fields}", details=problems) from exc


def parse_query(request: web.Request, model: type[M]) -> M:
    """Validate query parameters against a model (lax: they arrive as strings)."""
    _refuse_repeats(request)
    # The token, when sent in the query, is the authentication layer's business.
    params = {k: v for k, v in request.query.items() if k != QUERY_KEY_PARAM}
    try:
        return model.model_validate(params)
    except ValidationError as exc:
        problems = _problems(exc, "query")
        fields = ", ".join(p["field"] for p in problems)
        raise ValidationFailed(f"invalid query parameters: {fields}", details=problems) from exc


def query_flag(request: web.Request, name: str) -> bool:
    """A yes/no query parameter: ``true`` or ``false`` (absent: false). Anything else is a
    422, not a quiet "no": ``?force=1`` must not move to the trash what was meant to go."""
    _refuse_repeats(request, (name,))
    # A misspelt flag (`?Force=true`) ignored would move to the trash what was meant to go
    # for good: the route takes this one parameter, as a list takes only its own.
    others = sorted(key for key in request.query if key not in (name, QUERY_KEY_PARAM))
    if others:
        raise ValidationFailed(
            f"invalid query parameters: {', '.join(others)}",
            details=[
                {"field": key, "reason": f"not taken here (only ?{name}=true or false)"}
                for key in others
            ],
        )
    raw = request.query.get(name, "false")
    if raw not in ("true", "false"):
        raise ValidationFailed(
            f"invalid query parameters: {name}",
            details=[{"field": name, "reason": "true or false"}],
        )
    return raw == "true"


def _problems(exc: ValidationError, whole: str) -> list[dict[str, str]]:
    return [
        {"field": ".".join(str(p) for p in err["loc"]) or whole, "reason": err["msg"]}
        for err in exc.errors()
    ]


def port_problem(host: str, port: int, held: list[socket.socket]) -> OSError | None:
    """Why ``port`` cannot be listened on as the services will (None: it can); the probes
    stay in ``held``, listening, so a port named by two settings is found taken too."""
    try:
        addresses = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror:
        return None  # the service's own start says what is wrong with the host
    for family, kind, proto, _, address in addresses:
        try:
            probe = socket.socket(family, kind, proto)
        except OSError:
            continue  # a family this host has not (IPv6 off): the site passes it over too
        held.append(probe)
        # As aiohttp's site binds: a port left in TIME_WAIT by a last run is not taken.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            probe.bind(address)
            probe.listen()
        except OSError as exc:
            return exc
    return None


def _listen_hint(problem: OSError, port_setting: str | None) -> str:
    # Only a port in use (or one below 1024 without the right) is the port's fault; an
    # address this host does not have is the host's.
    if problem.errno in (errno.EADDRINUSE, errno.EACCES):
        return f" (set {port_setting} to use another port)" if port_setting else ""
    return " (check HOOKWIRE_HOST)"


def check_listenable(host: str, port: int, port_setting: str) -> None:
    """End a start at once on a port (or host) the service could not listen on: found
    only when the site starts, after the Kafka clients, a process doomed to exit would
    first join its consumer groups and make them rebalance (a crash-looping replica would
    pause deliveries for the whole group each time)."""
    if port == 0:
        return  # any free port
    try:
        socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigurationError(
            f"cannot listen on {host}:{port}: {exc.strerror} (check HOOKWIRE_HOST)"
        ) from exc
    held: list[socket.socket] = []
    try:
        problem = port_problem(host, port, held)
    finally:
        for probe in held:
            probe.close()
    if problem is not None:
        raise ConfigurationError(
            f"cannot listen on {host}:{port}: {problem.strerror or problem}"
            f"{_listen_hint(problem, port_setting)}"
        )


async def start_site(
    app: web.Application, host: str, port: int, *, port_setting: str | None = None
) -> web.AppRunner:
    """Serve ``app``; a port that cannot be had names ``port_setting``, the variable
    that moves it."""
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, shutdown_timeout=REQUESTS_FINISH_SECONDS
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        hint = _listen_hint(exc, port_setting)
        raise ConfigurationError(f"cannot listen on {host}:{port}: {exc.strerror}{hint}") from exc
    return runner


async def stop_site(runner: web.AppRunner, delay_seconds: float = 0.0) -> None:
    """Stop serving without refusing anyone who was still sent here.

    A load balancer keeps routing to a process for a few seconds after it is told to stop
    (a Kubernetes endpoint update travels on its own time): for `delay_seconds` the
    process keeps answering, with readiness failing and connections closed after each
    answer; then the listener closes and requests in flight get
    `REQUESTS_FINISH_SECONDS` to finish.
    """
    app = runner.app
    app[STOPPING_KEY].set()
    if delay_seconds > 0:
        await asyncio.sleep(delay_seconds)
    await runner.cleanup()


def bound_port(runner: web.AppRunner) -> int:
    for address in runner.addresses:
        return int(address[1])
    raise RuntimeError("runner is not listening")
