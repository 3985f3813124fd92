"""Inspection records, their artefacts, reviews and threshold changes.

Revision ID: 0001_records
Revises:
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0001_records"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "inspections",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("created_ms", sa.BigInteger, nullable=False),
        sa.Column("category", sa.String(128), nullable=False),
        sa.Column("source", sa.String(64)),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("is_anomalous", sa.Boolean, nullable=False),
        sa.Column("needs_review", sa.Boolean, nullable=False),
        sa.Column("threshold", sa.Float, nullable=False),
        sa.Column("threshold_source", sa.String(32), nullable=False),
        sa.Column("references", sa.Integer, nullable=False),
        sa.Column("position", sa.String(32)),
        sa.Column("boxes", sa.JSON, nullable=False),
        sa.Column("top_types", sa.JSON, nullable=False),
        sa.Column("model_version", sa.String(300), nullable=False),
        sa.Column("timing_ms", sa.JSON, nullable=False),
        sa.Column("has_image", sa.Boolean, nullable=False),
        sa.Column("has_heatmap", sa.Boolean, nullable=False),
        sa.Column("review_label", sa.String(16)),
        sa.Column("review_defect_type", sa.String(200)),
        sa.Column("review_note", sa.Text),
        sa.Column("reviewer", sa.String(128)),
        sa.Column("reviewed_ms", sa.BigInteger),
    )
    op.create_index("ix_inspections_created", "inspections", ["created_ms", "id"])
    op.create_index("ix_inspections_category_created", "inspections", ["category", "created_ms"])
    op.create_index("ix_inspections_source_created", "inspections", ["source", "created_ms"])
    op.create_table(
        "artefacts",
        sa.Column("inspection_id", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(16), primary_key=True),
        sa.Column("media_type", sa.String(64), nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("inspection_id", sa.String(64), nullable=False),
        sa.Column("label", sa.String(16), nullable=False),
        sa.Column("defect_type", sa.String(200)),
        sa.Column("note", sa.Text),
        sa.Column("reviewer", sa.String(128), nullable=False),
        sa.Column("reviewed_ms", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_reviews_inspection_id", "reviews", ["inspection_id"])
    op.create_table(
        "threshold_changes",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("category", sa.String(128), nullable=False),
        sa.Column("at_ms", sa.BigInteger, nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("threshold", sa.Float),
        sa.Column("previous", sa.Float),
        sa.Column("detail", sa.JSON, nullable=False),
    )
    op.create_index("ix_threshold_changes_category", "threshold_changes", ["category"])


def downgrade() -> None:
    for table in ("threshold_changes", "reviews", "artefacts", "inspections"):
        op.drop_table(table)
