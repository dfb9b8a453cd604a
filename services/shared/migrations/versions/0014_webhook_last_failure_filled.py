"""webhooks: the last failure of each run under way, from the delivery log

Revision ID: 0014
Revises: 0013
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

_MOMENT = sa.DateTime(timezone=True)


def upgrade() -> None:
    # Left empty, a webhook quiet since its run began would look as if it had failed all
    # along, and be disabled by its next failure, however far off. Apart from 0013, whose
    # new column locks the table: this only writes the rows of failing webhooks, whose
    # deliveries since the run began it reads (a delivery attempted since was updated
    # since). Where the log was pruned, the run's start stands in: its next failure may then
    # start a new run, so a disable comes later, never sooner.
    webhooks = sa.table(
        "webhooks",
        sa.column("id", sa.String),
        sa.column("team_id", sa.String),
        sa.column("failing_since", _MOMENT),
        sa.column("last_failure_at", _MOMENT),
    )
    deliveries = sa.table(
        "deliveries",
        sa.column("id", sa.String),
        sa.column("team_id", sa.String),
        sa.column("webhook_id", sa.String),
        sa.column("updated_at", _MOMENT),
    )
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
            deliveries.c.team_id == webhooks.c.team_id,
            deliveries.c.updated_at >= webhooks.c.failing_since,
            attempts.c.outcome == "failed",
            attempts.c.attempted_at >= webhooks.c.failing_since,
        )
        .scalar_subquery()
    )
    op.execute(
        webhooks.update()
        .where(webhooks.c.failing_since.is_not(None), webhooks.c.last_failure_at.is_(None))
        .values(last_failure_at=sa.func.coalesce(latest, webhooks.c.failing_since))
    )


def downgrade() -> None:
    pass  # the column goes with 0013's downgrade
