"""The category catalog's durable home in the records database: the whole catalog at one version.

Redis stays the fast path that workers read; this copy is what survives Redis losing everything while
every worker rolls (a node drain without Redis's volume). `save` keeps a catalog only when it is newer
than the one kept, in the transaction that checks it, so racing API pods cannot put an older one back.
Plain types here (JSON text, bytes): `service.catalog.durable` converts to and from `CatalogSnapshot`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import Engine, delete, insert, select, update

from service.records.model import now_ms
from service.records.schema import catalog_categories, catalog_deleted, catalog_extras, catalog_state


@dataclass
class ArchivedCatalog:
    version: int
    categories: dict[str, str]  # name -> Category JSON
    deleted: set[str] = field(default_factory=set)
    extras: dict[str, dict[str, bytes]] = field(default_factory=dict)


class CatalogArchive:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def version(self) -> int:
        """The kept catalog's version; 0: none kept yet."""
        with self.engine.connect() as conn:
            return int(conn.execute(select(catalog_state.c.version).where(catalog_state.c.id == 1)).scalar() or 0)

    def save(self, catalog: ArchivedCatalog) -> bool:
        """Keep `catalog` if it is newer than the kept one; True when it was kept."""
        with self.engine.begin() as conn:
            moved = conn.execute(update(catalog_state).where(catalog_state.c.id == 1,
                                                             catalog_state.c.version < catalog.version)
                                 .values(version=catalog.version, updated_ms=now_ms())).rowcount
            if not moved:
                if conn.execute(select(catalog_state.c.id).where(catalog_state.c.id == 1)).first() is not None:
                    return False
                conn.execute(insert(catalog_state).values(id=1, version=catalog.version, updated_ms=now_ms()))
            for table in (catalog_categories, catalog_deleted, catalog_extras):
                conn.execute(delete(table))
            if catalog.categories:
                conn.execute(insert(catalog_categories), [{"name": n, "definition": d}
                                                          for n, d in catalog.categories.items()])
            if catalog.deleted:
                conn.execute(insert(catalog_deleted), [{"name": n} for n in catalog.deleted])
            rows = [{"name": n, "kind": k, "data": v} for n, kinds in catalog.extras.items() for k, v in kinds.items()]
            if rows:
                conn.execute(insert(catalog_extras), rows)
            return True

    def load(self) -> ArchivedCatalog | None:
        with self.engine.connect() as conn:
            version = conn.execute(select(catalog_state.c.version).where(catalog_state.c.id == 1)).scalar()
            if not version:
                return None
            categories = {r.name: r.definition for r in conn.execute(select(catalog_categories))}
            deleted = {r.name for r in conn.execute(select(catalog_deleted))}
            extras: dict[str, dict[str, bytes]] = {}
            for r in conn.execute(select(catalog_extras)):
                extras.setdefault(r.name, {})[r.kind] = bytes(r.data)
        return ArchivedCatalog(int(version), categories, deleted, extras)
