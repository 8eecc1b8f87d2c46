"""the process that owns a pending start or stop

Revision ID: c4d8a2e61f05
Revises: b7e4f0c2d913
Create Date: 2026-12-01

"""

# revision identifiers, used by Alembic.
revision = "c4d8a2e61f05"
down_revision = "b7e4f0c2d913"
branch_labels = None
depends_on = None

import sqlalchemy as sa
from alembic import op


def upgrade():
    with op.batch_alter_table("servers") as batch:
        batch.add_column(
            sa.Column("owner", sa.Unicode(255), nullable=False, server_default="")
        )


def downgrade():
    with op.batch_alter_table("servers") as batch:
        batch.drop_column("owner")
