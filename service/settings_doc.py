"""docs/settings.md, written from `FiloSettings` itself: per section a table of every setting.

`python -m service.settings_doc` rewrites the file; `--check` only says whether it is current (exit 1 when
not), as tests/test_settings_reference.py does. The names, types, defaults and bounds come from the fields,
the meanings from their descriptions and the headings from `service.settings.SECTIONS`, so the page cannot
say something the code does not.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from service.settings import SECTIONS, FiloSettings

DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "settings.md"

HEADER = """\
# Settings

Every setting of FiLo Inspect is a field of `FiloSettings` in `service/settings.py` and an environment
variable `FILO_<FIELD>` (upper case; lists and dicts are written as JSON, e.g.
`FILO_API_KEYS='["key-1"]'`, `FILO_THRESHOLDS='{"bolt": 0.6}'`; booleans as `true` / `false`). The common
model and service settings are also flags of the `filo` commands, which win over the environment.

This page is generated: `python -m service.settings_doc` rewrites it from the fields' types, defaults and
descriptions, and `tests/test_settings_reference.py` fails when it is stale. Edit `service/settings.py`,
not this file.
"""

_BOUNDS = ((annotated_types.Ge, "ge", ">="), (annotated_types.Gt, "gt", ">"),
           (annotated_types.Le, "le", "<="), (annotated_types.Lt, "lt", "<"))


def group_of(info: FieldInfo) -> str | None:
    extra = info.json_schema_extra
    group = extra.get("group") if isinstance(extra, dict) else None
    return group if isinstance(group, str) else None


def env_name(name: str) -> str:
    return f"{FiloSettings.model_config.get('env_prefix', '')}{name}".upper()


def type_text(annotation: Any) -> str:
    """The annotation as a reader of the environment meets it; None (unset) shows in the default instead."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " or ".join(f"`{a}`" for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(type_text(a) for a in args if a is not type(None))
    if origin is list:
        return f"list of {type_text(args[0])} (JSON)"
    if origin is dict:
        return f"{type_text(args[0])} to {type_text(args[1])} (JSON object)"
    if annotation is Path:
        return "path"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):  # an object of named lists (key_limits)
        return "{" + ", ".join(f'"{name}"' for name in annotation.model_fields) + "}"
    return getattr(annotation, "__name__", str(annotation))


def bounds_text(info: FieldInfo) -> str:
    parts = []
    for kind, attr, sign in _BOUNDS:
        parts += [f"{sign} {getattr(m, attr)}" for m in info.metadata if isinstance(m, kind)]
    return ", ".join(parts)


def default_text(info: FieldInfo) -> str:
    value = info.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, (list, dict)):
        return f"`{json.dumps(value)}`"
    return f"`{value}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def render() -> str:
    """The whole of docs/settings.md."""
    fields = FiloSettings.model_fields
    out = [HEADER]
    out.append("Sections: " + ", ".join(f"[{s.title}](#{_anchor(s.title)})" for s in SECTIONS) + ".\n")
    for section in SECTIONS:
        out += [f"## {section.title}\n", section.about + "\n",
                "| setting | environment variable | type | default | meaning |",
                "|---|---|---|---|---|"]
        for name, info in fields.items():
            if group_of(info) != section.title:
                continue
            kind = type_text(info.annotation)
            if bounds := bounds_text(info):
                kind += f" ({bounds})"
            out.append(f"| `{name}` | `{env_name(name)}` | {_cell(kind)} | {_cell(default_text(info))} "
                       f"| {_cell(info.description or '')} |")
        out.append("")
    return "\n".join(out)


def _anchor(title: str) -> str:
    """The heading's anchor as GitHub renders it: lower case, punctuation dropped, spaces as hyphens."""
    kept = "".join(c for c in title.lower() if c.isalnum() or c in " -")
    return kept.replace(" ", "-")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.settings_doc", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DOC_PATH, help=f"where to write (default {DOC_PATH})")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 when the file is not current")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.is_file() and args.out.read_text() == text
        if not current:
            print(f"{args.out} is stale: run python -m service.settings_doc", file=sys.stderr)
        return 0 if current else 1
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
