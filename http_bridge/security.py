"""The bridge's part in access control and TLS; the service decides who may do what.

:class:`ForwardAuthorization` hands each HTTP request's ``Authorization`` header to the service as
gRPC metadata (``casledger.service.client.call_metadata``) for as long as the request runs, SSE
streams included. The bridge checks no token itself: the service answers UNAUTHENTICATED or
PERMISSION_DENIED, which ``errors.py`` maps to 401 (with ``WWW-Authenticate``) and 403.
:func:`target_tls` reads what the bridge needs to reach the service over TLS.
"""

from __future__ import annotations

import logging

from starlette.types import ASGIApp, Receive, Scope, Send

from casledger.service.client import call_metadata

log = logging.getLogger("casledger.bridge")

# gRPC metadata values are printable ASCII; a longer value than this is no casledger token.
MAX_AUTHORIZATION_BYTES = 4096


def forwardable(value: bytes) -> str | None:
    """The header value as gRPC metadata, or None when gRPC could not carry it (the service
    then sees no credentials and answers as it does for a call without any)."""
    if len(value) > MAX_AUTHORIZATION_BYTES or not all(0x20 <= b <= 0x7E for b in value):
        return None
    return value.decode("ascii").strip() or None


class ForwardAuthorization:
    """ASGI middleware: the request's Authorization header(s) join the metadata of every ledger
    call made while the request is handled, after whatever metadata is already set."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        values = []
        for name, raw in scope["headers"]:
            if name == b"authorization":
                value = forwardable(raw)
                if value is None:
                    log.debug("not forwarding an Authorization header gRPC cannot carry")
                else:
                    values.append(("authorization", value))
        if not values:
            await self.app(scope, receive, send)
            return
        token = call_metadata.set((*call_metadata.get(), *values))
        try:
            await self.app(scope, receive, send)
        finally:
            call_metadata.reset(token)


def read_ca(path: str) -> bytes:
    """The PEM root certificates the bridge trusts for the service (--target-tls-ca)."""
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise OSError(f"cannot read --target-tls-ca {path}: {exc.strerror}") from None


def target_tls(ca_file: str, server_name: str) -> tuple[bytes | None, list[tuple[str, str]]]:
    """(root certificates or None for plaintext, channel options) to reach the service."""
    if not ca_file:
        return None, []
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return read_ca(ca_file), options
