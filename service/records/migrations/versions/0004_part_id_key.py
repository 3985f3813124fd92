"""The part an inspection was of (`part_id`, from the line) and the key that made it (`key_name`).

Revision ID: 0004_part_id_key
Revises: 0003_heatmap_kind
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_part_id_key"
down_revision = "0003_heatmap_kind"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("inspections", sa.Column("part_id", sa.String(64)))
    op.add_column("inspections", sa.Column("key_name", sa.String(128)))
    op.create_index("ix_inspections_part_id", "inspections", ["part_id"])


def downgrade() -> None:
    op.drop_index("ix_inspections_part_id", "inspections")
    op.drop_column("inspections", "key_name")
    op.drop_column("inspections", "part_id")
