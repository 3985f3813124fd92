"""`filo catalog export FILE` / `filo catalog import FILE`: back up and restore the custom category catalog.

The custom catalog is what was registered through `PUT /v1/categories/{name}` (new categories and
changed bundled ones) plus the bundled categories that were deleted. It lives in Redis (queue mode,
`--redis-url`/`FILO_REDIS_URL`) or in `state_dir` (embedded mode; import while that server is
stopped, it reads the file at start). The file is a `filo-descriptions/v1` file, so it also works as
`--descriptions FILE`, with one extra key, `deleted`.

Import writes through the same store as the API, so running workers apply it before their next
batch. It needs a published catalog: on an empty Redis, start a worker first (it publishes the
bundled categories), then import.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from descriptions import FORMAT, Category, CategoryCatalog
from service.settings import FiloSettings

EXPORT_DATASET = "filo-catalog-export"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("catalog", help="export or import the custom category catalog", description=__doc__)
    sub = p.add_subparsers(dest="catalog_command", required=True, metavar="ACTION")
    for name, text in (("export", "write the custom catalog to FILE"), ("import", "register the catalog in FILE")):
        q = sub.add_parser(name, help=text, description=text)
        q.add_argument("file", type=Path)
        q.add_argument("--redis-url", help="FILO_REDIS_URL (default: the embedded store in FILO_STATE_DIR)")
        q.add_argument("--state-dir", type=Path, help="FILO_STATE_DIR (embedded mode)")
        if name == "export":
            q.add_argument("--all", action="store_true", help="every category in the store, bundled ones too")
        q.set_defaults(func=main)


def custom_part(stored: dict[str, Category], bundled: dict[str, Category]) -> tuple[list[Category], list[str]]:
    """(categories that are new or differ from the bundled ones, bundled names no longer stored)."""
    custom = [c for name, c in sorted(stored.items()) if bundled.get(name) != c]
    deleted = sorted(set(bundled) - set(stored))
    return custom, deleted


def export_document(categories: list[Category], deleted: list[str], version: int) -> dict[str, Any]:
    return {"format": FORMAT, "dataset": EXPORT_DATASET, "catalog_version": version,
            "categories": [c.model_dump(mode="json") for c in categories], "deleted": deleted}


def parse_document(raw: Any) -> tuple[list[Category], list[str]]:
    """The categories and deleted names of an export file; ValueError naming the problem."""
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} file")
    try:
        categories = [Category.model_validate(c) for c in raw.get("categories") or []]
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"invalid category: {problems}") from None
    deleted = raw.get("deleted") or []
    if not isinstance(deleted, list) or not all(isinstance(d, str) for d in deleted):
        raise ValueError("'deleted' must be a list of category names")
    return categories, deleted


def _store(settings: FiloSettings) -> tuple[Any, Any]:
    """(store, closer) for the configured backend."""
    if settings.redis_url:
        from service.catalog.store import RedisCategoryStore
        from service.core.keys import Keys
        from service.core.redis_client import redis_client

        client = redis_client(settings.redis_url)
        return RedisCategoryStore(client, Keys.from_settings(settings)), client.aclose
    from service.catalog.store import FileCategoryStore, default_state_dir

    async def nothing() -> None:
        return None

    return FileCategoryStore((settings.state_dir or default_state_dir()) / "categories.json"), nothing


async def _export(settings: FiloSettings, path: Path, everything: bool) -> str:
    store, close = _store(settings)
    try:
        stored, version = await store.all(), await store.version()
    finally:
        await close()
    if version == 0:
        raise RuntimeError("no catalog is published in this store (nothing registered yet, or Redis restarted "
                           "empty and no worker has re-published it)")
    bundled = CategoryCatalog.load()
    if everything:
        categories, deleted = [stored[n] for n in sorted(stored)], sorted(set(bundled.names()) - set(stored))
    else:
        categories, deleted = custom_part(stored, {n: bundled.get(n) for n in bundled.names()})
    doc = export_document(categories, deleted, version)
    path.write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return f"wrote {len(categories)} categories and {len(deleted)} deleted names (catalog version {version}) to {path}"


async def _import(settings: FiloSettings, path: Path) -> str:
    try:
        categories, deleted = parse_document(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError, ValueError) as exc:
        raise RuntimeError(f"{path}: {exc}") from None
    from service.catalog.store import CatalogNotPublishedError

    store, close = _store(settings)
    try:
        if settings.redis_url and await store.version() == 0:
            raise CatalogNotPublishedError("no catalog is published in Redis: start a `filo worker` first (it "
                                           "publishes the bundled categories), then import")
        for category in categories:
            await store.put(category)
        present = set(await store.all())
        removed = [name for name in deleted if name in present]
        for name in removed:
            await store.delete(name)
        version = await store.version()
    except CatalogNotPublishedError as exc:
        raise RuntimeError(str(exc)) from None
    finally:
        await close()
    return f"registered {len(categories)} categories, deleted {len(removed)} (catalog version {version})"


def main(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in {"redis_url": args.redis_url, "state_dir": args.state_dir}.items() if v}
    settings = FiloSettings(**overrides)
    try:
        if args.catalog_command == "export":
            message = asyncio.run(_export(settings, args.file, args.all))
        else:
            message = asyncio.run(_import(settings, args.file))
    except (RuntimeError, OSError) as exc:
        print(f"filo catalog {args.catalog_command}: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # redis errors: say what failed, no traceback for an unreachable server
        print(f"filo catalog {args.catalog_command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(message, file=sys.stderr)
    return 0
