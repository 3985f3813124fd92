"""Alembic migrations of the records database (run by `service.records.db.migrate`)."""
