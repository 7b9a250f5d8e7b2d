"""Reading request bodies within limits: size while streaming, JSON nesting before parsing, media type.

* :class:`BodyLimitMiddleware` answers 413 to a body that declares a ``Content-Length``
  over its route's limit, and counts the bytes of every other body as they arrive,
  raising :class:`~ldm_serve.errors.PayloadTooLarge` (413) as soon as it is over, so
  a chunked 100 MB body is cut off after the limit, for JSON and multipart alike.
* :func:`load_json` refuses a body nested deeper than ``max_json_depth`` *before*
  ``json.loads`` sees it; the depth scan itself never recurses.
* :func:`require_media_type` answers 415 for a ``Content-Type`` the route does not
  accept (a cross-site ``text/plain`` form post, for example).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ldm_serve.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from ldm_serve.settings import Settings

# After escapes are removed, a JSON string is a quote, non-quotes, and a quote (or the end).
_STRING = re.compile(rb'"[^"]*(?:"|\Z)')
_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{}')

# Paths whose bodies may carry uploads (base64 images or multipart files).
UPLOAD_PATHS = frozenset({"/v1/inpaint", "/v1/img2img"})


def check_json_depth(data: bytes, max_depth: int, field: str = "body", max_structure: int | None = None) -> None:
    """Raise InvalidInput when ``data`` nests arrays/objects deeper than ``max_depth``.

    Escapes are dropped (``\\\\`` then ``\\"``, which tokenises them as JSON does), then
    everything but quotes and brackets; when more than ``max_structure`` of those are
    left the text is refused outright (no valid request holds that many). Strings are
    then removed and innermost bracket pairs deleted one level per round: a balanced
    text of depth ``d`` vanishes in exactly ``d`` rounds. Brackets that no round can
    pair mean the text is not JSON; that is refused too, since ``json.loads`` would
    recurse into every unclosed bracket. Every step is a C-speed bytes operation.
    """
    if b"\\" in data:  # (a fast scan; replace() is slower, even with nothing to replace)
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    structure = data.translate(None, _NOT_STRUCTURE)
    if max_structure is not None and len(structure) > max_structure:
        raise InvalidInput(
            field, f"holds {len(structure)} quotes and brackets, more than a request can ({max_structure})"
        )
    brackets = _STRING.sub(b"", structure).translate(_BRACKETS)
    for _ in range(max_depth):
        if not brackets:
            return
        reduced = brackets.replace(b"[]", b"")
        if len(reduced) == len(brackets):
            break
        brackets = reduced
    if not brackets:
        return
    if b"[]" in brackets:
        raise InvalidInput(field, f"nests arrays/objects deeper than max_json_depth={max_depth}")
    raise InvalidInput(field, "is not valid JSON (its brackets do not balance)")


def load_json(data: bytes | str, max_depth: int, field: str = "body", max_structure: int | None = None) -> Any:
    """``json.loads`` of a client's text after :func:`check_json_depth`; InvalidInput if malformed."""
    raw = data.encode() if isinstance(data, str) else data
    check_json_depth(raw, max_depth, field, max_structure)
    try:
        return json.loads(raw)
    except RecursionError:  # cannot happen within max_json_depth (<= 256); kept as a last guard
        raise InvalidInput(field, f"nests arrays/objects deeper than max_json_depth={max_depth}") from None
    except ValueError:
        raise InvalidInput(field, "is not valid JSON") from None


def json_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0, ``{}`` is 1), without recursion."""
    depth = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
        else:
            depth = max(depth, level)
            continue
        depth = max(depth, level + 1)
    return depth


def media_type(request: Request) -> str:
    """The request's media type, lower-case, without parameters (``""`` when absent)."""
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def require_media_type(request: Request, *allowed: str) -> str:
    """The request's media type if it is one of ``allowed``, else UnsupportedMediaType (415)."""
    mt = media_type(request)
    if mt not in allowed:
        raise UnsupportedMediaType("content-type", f"must be {' or '.join(allowed)}, got {mt or 'none'!r}")
    return mt


async def read_json(request: Request, settings: Settings) -> Any:
    """The request's JSON body (``Content-Type: application/json``), depth-checked, then parsed."""
    require_media_type(request, "application/json")
    return load_json(await request.body(), settings.max_json_depth, max_structure=fields_allowance(settings))


def fields_allowance(s: Settings) -> int:
    """Bytes for every non-upload field: both prompts as ``\\u`` escapes, metadata, 64 KiB of the rest."""
    return 65536 + 24 * s.max_prompt_chars + 2 * s.max_metadata_bytes


def body_limit(s: Settings, path: str) -> tuple[int, str]:
    """The body limit of a path and how the limit is named in the 413 error."""
    upload_default = 2 * (s.max_upload_bytes * 4 // 3 + 4) + fields_allowance(s)
    upload = s.max_body_bytes or upload_default
    if path in UPLOAD_PATHS:
        return upload, f"max_body_bytes={upload}"
    small = min(upload, fields_allowance(s))
    return small, f"{small} bytes (routes without uploads)"


_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class BodyLimitMiddleware:
    """Pure ASGI middleware: no request body is read past its route's limit.

    * A declared ``Content-Length`` over the limit is answered at once by ``reject``
      (413), before the route runs or a byte of the body is read.
    * A streamed body is counted as it arrives; the chunk that crosses the limit makes
      ``receive`` raise PayloadTooLarge in the route reading it (mapped to 413 by the
      app's one error handler), so nothing past the limit is buffered or spooled to disk.
      Routes of other methods do not read bodies; for them (an SSE stream, say) an
      oversize body reads as the client having gone away.
    """

    def __init__(
        self,
        app: ASGIApp,
        limit_for: Callable[[str], tuple[int, str]],
        reject: Callable[[PayloadTooLarge], ASGIApp],
    ) -> None:
        self.app = app
        self.limit_for = limit_for
        self.reject = reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, name = self.limit_for(scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            exc = PayloadTooLarge("body", f"Content-Length {declared} exceeds the limit of {name}")
            await self.reject(exc)(scope, receive, send)
            return
        raises = scope.get("method", "GET") in _BODY_METHODS
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    if not raises:
                        return {"type": "http.disconnect"}
                    raise PayloadTooLarge("body", f"exceeds the limit of {name} (cut off after {received} bytes)")
            return message

        await self.app(scope, limited_receive, send)


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isascii() and text.isdigit() else None
    return None
