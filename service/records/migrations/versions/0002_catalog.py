"""The catalog's durable home: categories, deleted names, per-category extras and the version they form.

Revision ID: 0002_catalog
Revises: 0001_records
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_catalog"
down_revision = "0001_records"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "catalog_state",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("updated_ms", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "catalog_categories",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("definition", sa.Text, nullable=False),
    )
    op.create_table("catalog_deleted", sa.Column("name", sa.String(128), primary_key=True))
    op.create_table(
        "catalog_extras",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("kind", sa.String(32), primary_key=True),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )


def downgrade() -> None:
    for table in ("catalog_extras", "catalog_deleted", "catalog_categories", "catalog_state"):
        op.drop_table(table)
