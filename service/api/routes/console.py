"""The QA console page and its static files, served with a strict Content-Security-Policy.

The page needs no key to load (it holds no data); every API call it makes carries the key the
person types in. The policy allows scripts and styles from this origin only (no inline code, no
eval), images from this origin, `data:` (the coloured heatmap) and `blob:` (the uploaded images),
and fetches to this origin only. Trusted Types are required with no policy, so the browser itself
refuses any string assigned to an HTML sink such as `innerHTML`: text from users or an LLM can
only ever be rendered as text.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

from service.console import STATIC_DIR
from service.core.errors import ServiceError

router = APIRouter(include_in_schema=False)

CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data: blob:",
    "connect-src 'self'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
    "object-src 'none'",
    "require-trusted-types-for 'script'",
    "trusted-types 'none'",
])

SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}

# The only files served: name -> media type. Nothing else under static/ is reachable by URL.
STATIC_FILES = {
    "console.css": "text/css; charset=utf-8",
    "lib.js": "text/javascript; charset=utf-8",
    "inspect.js": "text/javascript; charset=utf-8",
    "tabs.js": "text/javascript; charset=utf-8",
    "review.js": "text/javascript; charset=utf-8",
    "trends.js": "text/javascript; charset=utf-8",
    "admin.js": "text/javascript; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}


def _file(name: str, media_type: str) -> Response:
    return Response((STATIC_DIR / name).read_bytes(), media_type=media_type, headers=SECURITY_HEADERS)


@router.get("/")
async def root() -> RedirectResponse:
    """The service's front door leads to the console (relative, so a path prefix keeps working)."""
    return RedirectResponse("console", status_code=307)


@router.get("/console")
async def console_page() -> Response:
    return _file("index.html", "text/html; charset=utf-8")


@router.get("/console/static/{name}")
async def console_static(name: str) -> Response:
    media_type = STATIC_FILES.get(name)
    if media_type is None:
        raise ServiceError(404, "not_found", f"no console file {name!r}")
    return _file(name, media_type)
