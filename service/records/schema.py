"""The records tables (SQLAlchemy Core). Alembic's migrations in `migrations/versions` create them; a test
checks that the migrated database and these declarations agree.

Times are epoch milliseconds (BIGINT): one integer type on SQLite and PostgreSQL, keyset pagination on
`(created_ms, id)`, and hour/day buckets by integer division that both dialects compute alike.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

inspections = Table(
    "inspections", metadata,
    Column("id", String(64), primary_key=True),
    Column("created_ms", BigInteger, nullable=False),
    Column("category", String(128), nullable=False),
    Column("source", String(64)),
    Column("part_id", String(64)),  # NULL: none given, or kept before 0004
    Column("key_name", String(128)),  # NULL: no key (an open server), or kept before 0004
    Column("score", Float, nullable=False),
    Column("is_anomalous", Boolean, nullable=False),
    Column("needs_review", Boolean, nullable=False, default=False),
    Column("threshold", Float, nullable=False),
    Column("threshold_source", String(32), nullable=False),
    Column("references", Integer, nullable=False, default=0),
    Column("position", String(32)),
    Column("boxes", JSON, nullable=False),
    Column("top_types", JSON, nullable=False),
    Column("model_version", String(300), nullable=False),
    Column("timing_ms", JSON, nullable=False),
    Column("has_image", Boolean, nullable=False, default=False),
    Column("has_heatmap", Boolean, nullable=False, default=False),
    Column("heatmap_kind", String(16)),  # overlay | map; NULL: none kept, or kept before 0003 recorded it
    # the current judgement, beside the record so filters and stats need no join; history: `reviews`
    Column("review_label", String(16)),
    Column("review_defect_type", String(200)),
    Column("review_note", Text),
    Column("reviewer", String(128)),
    Column("reviewed_ms", BigInteger),
    Index("ix_inspections_created", "created_ms", "id"),
    Index("ix_inspections_category_created", "category", "created_ms"),
    Index("ix_inspections_source_created", "source", "created_ms"),
    Index("ix_inspections_part_id", "part_id"),
)

artefacts = Table(
    "artefacts", metadata,
    Column("inspection_id", String(64), primary_key=True),
    Column("kind", String(16), primary_key=True),
    Column("media_type", String(64), nullable=False),
    Column("data", LargeBinary, nullable=False),
)

reviews = Table(
    "reviews", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("inspection_id", String(64), nullable=False, index=True),
    Column("label", String(16), nullable=False),
    Column("defect_type", String(200)),
    Column("note", Text),
    Column("reviewer", String(128), nullable=False),
    Column("reviewed_ms", BigInteger, nullable=False),
)

threshold_changes = Table(
    "threshold_changes", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("category", String(128), nullable=False, index=True),
    Column("at_ms", BigInteger, nullable=False),
    Column("actor", String(128), nullable=False),
    Column("source", String(32), nullable=False),
    Column("threshold", Float),
    Column("previous", Float),
    Column("detail", JSON, nullable=False),
)


# --- the catalog's durable home: a mirror of the Redis catalog at its latest version ----------------------------
catalog_state = Table(
    "catalog_state", metadata,
    Column("id", Integer, primary_key=True),  # one row
    Column("version", BigInteger, nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
)

catalog_categories = Table(
    "catalog_categories", metadata,
    Column("name", String(128), primary_key=True),
    Column("definition", Text, nullable=False),  # the Category JSON, as Redis holds it
)

catalog_deleted = Table(
    "catalog_deleted", metadata,
    Column("name", String(128), primary_key=True),
)

catalog_extras = Table(
    "catalog_extras", metadata,
    Column("name", String(128), primary_key=True),
    Column("kind", String(32), primary_key=True),
    Column("data", LargeBinary, nullable=False),
)
