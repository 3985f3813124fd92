"""Drafting fine-grained anomaly descriptions with an LLM, for a person to review.

FiLo's zero-shot knowledge of a new category is its list of anomaly descriptions. An LLM writes
a good first list, but a wrong description silently degrades every inspection of that category,
so what the LLM says is only ever written as a *draft* file (a `filo-descriptions/v1` file whose
category has `status: "draft"`); a person edits it and registers it (PUT /v1/categories/NAME or
FILO_DESCRIPTIONS). Any OpenAI-compatible endpoint works: POST {llm_base_url}/chat/completions.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

import httpx

from descriptions import Category
from service.core.files import write_private
from service.settings import FiloSettings

_SYSTEM = (
    "You write fine-grained visual anomaly descriptions for industrial inspection. Answer with a JSON "
    "array of short lowercase noun phrases only (2-6 words each, no periods, no numbering)."
)


class LLMError(RuntimeError):
    """The LLM endpoint failed or answered something that is not a list of descriptions."""


def _prompt(name: str, noun: str, count: int) -> str:
    return (
        f"List {count} distinct visual defects that can appear on a {noun} (category '{name}') in a "
        f"photo taken on a production line, e.g. 'scratch on the surface', 'missing part'. "
        f"JSON array of {count} strings."
    )


def parse_descriptions(content: str, count: int) -> list[str]:
    """Descriptions from the model's text: a JSON array if there is one, else one per line."""
    text = content.strip()
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.DOTALL)
    if fenced:
        text = fenced.group(1).strip()
    items: list[str]
    start, end = text.find("["), text.rfind("]")
    try:
        parsed = json.loads(text[start:end + 1]) if start != -1 and end > start else None
    except json.JSONDecodeError:
        parsed = None
    if isinstance(parsed, list):
        items = [str(x) for x in parsed]
    else:
        items = [re.sub(r"^\s*(?:[-*]|\d+[.)])\s*", "", line) for line in text.splitlines()]
    out: list[str] = []
    for item in items:
        d = " ".join(item.replace(".", " ").strip().strip("\"'").split())[:200]
        if d and d.isprintable() and d not in out:
            out.append(d)
    if not out:
        raise LLMError(f"the LLM answered no usable descriptions: {content[:200]!r}")
    return out[:count]


def _request(settings: FiloSettings, name: str, noun: str, count: int) -> tuple[str, dict, dict]:
    url = settings.llm_base_url.rstrip("/") + "/chat/completions"
    headers = {"Authorization": f"Bearer {settings.llm_api_key}"} if settings.llm_api_key else {}
    payload = {
        "model": settings.llm_model,
        "temperature": 0.2,
        "messages": [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": _prompt(name, noun, count)}],
    }
    return url, headers, payload


def _content(response: httpx.Response) -> str:
    if response.status_code != 200:
        raise LLMError(f"LLM endpoint answered {response.status_code}: {response.text[:200]}")
    try:
        return str(response.json()["choices"][0]["message"]["content"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise LLMError(f"not an OpenAI chat-completions answer: {response.text[:200]}") from None


def generate_descriptions(settings: FiloSettings, name: str, noun: str, count: int = 10) -> list[str]:
    """Ask the LLM (blocking; for the CLI)."""
    url, headers, payload = _request(settings, name, noun, count)
    try:
        response = httpx.post(url, json=payload, headers=headers, timeout=settings.llm_timeout_s)
    except httpx.HTTPError as exc:
        raise LLMError(f"LLM endpoint {url} unreachable: {exc}") from None
    return parse_descriptions(_content(response), count)


async def agenerate_descriptions(settings: FiloSettings, name: str, noun: str, count: int = 10) -> list[str]:
    """Ask the LLM without blocking the event loop (for PUT /v1/categories/NAME with generate)."""
    url, headers, payload = _request(settings, name, noun, count)
    try:
        async with httpx.AsyncClient(timeout=settings.llm_timeout_s) as client:
            response = await client.post(url, json=payload, headers=headers)
    except httpx.HTTPError as exc:
        raise LLMError(f"LLM endpoint {url} unreachable: {exc}") from None
    return parse_descriptions(_content(response), count)


def write_draft(path: Path, name: str, noun: str, descriptions: list[str], model: str) -> Category:
    """Write a reviewable `filo-descriptions/v1` file whose category is marked `draft`."""
    category = Category(name=name, noun=noun, descriptions=tuple(descriptions), status="draft")
    doc = {
        "format": "filo-descriptions/v1",
        "dataset": "drafts",
        "source": f"LLM draft by {model} at {datetime.now(timezone.utc).isoformat(timespec='seconds')}; "
        "review every description, then set status to 'reviewed' and register it",
        "categories": [category.model_dump(mode="json")],
    }
    write_private(path, (json.dumps(doc, ensure_ascii=False, indent=1) + "\n").encode("utf-8"), prefix=".draft-")
    return category
