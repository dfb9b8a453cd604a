"""webhooks: when the endpoint's current run of failures began

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # batch mode: SQLite alters a table by copying it.
    with op.batch_alter_table("webhooks") as batch:
        batch.add_column(sa.Column("failing_since", sa.DateTime(timezone=True)))


def downgrade() -> None:
    with op.batch_alter_table("webhooks") as batch:
        batch.drop_column("failing_since")
