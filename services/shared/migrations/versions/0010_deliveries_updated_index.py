"""deliveries: an index on the last change, for the delivery log's retention

Revision ID: 0010
Revises: 0009
"""

from alembic import op

from services.shared.migrations._builds import concurrent_build

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    context = op.get_context()
    if context.dialect.name != "postgresql":
        op.create_index("ix_deliveries_updated", "deliveries", ["updated_at"], if_not_exists=True)
        return
    # Built without holding the delivery log's writes for as long as a large table takes;
    # CONCURRENTLY cannot run inside a transaction. Built and committed before the version
    # is, so a migration stopped in between finds it there when run again.
    with concurrent_build():
        op.create_index(
            "ix_deliveries_updated",
            "deliveries",
            ["updated_at"],
            postgresql_concurrently=True,
            if_not_exists=True,
        )


def downgrade() -> None:
    op.drop_index("ix_deliveries_updated", table_name="deliveries")
