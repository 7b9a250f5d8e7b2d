"""A small synchronous client of the native ldm-serve REST API (for ``ldm-serve client``).

Only httpx: no torch, no gateway code, so the command starts fast. An error answer
raises :class:`ServerError` with the server's own message (``error.message``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"


class ServerError(Exception):
    """The server answered an error (``status``), or could not be reached (``status`` 0)."""

    def __init__(self, status: int, message: str, body: dict[str, Any] | None = None) -> None:
        self.status = status
        self.body = body or {}
        super().__init__(message)


def _raise_for(r: httpx.Response) -> None:
    if r.status_code < 400:
        return
    try:
        error = r.json().get("error", {})
    except (ValueError, AttributeError):
        error = {}
    message = error.get("message") if isinstance(error, dict) else None
    raise ServerError(r.status_code, message or f"HTTP {r.status_code}: {r.text[:200]}", error or None)


def _form_text(value: Any) -> str:
    """A multipart text field: booleans as true/false, lists comma-separated, objects as JSON."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return json.dumps(value) if isinstance(value, dict) else str(value)


class Remote:
    """The API of one server: ``url`` (``LDM_URL``) and an optional bearer ``api_key`` (``LDM_API_KEY``)."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout_s = timeout_s
        self.http = httpx.Client(base_url=self.url, headers=self._headers, timeout=timeout_s)

    def close(self) -> None:
        self.http.close()

    def reopen(self) -> None:
        """Drop every connection and start afresh (after a Ctrl-C cut a request short)."""
        self.http.close()
        self.http = httpx.Client(base_url=self.url, headers=self._headers, timeout=self._timeout_s)

    def _call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise ServerError(0, f"cannot reach {self.url}: {exc}") from exc
        _raise_for(r)
        return r

    def submit(self, path: str, body: dict[str, Any], files: dict[str, bytes] | None = None) -> dict[str, Any]:
        """POST a job (JSON, or multipart with ``files``); the job view."""
        if files:
            form = {k: _form_text(v) for k, v in body.items() if v is not None}
            return self._call("POST", path, data=form, files={k: (k, v) for k, v in files.items()}).json()
        return self._call("POST", path, json={k: v for k, v in body.items() if v is not None}).json()

    def job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/jobs/{job_id}").json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/jobs/{job_id}/cancel").json()

    def jobs(self, limit: int = 20, statuses: list[str] | None = None) -> dict[str, Any]:
        return self._call("GET", "/v1/jobs", params={"limit": limit, "status": statuses or []}).json()

    def models(self) -> dict[str, Any]:
        return self._call("GET", "/v1/models").json()

    def image(self, url: str) -> bytes:
        """An image's bytes from its ``url`` in the job view (relative, or an absolute signed URL)."""
        return self._call("GET", url).content

    def events(self, job_id: str, last_event_id: str | None = None) -> Iterator[tuple[str, str | None, Any]]:
        """The job's server-sent events as ``(event, id, data)``, until the ``done`` event."""
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        try:
            with self.http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers,
                                  timeout=httpx.Timeout(30.0, read=60.0)) as r:
                if r.status_code >= 400:
                    r.read()
                    _raise_for(r)
                event, event_id, data = "message", None, []
                for line in r.iter_lines():
                    if line.startswith(":"):
                        continue
                    if not line:
                        if data:
                            yield event, event_id, json.loads("\n".join(data))
                            if event == "done":
                                return
                        event, data = "message", []
                        continue
                    name, _, value = line.partition(":")
                    value = value.removeprefix(" ")
                    if name == "event":
                        event = value
                    elif name == "id":
                        event_id = value
                    elif name == "data":
                        data.append(value)
        except httpx.HTTPError as exc:
            raise ServerError(0, f"the event stream of {job_id} broke: {exc}") from exc
