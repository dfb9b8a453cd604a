"""Table definitions used for queries; Alembic migrations create and evolve them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)


class UtcDateTime(TypeDecorator[datetime]):
    """A point in time, kept and compared in UTC on every database.

    SQLite stores the wall time of what it is given and drops the offset, so an aware time
    in another zone would be stored hours off, and a comparison with one would be wrong;
    it also hands back naive values. Converting every bound value (stored or compared) to
    UTC, and reading every value as UTC, makes both databases agree."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        moment: datetime = value
        return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)


metadata = MetaData()

users = Table(
    "users",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("email", String(320), nullable=False, unique=True),
    Column("name", String(200), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
)

teams = Table(
    "teams",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("created_at", UtcDateTime(), nullable=False),
)

memberships = Table(
    "memberships",
    metadata,
    Column("user_id", String(64), ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("team_id", String(64), ForeignKey("teams.id", ondelete="CASCADE"), primary_key=True),
    Column("role", String(16), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
)

tokens = Table(
    "tokens",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("user_id", String(64), ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(200), nullable=False),
    Column("description", Text, nullable=False, default=""),
    Column("secret_hash", String(64), nullable=False, unique=True),
    Column("display_prefix", String(16), nullable=False),
    Column("permissions", JSON, nullable=False),
    Column("active", Boolean, nullable=False, default=True),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("expires_at", UtcDateTime()),
    Column("revoked_at", UtcDateTime()),
    Column("last_used_at", UtcDateTime()),
    Column("last_used_ip", String(64)),
    Column("allowed_cidrs", JSON),
    Column("inactivity_timeout_seconds", Integer),
    Column("previous_secret_hash", String(64), unique=True),
    Column("previous_expires_at", UtcDateTime()),
    # When it was last switched off: its access tokens are refused for one lifetime after.
    Column("deactivated_at", UtcDateTime()),
    Column(
        "permission_group_id",
        String(64),
        ForeignKey("permission_groups.id", ondelete="SET NULL"),
    ),
    # Among a user's keys not revoked: a revoked key's name goes to its replacement.
    Index(
        "uq_tokens_user_name_live",
        "user_id",
        "name",
        unique=True,
        postgresql_where=text("revoked_at IS NULL"),
        sqlite_where=text("revoked_at IS NULL"),
    ),
    # The list of ended keys reads each of these by range (store.ended_token_ids).
    Index("ix_tokens_revoked_at", "revoked_at"),
    Index("ix_tokens_expires_at", "expires_at"),
    Index("ix_tokens_deactivated_at", "deactivated_at"),
)

permission_groups = Table(
    "permission_groups",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("user_id", String(64), ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(200), nullable=False),
    Column("description", Text, nullable=False, default=""),
    Column("permissions", JSON, nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
    UniqueConstraint("user_id", "name", name="uq_permission_groups_user_name"),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("at", UtcDateTime(), nullable=False),
    Column("actor_user_id", String(64)),
    Column("actor_token_id", String(64)),
    Column("action", String(64), nullable=False),
    Column("target_type", String(32), nullable=False),
    Column("target_id", String(64), nullable=False),
    Column("team_id", String(64)),
    Column("ip", String(64)),
    Column("request_id", String(64)),
    Column("details", JSON),
    Index("ix_audit_log_at", "at"),
    Index("ix_audit_log_actor", "actor_user_id", "at"),
    Index("ix_audit_log_team", "team_id", "at"),
    # What was done to a user's keys, whoever did it (migration 0018).
    Index("ix_audit_log_target", "target_id", "at"),
)

webhooks = Table(
    "webhooks",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("team_id", String(64), ForeignKey("teams.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(200), nullable=False),
    Column("description", Text, nullable=False, default=""),
    Column("url", Text, nullable=False),
    Column("topics", JSON, nullable=False),
    Column("object_types", JSON),
    Column("headers", JSON, nullable=False),
    Column("secrets", JSON, nullable=False),
    Column("active", Boolean, nullable=False, default=True),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
    Column("deleted_at", UtcDateTime()),
    # The first failed attempt since the last success (or since the webhook was reactivated
    # or pointed elsewhere); null while it is healthy. The delivery log's writer keeps it,
    # so the "no success for days" rule outlives any dispatcher process.
    Column("failing_since", UtcDateTime()),
    # That run's latest failed attempt, read only while failing_since is set: a failure
    # long after it starts a run of its own rather than extending a quiet endpoint's.
    Column("last_failure_at", UtcDateTime()),
    # Deliveries a second this endpoint takes at most; null: the dispatcher's default.
    Column("rate_limit", Float),
    Index("ix_webhooks_team", "team_id"),
)

objects = Table(
    "objects",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("team_id", String(64), ForeignKey("teams.id", ondelete="CASCADE"), nullable=False),
    Column("object_type", String(128), nullable=False),
    Column("data", JSON, nullable=False),
    Column("version", Integer, nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
    Column("deleted_at", UtcDateTime()),
    Index("ix_objects_team_type", "team_id", "object_type"),
)

outbox = Table(
    "outbox",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("topic", String(255), nullable=False),
    Column("key", String(255), nullable=False),
    Column("value", Text, nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    # Which relay took the row and until when: several api processes relay the same table.
    Column("claimed_by", String(64)),
    Column("claimed_until", UtcDateTime()),
    Index("ix_outbox_created_at", "created_at"),
    Index("ix_outbox_key", "topic", "key", "created_at"),
)

idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("team_id", String(64), primary_key=True),
    Column("key", String(255), primary_key=True),
    Column("request_hash", String(64), nullable=False),
    # None while a request holds the key; 0 once its publish failed (free for a retry,
    # which publishes under the same event id); the answer's status once it answered.
    Column("status", Integer),
    Column("response", JSON),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("event_id", String(64)),
    Index("ix_idempotency_keys_created_at", "created_at"),
)

deliveries = Table(
    "deliveries",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("team_id", String(64), nullable=False),
    Column("webhook_id", String(64), nullable=False),
    Column("event_id", String(128), nullable=False),
    Column("event_type", String(64), nullable=False),
    Column("event", JSON, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("last_status_code", Integer),
    Column("last_error", Text),
    Column("next_retry_at", UtcDateTime()),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
    Index("ix_deliveries_webhook_created", "webhook_id", "created_at"),
    Index("ix_deliveries_team_created", "team_id", "created_at"),
    Index("ix_deliveries_updated", "updated_at"),
)

delivery_attempts = Table(
    "delivery_attempts",
    metadata,
    Column("delivery_id", String(64), primary_key=True),
    Column("attempt", Integer, primary_key=True),
    Column("attempted_at", UtcDateTime(), primary_key=True),
    Column("outcome", String(16), nullable=False),
    Column("status_code", Integer),
    Column("latency_ms", Float),
    Column("error", Text),
    Column("error_class", String(32)),
    Column("final", Boolean, nullable=False),
    Column("next_retry_at", UtcDateTime()),
    Column("request_headers", JSON, nullable=False),
    Column("response_body", Text),
    # event, manual or test; none for attempts recorded before it was kept (migration 0017).
    Column("kind", String(16)),
)
