"""audit_log: an index on each record's target, for a key's owner reading what was done to
their keys (an operator's command line acts as no user)

Revision ID: 0018
Revises: 0017
"""

from alembic import op

from services.shared.migrations._builds import concurrent_build

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

_NAME = "ix_audit_log_target"
_COLUMNS = ["target_id", "at"]


def upgrade() -> None:
    context = op.get_context()
    if context.dialect.name != "postgresql":
        op.create_index(_NAME, "audit_log", _COLUMNS, if_not_exists=True)
        return
    # As 0010: built without holding the audit log's writes (every key and webhook change
    # writes a row) for as long as a long log takes.
    with concurrent_build():
        op.create_index(
            _NAME, "audit_log", _COLUMNS, postgresql_concurrently=True, if_not_exists=True
        )


def downgrade() -> None:
    op.drop_index(_NAME, table_name="audit_log")
