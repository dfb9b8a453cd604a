"""token rotation grace, permission groups, audit log

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "permission_groups",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("user_id", sa.String(64), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("permissions", sa.JSON, nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.UniqueConstraint("user_id", "name", name="uq_permission_groups_user_name"),
    )
    with op.batch_alter_table("tokens") as batch:
        batch.add_column(sa.Column("previous_secret_hash", sa.String(64)))
        batch.add_column(sa.Column("previous_expires_at", _TS))
        batch.add_column(sa.Column("permission_group_id", sa.String(64)))
        batch.create_unique_constraint("uq_tokens_previous_secret_hash", ["previous_secret_hash"])
        batch.create_foreign_key(
            "fk_tokens_permission_group", "permission_groups", ["permission_group_id"], ["id"],
            ondelete="SET NULL",
        )
    op.create_table(
        "audit_log",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("at", _TS, nullable=False),
        sa.Column("actor_user_id", sa.String(64)),
        sa.Column("actor_token_id", sa.String(64)),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target_type", sa.String(32), nullable=False),
        sa.Column("target_id", sa.String(64), nullable=False),
        sa.Column("team_id", sa.String(64)),
        sa.Column("ip", sa.String(64)),
        sa.Column("request_id", sa.String(64)),
        sa.Column("details", sa.JSON),
    )
    op.create_index("ix_audit_log_at", "audit_log", ["at"])
    op.create_index("ix_audit_log_actor", "audit_log", ["actor_user_id", "at"])
    op.create_index("ix_audit_log_team", "audit_log", ["team_id", "at"])


def downgrade() -> None:
    op.drop_table("audit_log")
    with op.batch_alter_table("tokens") as batch:
        batch.drop_constraint("fk_tokens_permission_group", type_="foreignkey")
        batch.drop_constraint("uq_tokens_previous_secret_hash", type_="unique")
        batch.drop_column("permission_group_id")
        batch.drop_column("previous_expires_at")
        batch.drop_column("previous_secret_hash")
    op.drop_table("permission_groups")
