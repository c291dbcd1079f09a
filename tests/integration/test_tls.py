"""TLS: the gRPC service over TLS, the bridge serving HTTPS, and the bridge reaching the service
over TLS, with a throwaway CA made at test time (the `tls_files` fixture)."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import httpx
import pytest
import uvicorn

from casledger.http_bridge.app import BridgeSettings
from casledger.http_bridge.server import bridge_config
from casledger.service.client import LedgerCallError, connect
from casledger.service.config import Settings
from casledger.service.server import RunningServer, serve

from .conftest import BridgeFactory, ProblemCheck

if TYPE_CHECKING:
    from tests.conftest import TLSFiles


@pytest.fixture
async def tls_server(settings: Settings, tls_files: TLSFiles) -> AsyncIterator[RunningServer]:
    async with serve(settings.replace(tls_cert=str(tls_files.cert),
                                      tls_key=str(tls_files.key))) as running:
        yield running


# --- the gRPC service --------------------------------------------------------------------------


@pytest.mark.parametrize("trust", ["ca", "cert"])
async def test_a_client_trusting_the_ca_or_the_certificate_talks_tls(
        tls_server: RunningServer, tls_files: TLSFiles, trust: str) -> None:
    # Trusting the server's own certificate (pinning it) is what `casledger serve` gives its
    # bridge by default.
    roots = (tls_files.ca if trust == "ca" else tls_files.cert).read_bytes()
    async with connect(tls_server.target, tls_ca=roots, call_timeout=5) as client:
        created = await client.create("documents", b'{"n":1}', resource_id="t1")
        assert (await client.get("documents/t1")).etag == created.etag
    # "localhost" is in the certificate too.
    async with connect(f"localhost:{tls_server.port}", tls_ca=roots, call_timeout=5) as client:
        assert (await client.get("documents/t1")).version == 1


async def test_a_plaintext_client_fails(tls_server: RunningServer) -> None:
    async with connect(tls_server.target, call_timeout=2) as client:
        with pytest.raises(LedgerCallError) as failed:
            await client.get("documents/t1")
    assert failed.value.code == grpc.StatusCode.UNAVAILABLE


async def test_a_client_trusting_another_ca_fails(tls_server: RunningServer,
                                                  tls_files: TLSFiles) -> None:
    async with connect(tls_server.target, tls_ca=tls_files.other_ca.read_bytes(),
                       call_timeout=2) as client:
        with pytest.raises(LedgerCallError) as failed:
            await client.list("documents")
    assert failed.value.code == grpc.StatusCode.UNAVAILABLE


async def test_a_tls_client_of_a_plaintext_server_fails(server: RunningServer,
                                                        tls_files: TLSFiles) -> None:
    async with connect(server.target, tls_ca=tls_files.ca.read_bytes(),
                       call_timeout=2) as client:
        with pytest.raises(LedgerCallError) as failed:
            await client.list("documents")
    assert failed.value.code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(("cert", "key", "message"), [
    ("missing.pem", "key", "cannot read --tls-cert"),
    ("cert", "missing.pem", "cannot read --tls-key"),
    ("cert", "ca", "not a PEM certificate and its private key"),
    ("ca", "key", "not a PEM certificate and its private key"),
])
async def test_unusable_tls_files_do_not_start(settings: Settings, tls_files: TLSFiles,
                                               tmp_path: Path, cert: str, key: str,
                                               message: str) -> None:
    files = {"cert": str(tls_files.cert), "key": str(tls_files.key), "ca": str(tls_files.ca)}
    with pytest.raises(OSError, match=message):
        async with serve(settings.replace(tls_cert=files.get(cert, str(tmp_path / cert)),
                                          tls_key=files.get(key, str(tmp_path / key)))):
            pass


# --- the bridge reaches the service over TLS ---------------------------------------------------


@pytest.mark.parametrize(("trust", "name", "status"), [
    ("ca", "", 200),
    ("cert", "", 200),
    ("ca", "localhost", 200),
    ("none", "", 503),
    ("other_ca", "", 503),
    ("ca", "ledger.example", 503),
])
async def test_the_bridge_reaches_the_service_over_tls(
        tls_server: RunningServer, tls_files: TLSFiles, make_bridge: BridgeFactory,
        problem: ProblemCheck, trust: str, name: str, status: int) -> None:
    ca = "" if trust == "none" else str(getattr(tls_files, trust))
    settings = BridgeSettings(target=tls_server.target, target_tls_ca=ca, target_tls_name=name,
                              call_timeout_s=2)
    async with make_bridge(settings) as http:
        response = await http.put("/v1/documents/b1", content=b"{}",
                                  headers={"If-None-Match": "*"})
        assert response.status_code == (201 if status == 200 else status), response.text
        ready = await http.get("/readyz")
        assert ready.status_code == status
        if status != 200:
            problem(response, 503, "UNAVAILABLE")


def test_a_target_name_needs_a_ca() -> None:
    with pytest.raises(ValueError, match="--target-tls-name needs --target-tls-ca"):
        BridgeSettings(target_tls_name="localhost")
    with pytest.raises(ValueError, match="--http-tls-cert and --http-tls-key go together"):
        BridgeSettings(http_tls_cert="cert.pem")


# --- the bridge serves HTTPS -------------------------------------------------------------------


class _Uvicorn(uvicorn.Server):
    """uvicorn without its signal handlers: the test process keeps its own."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@asynccontextmanager
async def serve_bridge_https(settings: BridgeSettings) -> AsyncIterator[int]:
    """The bridge as `casledger bridge` configures it (`bridge_config`), on a free port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = _Uvicorn(bridge_config(settings))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(10):
            while not server.started:
                if task.done():
                    task.result()
                    raise RuntimeError("uvicorn stopped before it started")
                await asyncio.sleep(0.01)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        await task
        sock.close()


async def test_the_bridge_serves_https_and_reaches_the_service_over_tls(
        tls_server: RunningServer, tls_files: TLSFiles) -> None:
    settings = BridgeSettings(target=tls_server.target, http_tls_cert=str(tls_files.cert),
                              http_tls_key=str(tls_files.key), target_tls_ca=str(tls_files.ca))
    async with serve_bridge_https(settings) as port:
        trusted = ssl.create_default_context(cafile=str(tls_files.ca))
        async with httpx.AsyncClient(base_url=f"https://localhost:{port}", verify=trusted,
                                     timeout=5) as https:
            created = await https.put("/v1/documents/h1", content=b'{"n":1}',
                                      headers={"If-None-Match": "*"})
            assert created.status_code == 201, created.text
            read = await https.get("/v1/documents/h1")
            assert read.headers["etag"] == created.headers["etag"]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as plain:
            with pytest.raises(httpx.HTTPError):
                await plain.get("/healthz")
        untrusted = ssl.create_default_context(cafile=str(tls_files.other_ca))
        async with httpx.AsyncClient(base_url=f"https://localhost:{port}", verify=untrusted,
                                     timeout=5) as wrong:
            with pytest.raises(httpx.ConnectError):
                await wrong.get("/healthz")


def test_unusable_https_files_are_refused(tls_files: TLSFiles) -> None:
    with pytest.raises(OSError, match=r"--http-tls-cert .* cannot use them"):
        bridge_config(BridgeSettings(http_tls_cert=str(tls_files.cert),
                                     http_tls_key=str(tls_files.ca)))
