"""delivery log: one row per delivery, one per attempt

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    # No foreign key to webhooks: attempt records can arrive after a webhook was
    # force-deleted, and the consumer must not wedge on them.
    op.create_table(
        "deliveries",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("team_id", sa.String(64), nullable=False),
        sa.Column("webhook_id", sa.String(64), nullable=False),
        sa.Column("event_id", sa.String(128), nullable=False),
        sa.Column("event_type", sa.String(64), nullable=False),
        sa.Column("event", sa.JSON, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("last_status_code", sa.Integer),
        sa.Column("last_error", sa.Text),
        sa.Column("next_retry_at", _TS),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
    )
    op.create_index("ix_deliveries_webhook_created", "deliveries", ["webhook_id", "created_at"])
    op.create_index("ix_deliveries_team_created", "deliveries", ["team_id", "created_at"])
    op.create_table(
        "delivery_attempts",
        sa.Column("delivery_id", sa.String(64), primary_key=True),
        sa.Column("attempt", sa.Integer, primary_key=True),
        # An attempt re-made after a crash keeps its number but not its time: both rows stay.
        sa.Column("attempted_at", _TS, primary_key=True),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("status_code", sa.Integer),
        sa.Column("latency_ms", sa.Float),
        sa.Column("error", sa.Text),
        sa.Column("error_class", sa.String(32)),
        sa.Column("final", sa.Boolean, nullable=False),
        sa.Column("next_retry_at", _TS),
        sa.Column("request_headers", sa.JSON, nullable=False),
        sa.Column("response_body", sa.Text),
    )


def downgrade() -> None:
    op.drop_table("delivery_attempts")
    op.drop_table("deliveries")
