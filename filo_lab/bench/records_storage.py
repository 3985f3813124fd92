"""How many bytes one inspection record takes in the records database, measured (docs/records.md).

Writes `--n` records shaped like the service's (3 boxes, 5 top types, timings, a source) into a fresh
SQLite file, or into `--url` (a PostgreSQL database: its tables' own size), and prints bytes per record,
the time per insert batch, and the storage arithmetic for a line at `--rate` images/s.

    python -m filo_lab.bench.records_storage --n 20000
    python -m filo_lab.bench.records_storage --n 20000 --url postgresql+psycopg://filo@127.0.0.1:5432/filo
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from sqlalchemy import Engine, text
from tqdm import tqdm

from service.records.db import migrate, open_engine
from service.records.model import InspectionRecord, now_ms
from service.records.store import RecordStore

BATCH = 200


def fake_record(i: int, t0: int) -> InspectionRecord:
    rng = random.Random(i)
    boxes = [{"x1": rng.uniform(0, 900), "y1": rng.uniform(0, 900), "x2": rng.uniform(900, 1800),
              "y2": rng.uniform(900, 1800), "phrase": rng.choice(["crack", "scratch on surface", "hole"]),
              "confidence": rng.random(), "valid": True} for _ in range(3)]
    types = [{"description": f"a {rng.choice(['deep', 'thin', 'long'])} scratch on the metal surface {k}",
              "similarity": rng.random()} for k in range(5)]
    score = rng.random()
    return InspectionRecord(
        id=f"{i:032x}", created_ms=t0 + i * 20, category=rng.choice(["bottle", "metal nut", "screw"]),
        score=score, is_anomalous=score > 0.5, needs_review=False, threshold=0.5, threshold_source="references",
        references=4, position=rng.choice([None, "top left", "center"]), boxes=boxes, top_types=types,
        model_version="ViT-L-14-336/openai/filo-mvtec/518/released",
        timing_ms={"queue_wait": 3.2, "model": 41.0, "total": 52.5}, source=f"line-{i % 8}/cam-{i % 3}")


def table_bytes(engine: Engine, sqlite_path: Path | None) -> int:
    if sqlite_path is not None:
        with engine.connect() as conn:
            conn.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
        return sqlite_path.stat().st_size
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT pg_total_relation_size('inspections')")).scalar_one())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--url", default=None, help="a PostgreSQL URL (default: a fresh SQLite file)")
    ap.add_argument("--rate", type=float, default=50.0, help="images/s of the line for the arithmetic")
    args = ap.parse_args()
    sqlite_path = None if args.url else Path(tempfile.mkdtemp()) / "records.db"
    engine = open_engine(args.url or f"sqlite:///{sqlite_path}")
    migrate(engine)
    store = RecordStore(engine)
    before = table_bytes(engine, sqlite_path)
    t0, took = now_ms(), 0.0
    for start in tqdm(range(0, args.n, BATCH), desc="records", unit="batch"):
        batch = [fake_record(i, t0) for i in range(start, min(start + BATCH, args.n))]
        tic = time.perf_counter()
        store.insert_many(batch)
        took += time.perf_counter() - tic
    per_record = (table_bytes(engine, sqlite_path) - before) / args.n
    per_day = args.rate * 86_400
    print(f"{engine.dialect.name}: {per_record:.0f} bytes per record (with indexes), "
          f"{took / args.n * 1e6:.0f} µs per record in batches of {BATCH}")
    print(f"at {args.rate:g} images/s: {per_day / 1e6:.2f} M records/day = {per_record * per_day / 1e9:.2f} GB/day "
          f"of metadata, {per_record * per_day * 90 / 1e9:.0f} GB over the default 90-day retention")


if __name__ == "__main__":
    main()
