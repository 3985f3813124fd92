"""Path and query parameters more than one route module takes."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Path
from pydantic import BeforeValidator

from descriptions import CATEGORY_NAME_MAX_LENGTH, CATEGORY_NAME_PATTERN

NameParam = Annotated[str, Path(
    min_length=1, max_length=CATEGORY_NAME_MAX_LENGTH, pattern=CATEGORY_NAME_PATTERN,
    description="category name (the catalog's one rule: letters, digits, `_`, `.`, `-` and inner spaces, "
    "URL-encoded, e.g. `metal%20nut`)",
)]


def _query_bool(value: Any) -> Any:
    """`true` or `false` (any case), as OpenAPI writes a boolean in a query; not 1, 0, yes, on..."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError("must be true or false")


QueryBool = Annotated[bool, BeforeValidator(_query_bool)]
