"""The OpenAPI 3.1 document of the bridge: every route, header, status and problem body.

The document mirrors ``app.py`` and is built from small helpers (parameters, headers, responses,
operations), once: :func:`openapi_document` caches it, so callers must treat it as read-only.

Resource names are paths (``projects/p1/notes/n7``) but an OpenAPI path parameter cannot hold a
``/`` in strict tools, so the single-level shapes are documented (``/v1/{collection}/{id}``) and
the nesting rule is stated in the descriptions; the routes themselves accept any depth.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from .errors import PROBLEM_JSON

JSON = dict[str, Any]

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
EVENT_STREAM = "text/event-stream"
INT64_MAX = 2**63 - 1
SEGMENT = "[A-Za-z0-9][A-Za-z0-9._~-]{0,127}"
_ETAG = r'(W/)?"[\x21\x23-\x7e]*"'
ETAG_LIST = rf"^[ \t]*(\*|{_ETAG}([ \t]*,[ \t]*{_ETAG})*)[ \t]*$"
HTTP_DATE = (r"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), [0-9]{2} (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|"
             r"Oct|Nov|Dec) [0-9]{4} [0-9]{2}:[0-9]{2}:[0-9]{2} GMT$")
NAME_RULES = (
    "A resource name alternates collection ids and resource ids (`documents/123`, "
    "`projects/p1/notes/n7`): every segment matches `" + SEGMENT + "`, at most 16 segments and "
    "512 characters; an even number of segments names a resource, an odd number a collection. "
    "Nested names use the same routes with more segments (`/v1/projects/p1/notes/n7`); names "
    "never contain percent-encoded characters (400)."
)


def ref(kind: str, name: str) -> JSON:
    return {"$ref": f"#/components/{kind}/{name}"}


def int64(minimum: int = 0, **extra: Any) -> JSON:
    return {"type": "integer", "minimum": minimum, "maximum": INT64_MAX, **extra}


# --- parameters --------------------------------------------------------------------------------


def parameter(where: str, name: str, description: str, schema: JSON, *,
              required: bool = False) -> JSON:
    return {"name": name, "in": where, "description": description, "required": required,
            "schema": schema}


def segment(name: str, what: str) -> JSON:
    return parameter("path", name, f"{what}. {NAME_RULES}",
                     {"type": "string", "pattern": f"^{SEGMENT}$"}, required=True)


PARAMETERS: dict[str, JSON] = {
    "collection": segment("collection", "The collection id (the odd segments of a name)"),
    "id": segment("id", "The resource id within the collection"),
    "version": parameter("query", "version", "Read this past version instead of the current "
                         "one; the response is then immutable. A tombstone version is 410.",
                         int64(1)),
    "page_size": parameter("query", "page_size", "At most this many items (0: the service's "
                           "default).", {"type": "integer", "minimum": 0, "maximum": 1000}),
    "page_token": parameter("query", "page_token", "The `next_page_token` of the previous page.",
                            {"type": "string"}),
    "include_content": parameter("query", "include_content", "Include each version's content.",
                                 {"type": "boolean", "default": False}),
    "start_revision": parameter("query", "start_revision", "Replay from this ledger revision "
                                "(inclusive), then follow live; 0 or absent: from now on.",
                                int64()),
    "If-Match": parameter("header", "If-Match", "RFC 9110 §13.1.1, strong comparison: `*` or "
                          "entity-tags (lists and several lines allowed). The usual precondition "
                          "of a write: the ETag you read. A malformed value is 400.",
                          {"type": "string", "pattern": ETAG_LIST}),
    "If-None-Match": parameter("header", "If-None-Match", "RFC 9110 §13.1.2, weak comparison. "
                               "On GET/HEAD a match is 304; on PUT, `*` creates (412 if the "
                               "resource exists). An entity-tag here is not a write "
                               "precondition: send it on If-Match.",
                               {"type": "string", "pattern": ETAG_LIST}),
    "If-Unmodified-Since": parameter("header", "If-Unmodified-Since", "RFC 9110 §13.1.4, only "
                                     "without If-Match; one-second granularity, refused (412) "
                                     "when one second holds two versions. Invalid dates are "
                                     "ignored.", {"type": "string", "pattern": HTTP_DATE}),
    "If-Modified-Since": parameter("header", "If-Modified-Since", "RFC 9110 §13.1.3, GET/HEAD "
                                   "only and only without If-None-Match: 304 if not modified "
                                   "since. Invalid dates are ignored.",
                                   {"type": "string", "pattern": HTTP_DATE}),
    "Idempotency-Key": parameter("header", "Idempotency-Key", "The write's request id, scoped "
                                 "to the name: a retry with the same key and request returns "
                                 "the first outcome; the same key on a different request is "
                                 "422.", {"type": "string", "pattern": "^[\\x21-\\x7e]{1,256}$"}),
    "Prefer": parameter("header", "Prefer", "RFC 7240: `return=minimal` answers without a body "
                        "(204 instead of 200; 201 stays 201) and `Preference-Applied`.",
                        {"type": "string", "enum": ["return=minimal", "return=representation"]}),
    "Casledger-Reason": parameter("header", "Casledger-Reason", "Why this write is made, "
                                  "recorded in the ledger: UTF-8, percent-encoded where not "
                                  "ASCII; at most 1024 characters, no control characters.",
                                  {"type": "string", "maxLength": 1024,
                                   "pattern": "^[\\x20-\\x7e]*$"}),
    "Last-Event-ID": parameter("header", "Last-Event-ID", "The `id:` (revision) of the last "
                               "event seen: resume after it (exclusive). Wins over "
                               "`start_revision`.", {"type": "string",
                                                     "pattern": "^[0-9]{1,18}$"}),
}


def params(*names: str) -> list[JSON]:
    return [ref("parameters", name) for name in names]


# --- headers and bodies ------------------------------------------------------------------------

HEADERS: dict[str, tuple[str, JSON]] = {
    "ETag": ("The strong entity-tag of the version (send it back on If-Match).",
             {"type": "string", "pattern": f"^{_ETAG}$"}),
    "Last-Modified": ("When the version was written (IMF-fixdate).",
                      {"type": "string", "pattern": HTTP_DATE}),
    "Location": ("The created resource: `/v1/{name}`.", {"type": "string", "pattern": "^/v1/"}),
    "Accept-Patch": ("The patch media types PATCH takes (RFC 5789).",
                     {"type": "string", "const": f"{MERGE_PATCH}, {JSON_PATCH}"}),
    "Allow": ("The methods this path allows.", {"type": "string"}),
    "Retry-After": ("Seconds to wait before retrying.", {"type": "integer", "minimum": 0}),
    "Cache-Control": ("Caching directives: `no-cache` for the current version, immutable for a "
                      "past one, `no-store` on 428 and event streams.", {"type": "string"}),
    "Preference-Applied": ("`return=minimal` when that preference was honoured.",
                           {"type": "string", "const": "return=minimal"}),
    "Content-Length": ("The length of the representation a GET would return.",
                       {"type": "integer", "minimum": 0}),
    "WWW-Authenticate": ("The authentication scheme the service expects.", {"type": "string"}),
    "X-Request-Id": ("The request's id: the client's own X-Request-Id when it is 1 to 128 "
                     "visible ASCII characters, else one the bridge made. The service logs it "
                     "with every call the request made.",
                     {"type": "string", "pattern": "^[\\x21-\\x7e]{1,128}$"}),
}


def headers(*names: str, optional: tuple[str, ...] = ()) -> JSON:
    return {name: {"required": name not in optional, "description": HEADERS[name][0],
                   "schema": HEADERS[name][1]} for name in (*names, *optional)}


def response(description: str, *, header_names: tuple[str, ...] = (),
             optional: tuple[str, ...] = (), content: JSON | None = None,
             links: JSON | None = None) -> JSON:
    out: JSON = {"description": description}
    # Every answer of the bridge's own carries its request id (see middleware.py).
    out["headers"] = headers(*header_names, optional=(*optional, "X-Request-Id"))
    if content is not None:
        out["content"] = content
    if links:
        out["links"] = links
    return out


def link(op_id: str, description: str, headers: dict[str, str] | None = None) -> JSON:
    """A link to an operation on the same resource, with these request headers."""
    parameters = {"path.collection": "$request.path.collection", "path.id": "$request.path.id"}
    parameters |= {f"header.{name}": value for name, value in (headers or {}).items()}
    return {"operationId": op_id, "description": description, "parameters": parameters}


def edit_links() -> JSON:
    """What a client does with the ETag of a version it holds: the compare-and-swap loop."""
    etag = "$response.header.ETag"
    return {
        "Read": link("getResource", "Read the current version."),
        "Revalidate": link("getResource", "304 while this version is current.",
                           {"If-None-Match": etag}),
        "Replace": link("putResource", "Replace this version.", {"If-Match": etag}),
        "Patch": link("patchResource", "Patch this version.", {"If-Match": etag}),
        "Delete": link("deleteResource", "Delete this version.", {"If-Match": etag}),
        "History": link("listVersions", "Every version so far."),
    }


def json_body(schema: JSON) -> JSON:
    return {"application/json": {"schema": schema}}


ANY_CONTENT: JSON = {
    "application/json": {"schema": {}},
    "*/*": {"schema": {"type": "string", "contentMediaType": "application/octet-stream"}},
}
WRITE_BODY: JSON = {
    "required": True,
    "description": "The new content, stored as the exact bytes sent with their media type "
                   "(any media type; JSON media types must hold valid RFC 8259 JSON). At most "
                   "1 MiB by default (413).",
    "content": {
        "application/json": {"schema": {}},
        "text/plain": {"schema": {"type": "string"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
}
PATCH_BODY: JSON = {
    "required": True,
    "description": "A patch the service applies atomically under the precondition.",
    "content": {
        MERGE_PATCH: {"schema": {"description": "RFC 7396 JSON merge patch."}},
        JSON_PATCH: {"schema": ref("schemas", "JsonPatch")},
    },
}


# --- problems ----------------------------------------------------------------------------------

# status -> (component name, description, required headers, optional headers)
PROBLEMS: dict[int, tuple[str, str, tuple[str, ...], tuple[str, ...]]] = {
    400: ("BadRequest", "Invalid request: a bad name (`INVALID_NAME`), content (`INVALID_CONTENT`"
          "), patch (`INVALID_PATCH`), page token, query parameter, or a malformed conditional "
          "header (`MALFORMED_HEADER`; never treated as absent).", (), ()),
    401: ("Unauthorized", "The service requires authentication.", ("WWW-Authenticate",), ()),
    403: ("Forbidden", "The caller may not do this.", (), ()),
    404: ("NotFound", "No such resource or version (`deleted_at_version` if it was deleted), "
          "or no such route (`NO_ROUTE`).", (), ()),
    409: ("Conflict", "`PATCH_CONFLICT`: a JSON Patch `test` failed or a path is missing; "
          "nothing was applied. `ALREADY_EXISTS` on a create without If-None-Match.", (), ()),
    410: ("Gone", "The requested version is the resource's deletion (`DELETED`).", (), ()),
    412: ("PreconditionFailed", "Precondition failed (`VERSION_MISMATCH`, `MODIFIED_SINCE`, "
          "`ALREADY_EXISTS` under `If-None-Match: *`): the resource changed since you read it. "
          "Nothing was written. The body and the `ETag` header carry the current version when "
          "the resource exists: re-read, re-apply your change, retry with the new ETag. A "
          "request without a precondition never gets 412.", (), ("ETag",)),
    413: ("ContentTooLarge", "The body is over the limit (`limit`, in bytes).", (), ()),
    415: ("UnsupportedMediaType", "PATCH takes only the media types in `Accept-Patch`.",
          ("Accept-Patch",), ()),
    422: ("UnprocessableContent", "`IDEMPOTENCY_KEY_REUSED`: the key was used for a different "
          "request.", (), ()),
    428: ("PreconditionRequired", "Precondition required (RFC 6585): a write must say which "
          "version it edits. Nothing was written. `required_header` names what to send "
          "(`If-Match` with the ETag of a GET, or `If-None-Match: *` to create an absent "
          "resource) and `detail` says how, including when an ETag was sent on If-None-Match "
          "instead of If-Match. The current `ETag` header is included when the resource "
          "exists.", ("Cache-Control",), ("ETag",)),
    429: ("TooManyRequests", "The service is overloaded.", ("Retry-After",), ()),
    500: ("InternalError", "A bridge bug; nothing was written unless a later read shows it.",
          (), ()),
    502: ("BadGateway", "The service failed in an unexpected way.", (), ()),
    503: ("ServiceUnavailable", "The service is unreachable or not serving, or the bridge or "
          "the service is at its bound of in-flight work (reason OVERLOADED); nothing was done.",
          ("Retry-After",), ()),
    504: ("GatewayTimeout", "The service did not answer in time.", ("Retry-After",), ()),
}
SERVICE_ERRORS = (401, 403, 429, 500, 502, 503, 504)


def problem_response(status: int) -> JSON:
    _, description, required, optional = PROBLEMS[status]
    schema = {"allOf": [ref("schemas", "Problem"),
                        {"properties": {"status": {"const": status}}}]}
    return response(description, header_names=required, optional=optional,
                    content={PROBLEM_JSON: {"schema": schema}})


def problems(*statuses: int) -> JSON:
    return {str(s): ref("responses", PROBLEMS[s][0]) for s in sorted({*statuses, 500})}


def v1_problems(*statuses: int) -> JSON:
    """Problems of a `/v1` operation: also 400 (a name off-grammar) and 404 (`NO_ROUTE`: a path
    the router cannot take apart, such as one holding a line break)."""
    return problems(400, 404, *statuses)


# --- schemas -----------------------------------------------------------------------------------


def schemas() -> JSON:
    string, integer = {"type": "string"}, int64()
    pointer = {"type": "string", "pattern": "^(/([^~/]|~[01])*)*$"}

    def patch_op(ops: list[str], *required: str) -> JSON:
        return {"type": "object", "required": ["op", "path", *required],
                "properties": {"op": {"enum": ops}, "path": pointer, "from": pointer,
                               "value": {}}}

    return {
        "Problem": {
            "type": "object", "description": "An RFC 9457 problem detail.",
            "required": ["type", "title", "status", "detail", "reason"],
            "properties": {
                "type": {"type": "string", "format": "uri"}, "title": string,
                "status": {"type": "integer", "minimum": 400, "maximum": 599},
                "detail": string,
                "reason": {"type": "string", "pattern": "^[A-Z][A-Z0-9_]*$",
                           "description": "The ledger's ErrorInfo.reason, or the bridge's."},
                "current_etag": {"type": "string", "pattern": f"^{_ETAG}$"},
                "current_version": integer,
                "required_header": {"enum": ["If-Match", "If-Unmodified-Since",
                                             "If-None-Match: *"]},
                "field": string, "header": string, "path": string,
                "limit": integer, "size": integer,
                "deleted_at_version": integer, "resume_revision": integer,
            },
        },
        "Resource": {
            "type": "object", "description": "A version's metadata; `content` (JSON media "
            "types) or `content_base64` (others) when content is included and not deleted.",
            "required": ["name", "version", "revision", "etag", "content_type", "size_bytes",
                         "create_time", "update_time", "deleted", "actor", "reason", "hash"],
            "properties": {
                "name": string, "version": integer, "revision": integer,
                "etag": {"type": "string", "pattern": f"^{_ETAG}$"},
                "content_type": string, "size_bytes": integer,
                "create_time": {"type": "string", "format": "date-time"},
                "update_time": {"type": "string", "format": "date-time"},
                "deleted": {"type": "boolean"}, "actor": string, "reason": string,
                "hash": {"type": "string", "pattern": "^[0-9a-f]*$"},
                "content": {}, "content_base64": {"type": "string", "contentEncoding": "base64"},
            },
        },
        "ResourceList": page_schema("resources", "The collection's current resources."),
        "VersionList": page_schema("versions", "Every version, oldest first, tombstones "
                                   "included."),
        "Event": {"description": "One event of a watch stream (the `schema` of "
                  "text/event-stream describes each event, as in OpenAPI 3.2).", "oneOf": [
                      event_schema(["created", "updated", "deleted"], "Resource", "id"),
                      event_schema(["error"], "Problem")]},
        "Status": {"type": "object", "required": ["status"],
                   "properties": {"status": {"enum": ["ok", "ready"]}}},
        "JsonPatch": {"type": "array", "description": "An RFC 6902 JSON Patch.",
                      "items": ref("schemas", "JsonPatchOperation")},
        "JsonPatchOperation": {"oneOf": [
            patch_op(["add", "replace", "test"], "value"), patch_op(["remove"]),
            patch_op(["move", "copy"], "from"),
        ]},
    }


def event_schema(names: list[str], data: str, *required: str) -> JSON:
    return {"type": "object", "required": ["event", "data", *required], "properties": {
        "id": {"type": "string", "pattern": "^[0-9]+$"}, "event": {"enum": names},
        "data": {"type": "string", "contentMediaType": "application/json",
                 "contentSchema": ref("schemas", data)}}}


def page_schema(items: str, description: str) -> JSON:
    return {"type": "object", "description": description,
            "required": [items, "next_page_token"],
            "properties": {items: {"type": "array", "items": ref("schemas", "Resource")},
                           "next_page_token": {"type": "string"}}}


# --- operations --------------------------------------------------------------------------------


def operation(op_id: str, summary: str, responses: JSON, *, parameters: list[JSON] | None = None,
              body: JSON | None = None, description: str = "", tag: str = "resources") -> JSON:
    op: JSON = {"operationId": op_id, "summary": summary, "tags": [tag],
                "parameters": parameters or [], "responses": responses}
    if description:
        op["description"] = description
    if body is not None:
        op["requestBody"] = body
    return op


def named(prefix: str, op_id: str) -> str:
    return prefix + op_id[0].upper() + op_id[1:]


def options(op_id: str, allow: str, *, patchable: bool = False, in_v1: bool = True) -> JSON:
    names = ("Allow", "Accept-Patch") if patchable else ("Allow",)
    return operation(op_id, f"Allowed methods: {allow}", {
        "204": response("The allowed methods.", header_names=names),
        **(v1_problems() if in_v1 else problems())}, tag="discovery")


CONDITIONAL_READ = ("If-Match", "If-None-Match", "If-Modified-Since", "If-Unmodified-Since")
WRITE_HEADERS = ("Idempotency-Key", "Prefer", "Casledger-Reason")
WRITE_RULES = (
    "Every write is a compare-and-swap: without a usable precondition (If-Match, "
    "If-Unmodified-Since, or If-None-Match: * to create) it is refused with 428; with a "
    "precondition that does not hold, with 412 and the current ETag."
)
WRITTEN = ("ETag", "Last-Modified")


def resource_item() -> JSON:
    read = {
        "200": response("The stored bytes, in their stored media type.",
                        header_names=(*WRITTEN, "Cache-Control"), content=ANY_CONTENT,
                        links=edit_links()),
        "304": response("Not modified (If-None-Match or If-Modified-Since).",
                        header_names=(*WRITTEN, "Cache-Control")),
        **v1_problems(410, 412, *SERVICE_ERRORS),
    }
    head = {**read, "200": response("As GET, without the body.",
                                    header_names=(*WRITTEN, "Cache-Control", "Content-Length"))}
    written = response("The stored version.", header_names=WRITTEN, content=ANY_CONTENT,
                       links=edit_links())
    minimal = response("Written; `Prefer: return=minimal`.",
                       header_names=(*WRITTEN, "Preference-Applied"), links=edit_links())
    write_errors = (409, 412, 413, 422, 428, *SERVICE_ERRORS)
    return {
        "parameters": params("collection", "id"),
        "get": operation("getResource", "Read a resource (or `?version=N`)", read,
                         parameters=params("version", *CONDITIONAL_READ)),
        "head": operation("headResource", "Read a resource's headers", head,
                          parameters=params("version", *CONDITIONAL_READ)),
        "put": operation(
            "putResource", "Replace, or create with If-None-Match: *", {
                "200": written, "201": response(
                    "Created (`If-None-Match: *`); the body is the stored content unless "
                    "`Prefer: return=minimal`.", header_names=("Location", *WRITTEN),
                    optional=("Preference-Applied",), links=edit_links()),
                "204": minimal, **v1_problems(*write_errors)},
            parameters=params("If-Match", "If-None-Match", "If-Unmodified-Since",
                              *WRITE_HEADERS),
            body=WRITE_BODY, description=WRITE_RULES),
        "patch": operation(
            "patchResource", "Apply a merge patch or JSON Patch under If-Match",
            {"200": written, "204": minimal, **v1_problems(*write_errors, 415)},
            parameters=params("If-Match", "If-None-Match", "If-Unmodified-Since",
                              *WRITE_HEADERS),
            body=PATCH_BODY, description=WRITE_RULES + " Other media types: 415."),
        "delete": operation(
            "deleteResource", "Delete (writes a tombstone version)",
            {"204": response("Deleted.", links={
                "Read": link("getResource", "Now 404."),
                "Recreate": link("putResource", "Create it again (the versions go on).",
                                 {"If-None-Match": "*"})}), **v1_problems(*write_errors)},
            parameters=params("If-Match", "If-None-Match", "If-Unmodified-Since",
                              "Idempotency-Key", "Casledger-Reason"),
            description=WRITE_RULES + " Deleting an absent resource is 404."),
        "options": options("optionsResource", "GET, HEAD, PUT, PATCH, DELETE, OPTIONS",
                           patchable=True),
    }


def collection_item() -> JSON:
    listing = {"200": response("One page of the collection.",
                               content=json_body(ref("schemas", "ResourceList"))),
               **v1_problems(*SERVICE_ERRORS)}
    return {
        "parameters": params("collection"),
        "get": operation("listResources", "List a collection", listing,
                         parameters=params("page_size", "page_token"), tag="collections"),
        "head": operation("headCollection", "List a collection, headers only",
                          {**listing, "200": response("As GET, without the body.")},
                          parameters=params("page_size", "page_token"), tag="collections"),
        "post": operation(
            "createResource", "Create a resource with a server-generated id", {
                "201": response("Created; the body is the stored content unless "
                                "`Prefer: return=minimal`.", header_names=("Location", *WRITTEN),
                                optional=("Preference-Applied",)),
                **v1_problems(409, 413, 422, *SERVICE_ERRORS)},
            parameters=params(*WRITE_HEADERS), body=WRITE_BODY, tag="collections",
            description="No precondition is needed: the id is new."),
        "options": options("optionsCollection", "GET, HEAD, POST, OPTIONS"),
    }


def history_item() -> JSON:
    page = {"200": response("One page of versions.",
                            content=json_body(ref("schemas", "VersionList"))),
            **v1_problems(*SERVICE_ERRORS)}
    query = params("page_size", "page_token", "include_content")
    return {
        "parameters": params("collection", "id"),
        "get": operation("listVersions", "A resource's history", page, parameters=query,
                         tag="history"),
        "head": operation("headVersions", "A resource's history, headers only",
                          {**page, "200": response("As GET, without the body.")},
                          parameters=query, tag="history"),
        "options": options("optionsVersions", "GET, HEAD, OPTIONS"),
    }


def watch_item(op_id: str, what: str, *, collection: bool) -> JSON:
    stream = response(
        "Server-Sent Events, forever: `id:` is the ledger revision, `event:` is `created`, "
        "`updated` or `deleted` with a Resource as `data:`; comments are heartbeats; an "
        "`error` event carries a Problem (`resume_revision`) when the service ends the watch.",
        header_names=("Cache-Control",),
        content={EVENT_STREAM: {"schema": ref("schemas", "Event")}})
    refusals = v1_problems(*SERVICE_ERRORS) if collection else problems(400, *SERVICE_ERRORS)
    responses = {"200": stream, **refusals}
    query = params("start_revision", "Last-Event-ID")
    item: JSON = {
        "get": operation(op_id, f"Watch {what}", responses, parameters=query, tag="watch"),
        "head": operation(named("head", op_id), f"Open a watch of {what} and close it",
                          {**responses, "200": response("The watch was accepted.",
                                                        header_names=("Cache-Control",))},
                          parameters=query, tag="watch"),
        "options": options(named("options", op_id), "GET, HEAD, OPTIONS", in_v1=collection),
    }
    if collection:
        item["parameters"] = params("collection")
    return item


def probe(op_id: str, summary: str, ok: str, content: JSON, *statuses: int) -> JSON:
    """GET and its HEAD (Starlette answers HEAD wherever GET is routed)."""
    get = {"200": response(ok, content=content), **problems(*statuses)}
    return {"get": operation(op_id, summary, get, tag="operations"),
            "head": operation(named("head", op_id), f"{summary} (headers only)",
                              {**get, "200": response(ok)}, tag="operations")}


@cache
def openapi_document() -> dict[str, Any]:
    """The bridge's OpenAPI 3.1 document (built once; do not mutate it)."""
    status = json_body(ref("schemas", "Status"))
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "casledger HTTP bridge", "version": "0.1.0",
            "description": "A versioned resource ledger with compare-and-swap writes. Read a "
            "resource to get its ETag; send it back on If-Match to write. " + WRITE_RULES +
            " Every error is `application/problem+json` (RFC 9457). " + NAME_RULES,
        },
        # A token is needed only when the service runs with access control on (the bridge
        # forwards Authorization and checks nothing itself): either alternative may apply.
        "security": [{}, {"bearerAuth": []}],
        "paths": {
            "/v1/{collection}/{id}": resource_item(),
            "/v1/{collection}": collection_item(),
            "/v1/{collection}/{id}:history": history_item(),
            "/v1/{collection}:watch": watch_item("watchCollection", "a collection (or any "
                                                 "whole-segment prefix)", collection=True),
            "/v1:watch": watch_item("watchLedger", "the whole ledger", collection=False),
            "/healthz": probe("healthz", "The process is up", "Up.", status),
            "/readyz": probe("readyz", "The ledger service is reachable", "Ready.", status, 503),
            "/openapi.json": probe("openapi", "This document", "The OpenAPI document.",
                                   json_body({"type": "object"})),
            "/metrics": probe("metrics", "Prometheus metrics of this bridge", "The Prometheus "
                              "text exposition format.",
                              {"text/plain": {"schema": {"type": "string"}}}),
        },
        "components": {
            "schemas": schemas(),
            "parameters": PARAMETERS,
            "responses": {name: problem_response(s) for s, (name, *_) in PROBLEMS.items()},
            "securitySchemes": {"bearerAuth": {
                "type": "http", "scheme": "bearer",
                "description": "A token made with `casledger token create`, needed when the "
                "service runs with access control (`--auth-tokens-file`). The bridge forwards "
                "the Authorization header to the service, which decides: 401 without a valid "
                "token, 403 when its scopes or prefixes do not allow the request."}},
        },
    }
