"""webhooks: each run of failures under way restarts at its last failure

Revision ID: 0015
Revises: 0014
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

_MOMENT = sa.DateTime(timezone=True)


def upgrade() -> None:
    # Before 0013 a run never ended for a quiet gap, and 0014 kept the start so stored: a
    # run that spanned days of quiet (a failure, nothing, a failure) still counted from
    # its first failure, and one more failure could disable the webhook that much early.
    # Which runs spanned a gap is not known here (the gap depends on the retry schedule),
    # so every run under way restarts at its last failure: a disable later, never sooner.
    webhooks = sa.table(
        "webhooks",
        sa.column("failing_since", _MOMENT),
        sa.column("last_failure_at", _MOMENT),
    )
    op.execute(
        webhooks.update()
        .where(
            webhooks.c.failing_since.is_not(None),
            webhooks.c.last_failure_at.is_not(None),
            webhooks.c.last_failure_at > webhooks.c.failing_since,
        )
        .values(failing_since=webhooks.c.last_failure_at)
    )


def downgrade() -> None:
    pass  # a run's start, once moved later, is not known again; nothing to undo
