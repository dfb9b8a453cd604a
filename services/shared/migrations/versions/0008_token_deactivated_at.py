"""tokens: when a key was last deactivated

Revision ID: 0008
Revises: 0007
"""

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tokens") as batch:
        batch.add_column(sa.Column("deactivated_at", sa.DateTime(timezone=True)))
    # Keys already off count from now: their access tokens are refused for one more
    # lifetime, then they leave the ended-keys list like any other.
    tokens = sa.table(
        "tokens",
        sa.column("active", sa.Boolean),
        sa.column("deactivated_at", sa.DateTime(timezone=True)),
    )
    # In UTC, as every stored time (SQLite keeps the wall time it is given).
    op.execute(
        tokens.update().where(tokens.c.active.is_(False)).values(deactivated_at=datetime.now(UTC))
    )


def downgrade() -> None:
    with op.batch_alter_table("tokens") as batch:
        batch.drop_column("deactivated_at")
