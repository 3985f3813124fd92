"""Stand-in weights: files of the real shapes and formats, with seeded random values, that say so.

The GPU path has to be measured on the production architectures behind the production loading code, on
machines where the real weights cannot be fetched. Stand-in files make that possible without weakening
the rule that nothing serves random weights silently: each carries a `filo_standin` record in its own
metadata (a safetensors metadata entry, a key beside `"filo"` in an official-format `.pth`, a key of a
Grounding DINO `config.json`), the loaders read it, and the service reports `standin: true` in every
response's `model` and logs it at start. Nothing here writes them (that is offline work:
`filo_lab/standin.py`); this module only recognises them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

STANDIN_KEY = "filo_standin"
STANDIN_BANNER = ("STAND-IN WEIGHTS: seeded random values in the real shapes, for measuring and testing the "
                  "production path; outputs are NOT inspection results")


def standin_record(kind: str, seed: int, **extra: Any) -> dict[str, Any]:
    """The record every stand-in file carries: what it stands in for, the seed, and a warning."""
    return {"standin": True, "kind": kind, "seed": seed, "note": STANDIN_BANNER, **extra}


def read_standin_record(path: str | Path) -> dict[str, Any] | None:
    """The stand-in record of a weights file or Grounding DINO directory; None for real weights.

    Reads metadata only (a safetensors header, a config.json); an official `.pth` is read with
    `weights_only=True` (it holds tensors and strings only).
    """
    path = Path(path)
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            return None
        record = json.loads(config.read_text()).get(STANDIN_KEY)
        return record if isinstance(record, dict) else None
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":  # safetensors
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as st:
            raw = (st.metadata() or {}).get(STANDIN_KEY)
        return json.loads(raw) if raw else None
    import zipfile

    if not zipfile.is_zipfile(path):
        return None
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not ours to judge here: the checkpoint loader reports unreadable files
        return None
    raw = obj.get(STANDIN_KEY) if isinstance(obj, dict) else None
    return json.loads(raw) if isinstance(raw, str) else None
