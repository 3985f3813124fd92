"""Path and query parameters more than one route module takes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path

NameParam = Annotated[str, Path(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
