"""How resources look over HTTP: JSON views for listings, history and events; HTTP dates."""

from __future__ import annotations

import base64
import functools
import json
from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from casledger.service.api.casledger.v1 import ledger_pb2 as pb

from .conditional import format_http_date


def http_date(ts: Timestamp) -> str:
    return _http_date(ts.seconds)


@functools.lru_cache(maxsize=256)
def _http_date(seconds: int) -> str:
    # Under load most responses carry the same few seconds (Last-Modified of fresh writes).
    return format_http_date(datetime.fromtimestamp(seconds, UTC))


def rfc3339(ts: Timestamp) -> str:
    return ts.ToJsonString()


def last_modified(resource: pb.Resource) -> datetime:
    return datetime.fromtimestamp(resource.update_time.seconds, UTC)


def is_json(media_type: str) -> bool:
    """The service's rule (it validated such content as JSON): application/json or a +json
    suffix with a name before it. A bare `+json` subtype is stored unvalidated, so parsing it
    here could fail."""
    essence = media_type.split(";", 1)[0].strip().lower()
    subtype = essence.partition("/")[2]
    return essence == "application/json" or (
        subtype.endswith("+json") and len(subtype) > len("+json"))


def resource_view(r: pb.Resource, *, content: bool = True) -> dict[str, Any]:
    """A resource's metadata (and content: JSON inline, anything else base64) as JSON."""
    view: dict[str, Any] = {
        "name": r.name, "version": r.version, "revision": r.revision, "etag": r.etag,
        "content_type": r.content_type, "size_bytes": r.size_bytes,
        "create_time": rfc3339(r.create_time), "update_time": rfc3339(r.update_time),
        "deleted": r.deleted, "actor": r.actor, "reason": r.reason, "hash": r.hash,
    }
    if content and not r.deleted:
        if is_json(r.content_type):
            view["content"] = json.loads(r.content)
        else:
            view["content_base64"] = base64.b64encode(r.content).decode()
    return view
