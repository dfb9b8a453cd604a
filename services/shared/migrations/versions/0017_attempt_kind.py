"""delivery_attempts: what made each attempt (the dispatcher's schedule, a re-send asked
for through the api, a test event)

Revision ID: 0017
Revises: 0016
"""

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable and with no default: added without rewriting the table (the log's largest)
    # on either database. Attempts recorded before it show no kind: it was not kept.
    with op.batch_alter_table("delivery_attempts") as batch:
        batch.add_column(sa.Column("kind", sa.String(16)))


def downgrade() -> None:
    with op.batch_alter_table("delivery_attempts") as batch:
        batch.drop_column("kind")
