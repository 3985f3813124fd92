"""Descriptions files: schema validation, custom categories, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from descriptions import (
    Category,
    CategoryCatalog,
    DescriptionsError,
    UnknownCategoryError,
    bundled_version,
    category_fingerprint,
    load_file,
)


def _write(tmp_path, payload, name="custom.json"):
    p = tmp_path / name
    p.write_text(json.dumps(payload) if not isinstance(payload, str) else payload)
    return p


def test_custom_file_adds_and_overrides_categories(tmp_path, caplog):
    p = _write(tmp_path, {"format": "filo-descriptions/v1", "dataset": "line7", "categories": [
        {"name": "gasket", "noun": "rubber gasket", "descriptions": ["torn lip", "bubble"]},
        {"name": "bottle", "noun": "bottle", "descriptions": ["chipped rim"]},
    ]})
    cat = CategoryCatalog.load([p])
    assert cat.get("gasket").noun == "rubber gasket"
    assert cat.get("bottle").descriptions == ("chipped rim",)
    assert "redefines category 'bottle'" in caplog.text
    assert "gasket" in cat.names() and "candle" in cat.names()


@pytest.mark.parametrize("payload, needle", [
    ("{not json", "not a readable JSON file"),
    ({"format": "other", "dataset": "x", "categories": []}, "format"),
    ({"format": "filo-descriptions/v1", "dataset": "x", "categories": [{"name": "a", "noun": "a"}]},
     "categories.0.descriptions"),
    ({"format": "filo-descriptions/v1", "dataset": "x",
      "categories": [{"name": "a", "noun": "a", "descriptions": ["ok", "   "]}]}, "non-blank"),
    ({"format": "filo-descriptions/v1", "dataset": "x",
      "categories": [{"name": "a", "noun": "a", "descriptions": ["dent. crack"]}]}, "caption separator"),
    ({"format": "filo-descriptions/v1", "dataset": "x",
      "categories": [{"name": " a", "noun": "a", "descriptions": ["x"]}]}, "whitespace"),
    ({"format": "filo-descriptions/v1", "dataset": "x", "categories": [
        {"name": "a", "noun": "a", "descriptions": ["x"]}, {"name": "a", "noun": "b", "descriptions": ["y"]}]},
     "duplicate"),
    ({"format": "filo-descriptions/v1", "dataset": "x",
      "categories": [{"name": "a", "noun": "a", "descriptions": ["x"], "colour": "red"}]}, "colour"),
])
def test_invalid_files_are_rejected_with_the_path_and_reason(tmp_path, payload, needle):
    p = _write(tmp_path, payload)
    with pytest.raises(DescriptionsError) as err:
        load_file(p)
    assert str(p) in str(err.value) and needle in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(DescriptionsError, match="not found"):
        CategoryCatalog.load([tmp_path / "nope.json"])


def test_unknown_category_lists_known_ones():
    cat = CategoryCatalog.load()
    with pytest.raises(UnknownCategoryError) as err:
        cat.get("spaceship")
    msg = str(err.value)
    assert "spaceship" in msg and "bottle" in msg and "pcb4" in msg


def test_fingerprints_change_with_text_only():
    a = Category(name="a", noun="n", descriptions=("x", "y"))
    b = Category(name="b", noun="n", descriptions=("x", "y"))
    c = Category(name="a", noun="n", descriptions=("x", "z"))
    assert category_fingerprint(a) == category_fingerprint(b) != category_fingerprint(c)
    assert len(bundled_version()) == 16


RELEASED = Path(__file__).resolve().parent / "data" / "descriptions-released.json"  # a copy of the spec's lists


def test_bundled_files_match_the_released_lists():
    released = json.loads(RELEASED.read_text())
    cat = CategoryCatalog.load()
    for ds in ("mvtec", "visa"):
        for name, v in released[ds].items():
            assert cat.get(name).noun == v["noun"]
            assert list(cat.get(name).descriptions) == v["descriptions"]


def test_the_repository_copy_of_the_released_lists_is_the_spec_s():
    """Where the spec folder sits beside the checkout (development machines), the copy must not drift."""
    spec = Path(__file__).resolve().parents[2] / "shared" / "spec" / "descriptions-released.json"
    if spec.exists():
        assert json.loads(spec.read_text()) == json.loads(RELEASED.read_text())
