"""JSON the bridge writes (listings, history, problems, SSE events): orjson, with the standard
library where orjson declines.

orjson is several times faster and writes the same JSON: compact separators, UTF-8 (no ``\\u``
escapes), shortest round-trip floats. It refuses integers beyond 64 bits, which a stored JSON
document may hold (casledger keeps content exactly as written); those go through ``json``, which
writes them exactly. Reading stays with ``json``: orjson would read such an integer as a float.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
from starlette.responses import JSONResponse


def dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:  # an integer beyond 64 bits (or a lone surrogate): escaped ASCII, exact
        return json.dumps(value, allow_nan=False, separators=(",", ":")).encode()


class FastJSONResponse(JSONResponse):
    """Starlette's JSONResponse, rendered by :func:`dumps`."""

    def render(self, content: Any) -> bytes:
        return dumps(content)
