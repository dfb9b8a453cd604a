"""idempotency_keys: the event id a claimed key publishes under

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Null for keys claimed before this release: their id is derived as it was then.
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.add_column(sa.Column("event_id", sa.String(64)))


def downgrade() -> None:
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.drop_column("event_id")
