"""webhooks: an optional per-endpoint rate limit

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # batch mode, like the others: SQLite can add a column but not drop one in place.
    with op.batch_alter_table("webhooks") as batch:
        batch.add_column(sa.Column("rate_limit", sa.Float()))


def downgrade() -> None:
    with op.batch_alter_table("webhooks") as batch:
        batch.drop_column("rate_limit")
