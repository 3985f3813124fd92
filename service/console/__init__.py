"""The QA console: one static page (HTML, CSS, JavaScript) that the API serves at /console.

The files live in `static/` and ship as package data, so the page works offline in a factory:
nothing is fetched from a CDN, no build step, no fonts from outside. `service/api/routes/console.py`
serves them with a strict Content-Security-Policy.
"""

from __future__ import annotations

from pathlib import Path

STATIC_DIR = Path(__file__).resolve().parent / "static"
