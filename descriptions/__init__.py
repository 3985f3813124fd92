"""Per-category anomaly descriptions: the text half of FiLo's zero-shot knowledge.

FiLo never sees a defect of a new category at training time; what it knows about that category is
its prompt noun and a list of fine-grained anomaly descriptions (LLM-generated, curated by a person).
They live in JSON files (`filo-descriptions/v1`), validated at load, so adding a category is a data
change, not a code change. The bundled files hold the released model's lists for MVTec AD and VisA.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

log = logging.getLogger(__name__)

FORMAT = "filo-descriptions/v1"
BUNDLED_DIR = Path(__file__).resolve().parent
BUNDLED_FILES = ("mvtec.json", "visa.json")
CATEGORY_NAME_PATTERN = r"^[A-Za-z0-9](?:[A-Za-z0-9_. -]*[A-Za-z0-9_.-])?$"
"""The one rule for a category name, here and in the API's `/v1/categories/{name}` routes: a letter or
digit first, then letters, digits, `_`, `.`, `-` and spaces (`metal nut`), no space at the end, at most
100 characters; never a `/`, so a name is also a safe file and URL path segment."""
CATEGORY_NAME_MAX_LENGTH = 100


class DescriptionsError(ValueError):
    """A descriptions file that cannot be used, with the file and the reason in the message."""


class UnknownCategoryError(KeyError):
    """A category nobody has described; the message lists the ones that exist."""

    def __init__(self, name: str, known: Iterable[str]):
        self.name = name
        self.known = sorted(known)
        super().__init__(name)

    def __str__(self) -> str:
        return f"unknown category {self.name!r}; known categories: {', '.join(self.known)}"


class Category(BaseModel):
    """One inspectable category. `descriptions` are kept verbatim (case, spacing) as curated."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=CATEGORY_NAME_MAX_LENGTH)
    noun: str = Field(min_length=1, max_length=100)
    descriptions: tuple[str, ...] = Field(min_length=1, max_length=64)
    status: Literal["reviewed", "draft"] = "reviewed"

    @field_validator("name", "noun")
    @classmethod
    def _printable(cls, v: str) -> str:
        if v != v.strip() or not v.isprintable():
            raise ValueError("must be printable with no leading/trailing whitespace")
        return v

    @field_validator("name")
    @classmethod
    def _name_rule(cls, v: str) -> str:
        if not re.fullmatch(CATEGORY_NAME_PATTERN, v):
            raise ValueError("a category name is a letter or digit, then letters, digits, '_', '.', '-' or inner "
                             "spaces")
        return v

    @field_validator("descriptions")
    @classmethod
    def _non_blank(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for d in v:
            if not d.strip() or not d.isprintable() or len(d) > 200:
                raise ValueError(f"description {d!r} must be non-blank printable text of at most 200 chars")
            if "." in d:
                raise ValueError(f"description {d!r} must not contain '.', the Grounding DINO caption separator")
        return v


class DescriptionsFile(BaseModel):
    model_config = ConfigDict(extra="ignore")

    format: Literal["filo-descriptions/v1"]
    dataset: str = Field(min_length=1)
    categories: list[Category] = Field(min_length=1)


def load_file(path: str | Path) -> DescriptionsFile:
    """Read and validate one descriptions file; every problem is reported with the file's path."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DescriptionsError(f"{path}: descriptions file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DescriptionsError(f"{path}: not a readable JSON file ({exc})") from None
    try:
        parsed = DescriptionsFile.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise DescriptionsError(f"{path}: invalid {FORMAT} file: {problems}") from None
    names = [c.name for c in parsed.categories]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DescriptionsError(f"{path}: duplicate categories {dupes}")
    return parsed


class CategoryCatalog:
    """The categories a process can inspect: bundled files, then user files (later ones win)."""

    def __init__(self, categories: Iterable[Category] = ()):
        self._by_name: dict[str, Category] = {}
        for c in categories:
            self._by_name[c.name] = c

    @classmethod
    def load(cls, extra_files: Iterable[str | Path] = (), include_bundled: bool = True) -> CategoryCatalog:
        files = [BUNDLED_DIR / f for f in BUNDLED_FILES] if include_bundled else []
        files += [Path(f) for f in extra_files]
        catalog = cls()
        for f in files:
            for category in load_file(f).categories:
                if category.name in catalog and catalog.get(category.name) != category:
                    log.warning("%s redefines category %r (the later file wins)", f, category.name)
                catalog.register(category)
        return catalog

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def get(self, name: str) -> Category:
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownCategoryError(name, self._by_name) from None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def register(self, category: Category) -> None:
        self._by_name[category.name] = category

    def remove(self, name: str) -> Category:
        category = self.get(name)
        del self._by_name[name]
        return category


def category_fingerprint(category: Category) -> str:
    payload = json.dumps([category.noun, list(category.descriptions)], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def bundled_version() -> str:
    """Content hash of the bundled files, recorded in checkpoints as the descriptions version."""
    h = hashlib.sha256()
    for f in BUNDLED_FILES:
        h.update((BUNDLED_DIR / f).read_bytes())
    return h.hexdigest()[:16]


__all__ = [
    "CATEGORY_NAME_MAX_LENGTH",
    "CATEGORY_NAME_PATTERN",
    "Category",
    "CategoryCatalog",
    "DescriptionsError",
    "DescriptionsFile",
    "UnknownCategoryError",
    "bundled_version",
    "category_fingerprint",
    "load_file",
]
