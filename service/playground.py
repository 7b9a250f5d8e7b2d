"""The web playground: ``GET /`` and its static files (``service/static/``), served by the gateway.

Plain HTML, CSS and JavaScript shipped as package data: no build step, nothing loaded from
another origin. Every answer carries a Content-Security-Policy that allows only this origin
(plus ``blob:`` / ``data:`` images, which the page makes from the images it fetches with the
API key), so a prompt or a job field can never run script in the page.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

router = APIRouter(include_in_schema=False)

# name -> media type: the only files served (no path ever reaches the file system)
STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


@cache
def static_file(name: str) -> bytes:
    """The bytes of one of :data:`STATIC_FILES` (read once from the installed package)."""
    return resources.files("service").joinpath("static", name).read_bytes()


def _answer(name: str) -> Response:
    headers = {**SECURITY_HEADERS, "Cache-Control": "no-cache"}
    return Response(static_file(name), media_type=STATIC_FILES[name], headers=headers)


@router.get("/")
async def playground() -> Response:
    """The playground page."""
    return _answer("index.html")


@router.get("/static/{name}")
async def static(name: str) -> Response:
    """One of the playground's files; any other name is the same 404 as an unknown route."""
    if name not in STATIC_FILES:
        raise HTTPException(status_code=404)
    return _answer(name)
