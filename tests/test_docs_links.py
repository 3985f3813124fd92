"""Every relative link and image in README.md and docs/*.md leads somewhere.

A link `[text](path)` or image `![alt](path)` must name an existing file or folder (relative to the Markdown
file it is in); a link with an anchor into a Markdown file (`path.md#heading`, or `#heading` within the same
file) must name one of that file's headings, slugged the way GitHub does: the heading's text lowercased,
punctuation other than `-` and `_` dropped, spaces turned into `-`, and a repeated slug numbered `-1`, `-2`.
Links inside code (fenced blocks, inline spans) are not links; absolute URLs are not checked.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]

FENCE = re.compile(r"^\s{0,3}(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target "title") and ![alt](target); the text may itself hold brackets (an image inside a link)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^//")  # http:, https:, mailto:, ...


def documents(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def outside_fences(text: str, blank_inline_code: bool) -> list[tuple[int, str]]:
    """(line number, line) of the lines outside fenced code blocks; inline code spans blanked out if asked
    (for links: code is not a link; headings keep theirs, since GitHub slugs a heading's code text too)."""
    out, fenced = [], None
    for number, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if m:
            if fenced is None:
                fenced = m.group(1)
            elif m.group(1) == fenced:
                fenced = None
            continue
        if fenced is None:
            out.append((number, INLINE_CODE.sub(lambda c: " " * len(c.group(0)), line) if blank_inline_code else line))
    return out


def github_slug(heading: str) -> str:
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()  # inline HTML
    text = re.sub(r"[^\w\- ]", "", text)  # punctuation (backticks, *, :, (), ., ...) except - and _
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in outside_fences(path.read_text(encoding="utf-8"), blank_inline_code=False):
        m = HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(path: Path) -> list[tuple[int, str]]:
    out = []
    for number, line in outside_fences(path.read_text(encoding="utf-8"), blank_inline_code=True):
        for m in LINK.finditer(line):
            out.append((number, m.group(1)))
        m = REFERENCE.match(line)
        if m:
            out.append((number, m.group(1)))
    return [(n, t[1:-1] if t.startswith("<") else t) for n, t in out]


def broken_links(root: Path = ROOT) -> list[str]:
    problems = []
    for path in documents(root):
        for number, target in links(path):
            if EXTERNAL.match(target):
                continue
            where = f"{path.relative_to(root).as_posix()}:{number}"
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / unquote(file_part)).resolve() if file_part else path
            if not dest.exists():
                problems.append(f"{where}: {target} -> no such file")
                continue
            if anchor and dest.suffix.lower() == ".md" and unquote(anchor).lower() not in anchors(dest):
                problems.append(f"{where}: {target} -> no heading #{anchor} in {dest.name}")
    return problems


def test_every_relative_link_and_image_leads_somewhere() -> None:
    assert broken_links() == []


def test_the_readme_leads_to_every_document_under_docs() -> None:
    readme = ROOT / "README.md"
    targets = {(readme.parent / t.partition("#")[0]).resolve() for _, t in links(readme) if not EXTERNAL.match(t)}
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in targets]
    assert missing == [], f"README.md does not link to {missing}"


def test_the_readme_names_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "bash scripts/demo.sh" in text
    assert "bash scripts/test.sh" in text


@pytest.mark.parametrize(("heading", "slug"), [
    ("First light: what one H200 measured (2026-12-04)", "first-light-what-one-h200-measured-2026-12-04"),
    ("The recipe (`filo train`)", "the-recipe-filo-train"),
    ("Converting the authors' Grounding DINO fine-tunes", "converting-the-authors-grounding-dino-fine-tunes"),
    ("Does training learn? (measured with the tiny random model)",
     "does-training-learn-measured-with-the-tiny-random-model"),
    ("snake_case and **bold** [a link](x.md)", "snake_case-and-bold-a-link"),
])
def test_github_slug(heading: str, slug: str) -> None:
    assert github_slug(heading) == slug


def test_the_check_fails_on_broken_links(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A\n\n## Same\n\n## Same\n\n```bash\n# not a heading\n```\n")
    (tmp_path / "docs" / "pic.png").write_bytes(b"")
    (tmp_path / "README.md").write_text(
        "# Top\n\n"
        "[ok](docs/a.md) [ok](docs/a.md#same-1) ![ok](docs/pic.png) [ok](#top) [ext](https://example.com/x)\n"
        "`[code](nowhere.md)`\n\n```\n[fenced](nowhere.md)\n```\n"
        "[gone](docs/gone.md) ![gone](docs/gone.png) [bad anchor](docs/a.md#same-2) [bad](#nope)\n"
        "[not a heading](docs/a.md#not-a-heading)\n\n[ref]: docs/missing.md\n"
    )
    problems = broken_links(tmp_path)
    assert problems == [
        "README.md:9: docs/gone.md -> no such file",
        "README.md:9: docs/gone.png -> no such file",
        "README.md:9: docs/a.md#same-2 -> no heading #same-2 in a.md",
        "README.md:9: #nope -> no heading #nope in README.md",
        "README.md:10: docs/a.md#not-a-heading -> no heading #not-a-heading in a.md",
        "README.md:12: docs/missing.md -> no such file",
    ]
