"""Build ``models/configs/bert-tiny-vocab.txt``, the WordPiece vocab of the tiny test Grounding DINO.

Run once from the repository root (``python scripts/build_tiny_vocab.py``); the committed .txt is what
the runtime reads, this script only documents how it was made. Needs the shared spec file for the words.

Why the id layout copies bert-base-uncased for its first 1067 ids: transformers' Grounding DINO hard-codes
the ids of ``[CLS]`` (101), ``[SEP]`` (102), ``.`` (1012) and ``?`` (1029) (``SPECIAL_TOKENS`` in
``modeling_grounding_dino.py``) to split a caption into phrases for the text self-attention mask. A vocab
with other ids would still run but would mask the text differently from the real model, so the tiny model
keeps those ids: ``[PAD]`` 0, ``[unusedN]`` fillers, ``[UNK]`` 100, ``[CLS]`` 101, ``[SEP]`` 102,
``[MASK]`` 103, printable ASCII punctuation and digits from 999, ``a``..``z`` from 1037, then
``##a``..``##z`` and the whole words of the captions (general grounding words plus every released
description, lowercased), sorted.
"""

from __future__ import annotations

import argparse
import json
import string
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SPEC = Path("/work/shared/spec/descriptions-released.json")
DEFAULT_OUT = REPO / "models" / "configs" / "bert-tiny-vocab.txt"


def bert_base_prefix() -> list[str]:
    """The first ids of bert-base-uncased's vocab, up to and including the ASCII single characters."""
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(99)]
    tokens += ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += [f"[unused{i}]" for i in range(99, 994)]
    assert len(tokens) == 999
    tokens += [c for c in map(chr, range(33, 127)) if c not in string.ascii_uppercase]
    assert tokens[101] == "[CLS]" and tokens[102] == "[SEP]"
    assert tokens[1012] == "." and tokens[1029] == "?" and tokens[1037] == "a"
    return tokens


def caption_words(spec: dict) -> set[str]:
    """Every whitespace-separated word of the grounding captions, lowercased (BERT uncased lowercases)."""
    words = {w.lower() for w in spec["grounding_general_words"]}
    for dataset in ("mvtec", "visa"):
        for entry in spec[dataset].values():
            for description in entry["descriptions"]:
                words.update(w.lower() for w in description.split())
    return words


def build_vocab(spec: dict) -> list[str]:
    tokens = bert_base_prefix()
    tokens += [f"##{c}" for c in string.ascii_lowercase]
    seen = set(tokens)
    tokens += sorted(w for w in caption_words(spec) if w not in seen)
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=DEFAULT_SPEC)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    tokens = build_vocab(json.loads(args.spec.read_text()))
    args.out.write_text("\n".join(tokens) + "\n")
    print(f"wrote {len(tokens)} tokens to {args.out}")


if __name__ == "__main__":
    main()
