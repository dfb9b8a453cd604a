"""webhooks: the latest failed attempt of the endpoint's current run of failures

Revision ID: 0013
Revises: 0012
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


_MOMENT = sa.DateTime(timezone=True)


def upgrade() -> None:
    # batch mode: SQLite alters a table by copying it.
    with op.batch_alter_table("webhooks") as batch:
        batch.add_column(sa.Column("last_failure_at", _MOMENT))
    # A run under way gets its last failure from the delivery log: left empty, a webhook
    # quiet since its run began would look as if it had failed all along, and be disabled
    # by its next failure, however far off. With the log pruned, the run's start stands in
    # (its next failure may then start a new run: a disable comes later, never sooner).
    webhooks = sa.table(
        "webhooks",
        sa.column("id", sa.String),
        sa.column("failing_since", _MOMENT),
        sa.column("last_failure_at", _MOMENT),
    )
    deliveries = sa.table("deliveries", sa.column("id", sa.String), sa.column("webhook_id"))
    attempts = sa.table(
        "delivery_attempts",
        sa.column("delivery_id", sa.String),
        sa.column("attempted_at", _MOMENT),
        sa.column("outcome", sa.String),
    )
    latest = (
        sa.select(sa.func.max(attempts.c.attempted_at))
        .select_from(attempts.join(deliveries, deliveries.c.id == attempts.c.delivery_id))
        .where(
            deliveries.c.webhook_id == webhooks.c.id,
            attempts.c.outcome == "failed",
            attempts.c.attempted_at >= webhooks.c.failing_since,
        )
        .scalar_subquery()
    )
    op.execute(
        webhooks.update()
        .where(webhooks.c.failing_since.is_not(None))
        .values(last_failure_at=sa.func.coalesce(latest, webhooks.c.failing_since))
    )


def downgrade() -> None:
    with op.batch_alter_table("webhooks") as batch:
        batch.drop_column("last_failure_at")
