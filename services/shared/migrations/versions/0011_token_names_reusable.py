"""tokens: a name is unique among a user's keys not revoked, so a revoked key's name can
be given to its replacement

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

_LIVE = sa.text("revoked_at IS NULL")


def upgrade() -> None:
    with op.batch_alter_table("tokens") as batch:
        batch.drop_constraint("uq_tokens_user_name", type_="unique")
    op.create_index(
        "uq_tokens_user_name_live",
        "tokens",
        ["user_id", "name"],
        unique=True,
        postgresql_where=_LIVE,
        sqlite_where=_LIVE,
    )


def downgrade() -> None:
    # Fails while a revoked key and a live one of the same user share a name: rename one.
    op.drop_index("uq_tokens_user_name_live", table_name="tokens")
    with op.batch_alter_table("tokens") as batch:
        batch.create_unique_constraint("uq_tokens_user_name", ["user_id", "name"])
