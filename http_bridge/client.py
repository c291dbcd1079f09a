"""The HTTP client of the ledger for Python consumers, over httpx.

It captures the ETag of every representation it reads or writes and sends it back as If-Match on
the next write of that resource, so a caller never has to carry the validator by hand; and
:meth:`LedgerHTTPClient.update` runs read-modify-write until its compare-and-swap wins, re-reading
on every 412. ``open_client(base_url)`` owns the connection pool.

Exceptions::

    LedgerHTTPError     any error answer of the bridge: status, problem (the problem+json body),
                        reason, current_etag, current_version

Transport failures (connection refused, timeouts) are httpx's own ``httpx.TransportError``: they
are not answers, and whether to retry them is the caller's call (except in :meth:`watch`, which
reconnects and resumes by itself).
"""

from __future__ import annotations

import asyncio
import json
import random
import string
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

__all__ = ["Document", "LedgerHTTPClient", "LedgerHTTPError", "WatchEvent", "open_client"]

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
REASON_HEADER = "Casledger-Reason"
# Printable ASCII but "%" goes through as is; everything else (UTF-8) is percent-encoded.
_REASON_SAFE = "".join(c for c in string.printable if c not in "%\t\n\r\x0b\x0c")


class LedgerHTTPError(Exception):
    """The bridge answered with an error; ``problem`` is its problem+json body ({} if none)."""

    def __init__(self, status: int, problem: dict[str, Any], headers: Mapping[str, str]) -> None:
        self.status = status
        self.problem = problem
        self.reason: str = str(problem.get("reason", ""))
        etag = problem.get("current_etag") or headers.get("etag")
        self.current_etag: str | None = str(etag) if etag else None
        version = problem.get("current_version")
        self.current_version: int | None = int(version) if version is not None else None
        detail = problem.get("detail") or problem.get("title") or ""
        super().__init__(f"{status} {self.reason or 'error'}: {detail}".rstrip(": "))

    @classmethod
    def from_response(cls, response: httpx.Response) -> LedgerHTTPError:
        try:
            body = json.loads(response.content) if response.content else {}
        except ValueError:
            body = {}
        return cls(response.status_code, body if isinstance(body, dict) else {},
                   response.headers)


@dataclass(frozen=True, slots=True)
class Document:
    """One representation of a resource, as the bridge served it."""

    name: str
    content: bytes
    content_type: str
    etag: str
    last_modified: str | None = None

    def json(self) -> Any:
        return json.loads(self.content)


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One Server-Sent Event of a watch: ``revision`` is its ``id:``, ``type`` its ``event:``
    (created, updated, deleted), ``resource`` its JSON data."""

    revision: int
    type: str
    resource: dict[str, Any]


class LedgerHTTPClient:
    """Calls the bridge through ``http`` (an ``httpx.AsyncClient`` whose base URL is the bridge's
    root); the caller owns ``http``. ``etags`` holds the last ETag seen for each name."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http
        self.etags: dict[str, str] = {}

    # --- plumbing ---------------------------------------------------------------------------

    async def _send(self, method: str, path: str, *, headers: dict[str, str] | None = None,
                    content: bytes | None = None, params: dict[str, Any] | None = None,
                    ) -> httpx.Response:
        response = await self.http.request(method, path, headers=headers, content=content,
                                           params=params)
        if response.status_code >= 400:
            raise LedgerHTTPError.from_response(response)
        return response

    def _document(self, name: str, response: httpx.Response, *, capture: bool = True
                  ) -> Document:
        etag = response.headers.get("etag", "")
        if capture and etag:
            self.etags[name] = etag
        return Document(name, response.content, response.headers.get("content-type", ""), etag,
                        response.headers.get("last-modified"))

    def _if_match(self, name: str, etag: str | None) -> dict[str, str]:
        """If-Match with `etag`, else the ETag last seen for `name`; without either, nothing
        (and the bridge answers 428, which says what to send)."""
        etag = etag or self.etags.get(name)
        return {"If-Match": etag} if etag else {}

    @staticmethod
    def _write_headers(content_type: str | None, idempotency_key: str | None,
                       reason: str | None) -> dict[str, str]:
        headers = {"Content-Type": content_type} if content_type else {}
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        if reason:
            headers[REASON_HEADER] = quote(reason, safe=_REASON_SAFE)
        return headers

    @staticmethod
    def _name_of(response: httpx.Response) -> str:
        return response.headers["location"].removeprefix("/v1/")

    # --- reads ------------------------------------------------------------------------------

    async def get(self, name: str, version: int | None = None) -> Document:
        """The current representation (or version `version`); 404/410 raise."""
        params = {"version": version} if version is not None else None
        response = await self._send("GET", f"/v1/{name}", params=params)
        return self._document(name, response, capture=version is None)

    async def list_resources(self, collection: str, *, page_size: int | None = None
                   ) -> AsyncIterator[dict[str, Any]]:
        """Every current resource of `collection` (metadata and content), across pages."""
        async for item in self._pages(f"/v1/{collection}", "resources", page_size):
            yield item

    async def history(self, name: str, *, page_size: int | None = None,
                      include_content: bool = False) -> AsyncIterator[dict[str, Any]]:
        """Every version of `name`, oldest first (tombstones included), across pages."""
        params = {"include_content": "true"} if include_content else {}
        async for item in self._pages(f"/v1/{name}:history", "versions", page_size, params):
            yield item

    async def _pages(self, path: str, key: str, page_size: int | None,
                     params: dict[str, Any] | None = None) -> AsyncIterator[dict[str, Any]]:
        params = dict(params or {})
        if page_size is not None:
            params["page_size"] = page_size
        while True:
            page = (await self._send("GET", path, params=params)).json()
            for item in page[key]:
                yield item
            if not page.get("next_page_token"):
                return
            params["page_token"] = page["next_page_token"]

    # --- writes -----------------------------------------------------------------------------

    async def create(self, name: str, content: bytes, content_type: str = JSON, *,
                     idempotency_key: str | None = None, reason: str | None = None
                     ) -> Document:
        """PUT with ``If-None-Match: *``: create `name`; 412 if it exists."""
        headers = self._write_headers(content_type, idempotency_key, reason)
        headers["If-None-Match"] = "*"
        response = await self._send("PUT", f"/v1/{name}", headers=headers, content=content)
        return self._document(name, response)

    async def post(self, collection: str, content: bytes, content_type: str = JSON, *,
                   idempotency_key: str | None = None, reason: str | None = None) -> Document:
        """Create a resource with a server-generated id in `collection`."""
        headers = self._write_headers(content_type, idempotency_key, reason)
        response = await self._send("POST", f"/v1/{collection}", headers=headers,
                                    content=content)
        return self._document(self._name_of(response), response)

    async def replace(self, name: str, content: bytes, content_type: str = JSON, *,
                      etag: str | None = None, idempotency_key: str | None = None,
                      reason: str | None = None) -> Document:
        """PUT under ``If-Match`` (`etag`, default: the ETag last seen for `name`)."""
        headers = self._write_headers(content_type, idempotency_key, reason)
        headers |= self._if_match(name, etag)
        response = await self._send("PUT", f"/v1/{name}", headers=headers, content=content)
        return self._document(name, response)

    async def merge_patch(self, name: str, patch: Any, *, etag: str | None = None,
                          idempotency_key: str | None = None, reason: str | None = None
                          ) -> Document:
        """An RFC 7396 merge patch, applied by the service atomically under If-Match."""
        return await self._patch(name, patch, MERGE_PATCH, etag, idempotency_key, reason)

    async def json_patch(self, name: str, ops: list[dict[str, Any]], *, etag: str | None = None,
                         idempotency_key: str | None = None, reason: str | None = None
                         ) -> Document:
        """An RFC 6902 JSON Patch, applied by the service atomically under If-Match."""
        return await self._patch(name, ops, JSON_PATCH, etag, idempotency_key, reason)

    async def _patch(self, name: str, document: Any, media_type: str, etag: str | None,
                     idempotency_key: str | None, reason: str | None) -> Document:
        headers = self._write_headers(media_type, idempotency_key, reason)
        headers |= self._if_match(name, etag)
        response = await self._send("PATCH", f"/v1/{name}", headers=headers,
                                    content=json.dumps(document).encode())
        return self._document(name, response)

    async def delete(self, name: str, *, etag: str | None = None,
                     idempotency_key: str | None = None, reason: str | None = None) -> None:
        """DELETE under ``If-Match`` (`etag`, default: the ETag last seen for `name`)."""
        headers = self._write_headers(None, idempotency_key, reason)
        headers |= self._if_match(name, etag)
        await self._send("DELETE", f"/v1/{name}", headers=headers)
        self.etags.pop(name, None)

    async def update(self, name: str, fn: Callable[[Any], Any], *, attempts: int = 16,
                     reason: str | None = None) -> Document:
        """Read-modify-write of a JSON resource: GET, ``fn(decoded JSON)``, PUT with If-Match
        on the ETag read; on 412 (someone else wrote first) read again and apply `fn` again.
        The last 412 is raised after `attempts` tries."""
        for attempt in range(attempts):
            current = await self.get(name)
            content = json.dumps(fn(current.json())).encode()
            try:
                return await self.replace(name, content, current.content_type or JSON,
                                          etag=current.etag, reason=reason)
            except LedgerHTTPError as error:
                if error.status != 412 or attempt == attempts - 1:
                    raise
                # Full jitter, so writers that lost together do not collide again together.
                await asyncio.sleep(random.uniform(0, min(0.002 * 2**attempt, 0.1)))
        raise ValueError("attempts must be at least 1")

    # --- watch ------------------------------------------------------------------------------

    async def watch(self, prefix: str = "", *, start_revision: int | None = None,
                    last_event_id: int | None = None, retry_s: float | None = None,
                    idle_timeout_s: float | None = 60.0, max_reconnects: int = 5
                    ) -> AsyncIterator[WatchEvent]:
        """Server-Sent Events of `prefix` ("" = the whole ledger): replay from `start_revision`
        (inclusive) or after `last_event_id`, else from now; then live, forever.

        A dropped connection (or one silent for `idle_timeout_s`, more than the heartbeat) is
        reopened with ``Last-Event-ID`` set to the last revision seen, so no event is lost or
        repeated; the pause between attempts is `retry_s`, else the server's ``retry:``. After
        `max_reconnects` failed attempts in a row the last failure is raised.
        """
        path = f"/v1/{prefix}:watch" if prefix else "/v1:watch"
        last, delay, failures = last_event_id, retry_s if retry_s is not None else 1.0, 0
        timeout = httpx.Timeout(self.http.timeout.connect, read=idle_timeout_s)
        while True:
            headers = {"Accept": "text/event-stream", "Cache-Control": "no-store"}
            params: dict[str, Any] = {}
            if last is not None:
                headers["Last-Event-ID"] = str(last)
            elif start_revision is not None:
                params["start_revision"] = start_revision
            try:
                async with self.http.stream("GET", path, headers=headers, params=params,
                                            timeout=timeout) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        error = LedgerHTTPError.from_response(response)
                        if response.status_code not in (502, 503, 504):
                            raise error
                        raise _Retry(error)
                    async for field, value in _sse_fields(response):
                        if field == "retry" and value.isdigit() and retry_s is None:
                            delay = int(value) / 1000
                        elif field == "comment" and last is None and start_revision is None:
                            # The bridge names the ledger's revision when the watch began: a
                            # watch "from now" resumes after it, so nothing is missed.
                            seen = value.removeprefix(" watching from revision ")
                            last = int(seen) if seen.isdigit() else last
                        elif field == "error":
                            error = LedgerHTTPError(int(value.get("status", 502)), value, {})
                            if error.reason != "WATCHER_TOO_SLOW":
                                raise error
                            raise _Retry(error)
                        elif field == "event":
                            failures, last = 0, value.revision
                            yield value
            except (httpx.TransportError, _Retry) as exc:
                failures += 1
                if failures > max_reconnects:
                    raise exc.error if isinstance(exc, _Retry) else exc from None
            else:  # the server ended the stream: reconnect as EventSource does
                failures += 1
                if failures > max_reconnects:
                    raise httpx.RemoteProtocolError("the watch stream keeps ending")
            await asyncio.sleep(delay)


class _Retry(Exception):
    def __init__(self, error: LedgerHTTPError) -> None:
        self.error = error


async def _sse_fields(response: httpx.Response) -> AsyncIterator[tuple[str, Any]]:
    """The stream as ("retry", ms) / ("comment", text) / ("event", WatchEvent) /
    ("error", problem dict), per the SSE parsing rules that matter here."""
    event_id, event_type, data = "", "message", list[str]()
    async for line in response.aiter_lines():
        if not line:
            if data:
                payload = json.loads("\n".join(data))
                if event_type == "error":
                    yield "error", payload
                elif event_id.isdigit():
                    yield "event", WatchEvent(int(event_id), event_type, payload)
            event_type, data = "message", []
            continue
        if line.startswith(":"):
            yield "comment", line[1:]
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            data.append(value)
        elif field == "event":
            event_type = value
        elif field == "id":
            event_id = value
        elif field == "retry":
            yield "retry", value


@asynccontextmanager
async def open_client(base_url: str, *, timeout_s: float = 10.0,
                      transport: httpx.AsyncBaseTransport | None = None,
                      headers: Mapping[str, str] | None = None
                      ) -> AsyncIterator[LedgerHTTPClient]:
    """A client of the bridge at `base_url` on its own connection pool, closed with the block."""
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, transport=transport,
                                 headers=headers) as http:
        yield LedgerHTTPClient(http)
