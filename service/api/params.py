"""Path and query parameters more than one route module takes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path

from descriptions import CATEGORY_NAME_MAX_LENGTH, CATEGORY_NAME_PATTERN

NameParam = Annotated[str, Path(
    min_length=1, max_length=CATEGORY_NAME_MAX_LENGTH, pattern=CATEGORY_NAME_PATTERN,
    description="category name (the catalog's one rule: letters, digits, `_`, `.`, `-` and inner spaces, "
    "URL-encoded, e.g. `metal%20nut`)",
)]
