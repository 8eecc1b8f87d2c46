"""first schema: hubs, users, servers

Revision ID: a1b2c3d4e5f6
Revises:
Create Date: 2026-11-26

"""

# revision identifiers, used by Alembic.
revision = "a1b2c3d4e5f6"
down_revision = None
branch_labels = None
depends_on = None

import sqlalchemy as sa
from alembic import op


def upgrade():
    op.create_table(
        "hubs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.Unicode(255), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_hubs")),
        sa.UniqueConstraint("name", name=op.f("uq_hubs_name")),
    )
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("hub_id", sa.Integer(), nullable=False),
        sa.Column("hub_user_id", sa.Unicode(255), nullable=False),
        sa.Column("name", sa.Unicode(255), nullable=False),
        sa.ForeignKeyConstraint(
            ["hub_id"], ["hubs.id"], name=op.f("fk_users_hub_id_hubs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("hub_id", "hub_user_id", name=op.f("uq_users_hub_id")),
    )
    op.create_table(
        "servers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("hub_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.Unicode(255), nullable=False),
        sa.Column("start_id", sa.Unicode(128), nullable=False),
        sa.Column("spawner_class", sa.Unicode(1023), nullable=False),
        sa.Column("flavor", sa.Unicode(255), nullable=True),
        sa.Column("state", sa.LargeBinary(), nullable=True),
        sa.Column("request", sa.LargeBinary(), nullable=False),
        sa.Column("service", sa.Unicode(1023), nullable=False),
        sa.Column("start_pending", sa.Boolean(), nullable=False),
        sa.Column("stop_pending", sa.Boolean(), nullable=False),
        sa.Column("started", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_update", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["hub_id"], ["hubs.id"], name=op.f("fk_servers_hub_id_hubs"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_servers_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_servers")),
        sa.UniqueConstraint("hub_id", "name", "start_id", name=op.f("uq_servers_hub_id")),
    )


def downgrade():
    op.drop_table("servers")
    op.drop_table("users")
    op.drop_table("hubs")
