"""The spool on disk: whole entries or none, oldest first, bounded (a full spool refuses and counts)."""

from __future__ import annotations

import json

import pytest

from filo_line.spool import Spool, SpoolFull, SpoolMeta


def meta(i: int) -> SpoolMeta:
    return SpoolMeta(station="cam1", category="bottle", part_id=f"p{i}", request_id=f"cam1-p{i}-0123456789abcdef",
                     image_name=f"p{i}.png", triggered_at=1_700_000_000.0 + i, signalled_at=1_700_000_001.0 + i,
                     signalled={"ok": False, "ng": True, "error": True}, signalled_verdict="timeout",
                     reason="timeout: no answer")


def test_entries_survive_a_reopen_oldest_first_and_read_back_whole(tmp_path):
    changes: list[tuple[int, int]] = []
    spool = Spool(tmp_path, 10_000_000, on_change=lambda d, b: changes.append((d, b)))
    spool.open()
    keys = [spool.put(meta(i), bytes([i]) * 1000) for i in range(3)]
    assert spool.keys() == keys and spool.depth == 3 and changes[-1][0] == 3

    again = Spool(tmp_path, 10_000_000)
    again.open()  # a restart (or a kill -9 after the puts returned)
    assert again.keys() == keys and again.size_bytes == spool.size_bytes
    entry = again.read(keys[0])
    assert entry.meta == meta(0) and entry.image == bytes([0]) * 1000
    again.remove(keys[0])
    assert again.keys() == keys[1:] and again.read(keys[0]) is None


def test_what_a_crash_left_half_written_is_cleared_on_open(tmp_path):
    spool = Spool(tmp_path, 10_000_000)
    spool.open()
    whole = spool.put(meta(1), b"image")
    (tmp_path / "entries" / "00000000000000000001-000001-half.img").write_bytes(b"no meta yet")  # killed here
    (tmp_path / "tmp" / "x.json").write_text("{")
    (tmp_path / "entries" / "00000000000000000002-000002-lost.json").write_text(json.dumps({}))  # meta alone
    again = Spool(tmp_path, 10_000_000)
    again.open()
    assert again.keys() == [whole]
    assert sorted(p.name for p in (tmp_path / "entries").iterdir()) == [f"{whole}.img", f"{whole}.json"]
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_full_spool_refuses_the_new_image_keeps_the_waiting_ones_and_counts(tmp_path):
    dropped: list[str] = []
    spool = Spool(tmp_path, 3 * 1500, on_drop=dropped.append)
    spool.open()
    kept = [spool.put(meta(i), b"x" * 1000) for i in range(3)]  # ~1.3 kB each with the meta
    with pytest.raises(SpoolFull, match="does not fit"):
        spool.put(meta(9), b"x" * 1000)
    assert spool.keys() == kept and spool.drops["full"] == 1 and dropped == ["full"]
    assert spool.size_bytes <= spool.max_bytes
    spool.remove(kept[0])
    spool.put(meta(9), b"x" * 1000)  # room again
    assert spool.depth == 3


def test_an_unreadable_entry_is_dropped_and_counted_not_retried_forever(tmp_path):
    spool = Spool(tmp_path, 10_000_000)
    spool.open()
    key = spool.put(meta(1), b"image")
    (tmp_path / "entries" / f"{key}.json").write_text("{not json")
    assert spool.read(key) is None and spool.keys() == [] and spool.drops["unreadable"] == 1


def test_check_reports_a_writable_folder_and_what_waits(tmp_path):
    spool = Spool(tmp_path / "s", 2048 * 1024 * 1024)
    spool.open()
    spool.put(meta(1), b"image")
    assert spool.check().startswith(f"{tmp_path / 's'}: writable, 1 images waiting")
