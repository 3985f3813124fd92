"""Opening the records database: the URL from the settings (a SQLite file under the state directory by
default), SQLite tuned for one writer beside readers, and Alembic's migrations run to head on start."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event

from service.core.files import private_dir, private_file

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")


def default_url(state_dir: Path) -> str:
    private_dir(state_dir)
    return f"sqlite:///{state_dir / 'records.db'}"


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=5000")
    # a batch that failed on a full disk may have grown the WAL: a checkpoint gives the space back beyond 64 MB
    cur.execute("PRAGMA journal_size_limit=67108864")
    cur.close()


def open_engine(url: str) -> Engine:
    """An engine for `url`; the pool checks connections before use, so a restarted PostgreSQL is met again."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False})
        if engine.url.database and engine.url.database != ":memory:" and not engine.url.database.startswith("file:"):
            private_file(Path(engine.url.database))  # every kept image is in it: owner-only, and so its -wal, -shm
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5,
                         connect_args={"connect_timeout": 5})


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to `revision` on this engine's database (idempotent; PostgreSQL serialises
    concurrent pods with Alembic's version table inside one transaction)."""
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
