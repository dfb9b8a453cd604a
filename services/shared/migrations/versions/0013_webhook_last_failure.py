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


def upgrade() -> None:
    # batch mode: SQLite alters a table by copying it.
    with op.batch_alter_table("webhooks") as batch:
        batch.add_column(sa.Column("last_failure_at", sa.DateTime(timezone=True)))


def downgrade() -> None:
    with op.batch_alter_table("webhooks") as batch:
        batch.drop_column("last_failure_at")
