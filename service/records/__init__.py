"""Inspection records: every verdict kept, judged by people, read back for traceability and trends.

A durable store beside the catalog (SQLAlchemy 2 Core; SQLite embedded, PostgreSQL in production; the
schema is Alembic's, `migrations/`). `model` is the plain data, `schema` the tables, `db` opens and
migrates a database, `store` reads and writes it, `policy` decides which artefacts are kept, and
`buffer` takes records off the request's critical path.
"""
