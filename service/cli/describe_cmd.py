"""`filo describe NAME`: ask the configured LLM for anomaly descriptions and write a draft to review."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from service.settings import FiloSettings


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("describe", help="draft anomaly descriptions for a category with an LLM",
                              description=__doc__)
    p.add_argument("name", help="category name, e.g. 'gasket'")
    p.add_argument("--noun", help="the word used in prompts (default: NAME)")
    p.add_argument("--count", type=int, default=10, help="how many descriptions to ask for (1-50)")
    p.add_argument("--out", type=Path, help="draft file (default: ./NAME.draft.json)")
    p.add_argument("--llm-base-url", help="FILO_LLM_BASE_URL (OpenAI-compatible, e.g. http://127.0.0.1:11434/v1)")
    p.add_argument("--llm-model", help="FILO_LLM_MODEL")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from service.catalog.llm import LLMError, generate_descriptions, write_draft

    if not 1 <= args.count <= 50:
        print("filo describe: --count must be between 1 and 50", file=sys.stderr)
        return 2
    overrides = {"llm_base_url": args.llm_base_url, "llm_model": args.llm_model}
    settings = FiloSettings(**{k: v for k, v in overrides.items() if v is not None})
    noun = args.noun or args.name
    try:
        texts = generate_descriptions(settings, args.name, noun, args.count)
        out = args.out or Path(f"{args.name}.draft.json")
        write_draft(out, args.name, noun, texts, settings.llm_model)
    except (LLMError, ValueError) as exc:
        print(f"filo describe: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {len(texts)} draft descriptions for {args.name!r} to {out} (status: draft)")
    for t in texts:
        print(f"  - {t}")
    print("review them, set status to 'reviewed', then register: PUT /v1/categories/NAME or FILO_DESCRIPTIONS")
    return 0
