"""the spawn history: one row per start, kept after its server is gone

Revision ID: d5e9b3f70a16
Revises: c4d8a2e61f05
Create Date: 2026-12-02

"""

# revision identifiers, used by Alembic.
revision = "d5e9b3f70a16"
down_revision = "c4d8a2e61f05"
branch_labels = None
depends_on = None

import sqlalchemy as sa
from alembic import op


def upgrade():
    op.create_table(
        "start_history",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("hub_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.Unicode(255), nullable=False),
        sa.Column("start_id", sa.Unicode(128), nullable=False),
        sa.Column("flavor", sa.Unicode(255), nullable=True),
        sa.Column("started", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended", sa.DateTime(timezone=True), nullable=True),
        sa.Column("stopped", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outcome", sa.Unicode(32), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=True),
        sa.ForeignKeyConstraint(["hub_id"], ["hubs.id"], name=op.f("fk_start_history_hub_id_hubs"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_start_history_user_id_users"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_start_history")),
        sa.UniqueConstraint("hub_id", "name", "start_id", name=op.f("uq_start_history_hub_id")),
    )
    op.create_index("ix_start_history_user_started", "start_history", ["hub_id", "user_id", "started"])


def downgrade():
    op.drop_index("ix_start_history_user_started", table_name="start_history")
    op.drop_table("start_history")
