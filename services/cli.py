"""The ``hookwire`` command: one subcommand per process type, plus migrate and admin."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Awaitable, Callable, Coroutine
from datetime import timedelta
from typing import Annotated, Any, TypeVar

import click
import structlog
from pydantic import AfterValidator, Field, TypeAdapter, ValidationError
from sqlalchemy.ext.asyncio import AsyncEngine

from services.shared import (
    PERMISSIONS,
    HookwireError,
    Name,
    Service,
    Settings,
    StoredText,
    configure_logging,
    create_engine,
    ensure_topics,
    load_settings,
    migrate,
    run,
    run_until_signalled,
    unknown_variables,
    utcnow,
)

T = TypeVar("T")


def _settings(**overrides: object) -> Settings:
    try:
        settings = load_settings(**overrides)
    except HookwireError as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(2)
    context = click.get_current_context(silent=True)
    configure_logging(
        settings.log_format,
        settings.log_level,
        service=context.info_name if context is not None else None,
    )
    for name in unknown_variables(os.environ):
        structlog.get_logger().warning("unknown_setting_ignored", variable=name)
    return settings


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run to completion; a known failure prints one line naming what and where."""
    try:
        return run(coroutine)
    except HookwireError as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception:
        # Not foreseen: still one log line (its traceback inside), not a bare traceback
        # a log shipper would cut into pieces.
        structlog.get_logger().exception("fatal")
        sys.exit(1)


async def _serve(settings: Settings, build: Callable[[Settings, AsyncEngine], Service]) -> None:
    engine = create_engine(settings.effective_database_url)
    try:
        await run_until_signalled([build(settings, engine)])
    finally:
        await engine.dispose()


@click.group()
def main() -> None:
    """hookwire: API keys and signed webhooks."""


@main.command()
def dev() -> None:
    """Run the whole system on embedded defaults (SQLite and the embedded broker)."""
    from services.devstack import run_dev

    # The sample receiver is local, so private addresses are allowed, unless the operator
    # said otherwise (to try the guard): overridden silently, their setting looked broken.
    settings = _settings()
    # As the settings read it: an empty variable is an unset one, and any case is taken.
    if "allow_private_urls" not in settings.model_fields_set:
        settings = settings.model_copy(update={"allow_private_urls": True})
    elif not settings.allow_private_urls:
        structlog.get_logger().warning(
            "private_urls_refused",
            detail="HOOKWIRE_ALLOW_PRIVATE_URLS=false: the sample receiver, on this machine,"
            " gets no deliveries",
        )
    _run(run_dev(settings))


@main.command()
def auth() -> None:
    """Run the auth service."""
    from services.auth.app import AuthService

    _run(_serve(_settings(), AuthService))


@main.command()
def api() -> None:
    """Run the api service."""
    from services.api.app import ApiService

    _run(_serve(_settings(), ApiService))


@main.command()
def dispatcher() -> None:
    """Run one dispatcher process (run several for more throughput)."""
    from services.dispatcher.app import DispatcherService

    _run(_serve(_settings(), DispatcherService))


@main.command(name="migrate")
def migrate_command() -> None:
    """Apply pending database migrations."""
    settings = _settings()
    click.echo(
        _run(
            migrate(
                settings.effective_database_url,
                lock_timeout_seconds=settings.migration_lock_timeout_seconds,
                lock_wait_seconds=settings.migration_lock_wait_seconds,
            )
        )
    )


@main.command()
def topics() -> None:
    """Create the topics hookwire uses that are missing (an existing one is left as it is)."""
    settings = _settings()
    checked = _run(ensure_topics(settings))
    if checked.created:
        click.echo(f"created {len(checked.created)} topics: {', '.join(checked.created)}")
    else:
        click.echo("topics are in place: none was missing")
    for topic, has, expected in checked.differing:
        # Left as they are: partitions cannot be taken away, and adding some moves keys.
        click.echo(
            f"warning: {topic} has {has} partitions, not {expected}"
            " (docs/events.md says what each topic needs)",
            err=True,
        )


@main.group()
def admin() -> None:
    """Bootstrap users, teams, memberships and tokens from the command line."""


# What the api takes for a name, and what the users table holds for an email.
_NAME: TypeAdapter[str] = TypeAdapter(Name)
_EMAIL_SHAPE = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")


def _email_shaped(value: str) -> str:
    if not _EMAIL_SHAPE.fullmatch(value):
        raise ValueError("must be an address like name@example.com")
    return value


_EMAIL = TypeAdapter(Annotated[StoredText, Field(max_length=320), AfterValidator(_email_shaped)])


def _checked(adapter: TypeAdapter[str]) -> Callable[[click.Context, click.Parameter, str], str]:
    """A click callback: surrounding spaces dropped, then the value as the api would take
    it, or a usage error naming the option (exit 2) rather than a row no request could
    make, or a database error on PostgreSQL."""

    def check(context: click.Context, parameter: click.Parameter, value: str) -> str:
        try:
            return adapter.validate_python(value.strip())
        except ValidationError as exc:
            message = exc.errors()[0]["msg"].removeprefix("Value error, ")
            raise click.BadParameter(message) from None

    return check


def _with_engine(settings: Settings, action: Callable[[AsyncEngine], Awaitable[T]]) -> T:
    async def run() -> T:
        engine = create_engine(settings.effective_database_url)
        try:
            return await action(engine)
        finally:
            await engine.dispose()

    return _run(run())


@admin.command("create-user")
@click.option("--email", required=True, callback=_checked(_EMAIL))
@click.option("--name", required=True, callback=_checked(_NAME))
def create_user(email: str, name: str) -> None:
    """Create a user (or print the existing one's id)."""
    from services.auth import admin as ops

    click.echo(_with_engine(_settings(), lambda e: ops.create_user(e, email, name)))


@admin.command("create-team")
@click.option("--name", required=True, callback=_checked(_NAME))
def create_team(name: str) -> None:
    """Create a team (or print the existing one's id)."""
    from services.auth import admin as ops

    click.echo(_with_engine(_settings(), lambda e: ops.create_team(e, name)))


@admin.command("add-member")
@click.option("--user", "user_id", required=True)
@click.option("--team", "team_id", required=True)
@click.option("--role", type=click.Choice(["owner", "admin", "member"]), default="member")
def add_member(user_id: str, team_id: str, role: str) -> None:
    """Make a user a member of a team with a role."""
    from services.auth import admin as ops

    settings = _settings()
    _with_engine(settings, lambda e: ops.add_member(e, user_id, team_id, role))
    _run(ops.notify(settings, "membership", f"{user_id}:{team_id}", None))
    click.echo(f"{user_id} is {role} of {team_id}")


@admin.command("create-token")
@click.option("--user", "user_id", required=True)
@click.option("--name", required=True, callback=_checked(_NAME))
@click.option("--permission", "permissions", multiple=True, help="repeat; default: all")
@click.option(
    "--expires-in-days",
    type=click.IntRange(min=1, max=36_500),
    default=None,
    help="default: never, or required within HOOKWIRE_TOKEN_MAX_LIFETIME_DAYS when set",
)
def create_token(
    user_id: str, name: str, permissions: tuple[str, ...], expires_in_days: int | None
) -> None:
    """Create a token and print it once; it cannot be shown again."""
    from services.auth import admin as ops
    from services.auth.tokens import lifetime_problem

    settings = _settings()
    now = utcnow()
    expires_at = None if expires_in_days is None else now + timedelta(days=expires_in_days)
    limit = settings.token_max_lifetime_days
    if lifetime_problem(expires_at, now, limit) is not None:
        # The rule every key made through the api follows.
        click.echo(
            f"error: tokens have a maximum lifetime: give --expires-in-days of at most {limit}",
            err=True,
        )
        sys.exit(2)
    pepper = _run(_secret(settings))
    wanted = list(permissions) or sorted(PERMISSIONS)
    token_id, token = _with_engine(
        settings,
        lambda e: ops.create_token(
            e,
            pepper=pepper,
            user_id=user_id,
            name=name,
            permissions=wanted,
            expires_at=expires_at,
        ),
    )
    click.echo(f"{token_id} {token}")


@admin.command("list-tokens")
@click.option("--user", "user_id", required=True)
def list_tokens(user_id: str) -> None:
    """List a user's tokens (never their secrets)."""
    from services.auth import admin as ops

    for token in _with_engine(_settings(), lambda e: ops.list_tokens(e, user_id)):
        name = token["name"]
        # A name stored before names were held to one line is shown escaped: printed as it
        # is, a newline in it would make a line of its own, one that can pass for a key's.
        shown = name if name.isprintable() else repr(name)
        click.echo(
            f"{token['id']}  {token['display_prefix']}…  {token['state']:<8}  "
            f"{token['permissions']:>2} permissions  {shown}"
        )


@admin.command("revoke-token")
@click.option("--token", "token_id", required=True, help="the token id (tok_…)")
def revoke_token(token_id: str) -> None:
    """Revoke a token at once, whoever owns it."""
    from services.auth import admin as ops

    settings = _settings()
    _with_engine(settings, lambda e: ops.revoke_token(e, token_id))
    untold = _run(ops.notify(settings, "token", token_id, "revoked"))
    reach = (
        "running services told"
        if untold is None
        else f"services not told ({untold}): auth's cache drops it within"
        " HOOKWIRE_TOKEN_CACHE_SECONDS, the api's access tokens end within"
        " HOOKWIRE_ENDED_KEYS_SYNC_SECONDS"
    )
    click.echo(f"{token_id} revoked ({reach})")


async def _secret(settings: Settings) -> str:
    return settings.require_secret("token_pepper")
