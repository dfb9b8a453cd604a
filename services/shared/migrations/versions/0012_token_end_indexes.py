"""tokens: indexes on when a key was revoked, expires and was switched off, for the list
of ended keys every api process reads every few seconds

Revision ID: 0012
Revises: 0011
"""

from alembic import op

from services.shared.migrations._builds import concurrent_build

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

_INDEXES = {
    "ix_tokens_revoked_at": "revoked_at",
    "ix_tokens_expires_at": "expires_at",
    "ix_tokens_deactivated_at": "deactivated_at",
}


def upgrade() -> None:
    context = op.get_context()
    if context.dialect.name != "postgresql":
        for name, column in _INDEXES.items():
            op.create_index(name, "tokens", [column], if_not_exists=True)
        return
    # As 0010: built without holding the tokens table's writes (key creation, last use)
    # for as long as a large table takes, each committed before the version is.
    with concurrent_build():
        for name, column in _INDEXES.items():
            op.create_index(
                name, "tokens", [column], postgresql_concurrently=True, if_not_exists=True
            )


def downgrade() -> None:
    for name in _INDEXES:
        op.drop_index(name, table_name="tokens")
