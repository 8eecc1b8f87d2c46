"""flavor runtime (end dates), leases for background work, flavor index

Revision ID: b7e4f0c2d913
Revises: a1b2c3d4e5f6
Create Date: 2026-11-26

"""

# revision identifiers, used by Alembic.
revision = "b7e4f0c2d913"
down_revision = "a1b2c3d4e5f6"
branch_labels = None
depends_on = None

from datetime import datetime

import sqlalchemy as sa
from alembic import op


def upgrade():
    with op.batch_alter_table("servers") as batch:
        batch.add_column(sa.Column("end_date", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(
            sa.Column("end_warned", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.create_index("ix_servers_flavor", ["flavor"])
    leases = op.create_table(
        "leases",
        sa.Column("name", sa.Unicode(255), nullable=False),
        sa.Column("owner", sa.Unicode(255), nullable=False),
        sa.Column("expires", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_leases")),
    )
    # the row that serializes starts with flavor limits (see orm.ACCOUNTING_LOCK)
    op.bulk_insert(
        leases,
        [{"name": "flavor-accounting", "owner": "", "expires": datetime(2000, 1, 1)}],
    )


def downgrade():
    op.drop_table("leases")
    with op.batch_alter_table("servers") as batch:
        batch.drop_index("ix_servers_flavor")
        batch.drop_column("end_warned")
        batch.drop_column("end_date")
