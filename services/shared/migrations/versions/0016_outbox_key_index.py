"""outbox: an index on each key's records in order, for the claim that leaves a key alone
while another relay holds its earlier record, and for a request looking for an earlier
record of its key before publishing

Revision ID: 0016
Revises: 0015
"""

from alembic import op

from services.shared.migrations._builds import concurrent_build

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

_NAME = "ix_outbox_key"
_COLUMNS = ["topic", "key", "created_at"]


def upgrade() -> None:
    context = op.get_context()
    if context.dialect.name != "postgresql":
        op.create_index(_NAME, "outbox", _COLUMNS, if_not_exists=True)
        return
    # As 0010: built without holding the outbox's writes (every change to an object writes
    # a row) for as long as a backlog left by an outage takes.
    with concurrent_build():
        op.create_index(_NAME, "outbox", _COLUMNS, postgresql_concurrently=True, if_not_exists=True)


def downgrade() -> None:
    op.drop_index(_NAME, table_name="outbox")
