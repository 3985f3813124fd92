"""Which kind of heatmap a record kept: a server-blended overlay or the raw 8-bit map (older rows: NULL).

Revision ID: 0003_heatmap_kind
Revises: 0002_catalog
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_heatmap_kind"
down_revision = "0002_catalog"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("inspections", sa.Column("heatmap_kind", sa.String(16)))


def downgrade() -> None:
    op.drop_column("inspections", "heatmap_kind")
