"""`casledger serve` and `casledger token create` as an operator runs them: an open ledger only
on loopback unless --insecure, tokens from a file, TLS on both listeners with the bridge child
reaching the service over TLS, and the CLI sending --token over --tls-ca."""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from casledger.service.api.casledger.v1 import ledger_pb2 as pb
from casledger.service.api.casledger.v1 import ledger_pb2_grpc as pb_grpc
from tests.support.processes import CASLEDGER, clean_env, free_port

if TYPE_CHECKING:
    from tests.conftest import TLSFiles

pytestmark = pytest.mark.e2e

WAIT_TURNS = 300  # x 0.1 s: a bound on waiting, not a timing assertion
EXIT_WAIT_S = 30


@pytest.fixture
def casledger() -> str:
    if CASLEDGER is None:
        pytest.fail(f"no casledger console script next to {sys.executable}: pip install -e .")
    return CASLEDGER


class Served:
    def __init__(self, proc: subprocess.Popen[bytes], stderr: Path) -> None:
        self.proc, self.stderr_path = proc, stderr

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait(self) -> int:
        try:
            return self.proc.wait(timeout=EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"casledger did not exit; stderr:\n{self.stderr()}")


Start = Callable[..., Served]


@pytest.fixture
def start(tmp_path: Path, casledger: str) -> Iterator[Start]:
    """`start(*args, env=...)`: `casledger serve ARGS` in tmp_path; reaped at the end."""
    started: list[Served] = []

    def run(*args: str, env: dict[str, str] | None = None) -> Served:
        stderr_path = tmp_path / f"stderr-{len(started)}.txt"
        with stderr_path.open("wb") as stderr:
            proc = subprocess.Popen([casledger, "serve", "--db", f"sqlite:///{tmp_path}/l.db",
                                     *args], stdin=subprocess.DEVNULL, stdout=stderr,
                                    stderr=stderr, cwd=tmp_path, env=env or clean_env())
        served = Served(proc, stderr_path)
        started.append(served)
        return served

    yield run
    for served in started:
        if served.proc.poll() is None:
            served.proc.kill()
        served.proc.wait()


def channel(port: int, ca: Path | None = None) -> grpc.aio.Channel:
    if ca is None:
        return grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return grpc.aio.secure_channel(f"127.0.0.1:{port}",
                                   grpc.ssl_channel_credentials(ca.read_bytes()))


async def wait_serving(served: Served, port: int, ca: Path | None = None) -> None:
    async with channel(port, ca) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for _ in range(WAIT_TURNS):
            if served.proc.poll() is not None:
                pytest.fail(f"casledger exited with {served.proc.returncode}:\n"
                            f"{served.stderr()}")
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    pytest.fail(f"casledger never became SERVING:\n{served.stderr()}")


async def stop(served: Served) -> None:
    served.proc.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(served.wait)
    assert code == 0, served.stderr()
    assert "Traceback" not in served.stderr()


def reason_of(error: grpc.aio.AioRpcError) -> str:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info.reason
    raise AssertionError(f"no ErrorInfo in {error!r}")


def create_token(casledger: str, file: Path, *args: str) -> str:
    done = subprocess.run([casledger, "token", "create", "--file", str(file), *args],
                          capture_output=True, text=True, env=clean_env(), timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert token.startswith("cl_")
    assert done.stdout == token + "\n"  # the token alone on stdout, for $(...)
    assert "shown only this once" in done.stderr
    return token


# --- an open ledger only on loopback -----------------------------------------------------------


@pytest.mark.parametrize("args", [
    ("--grpc-listen", "0.0.0.0:{port}", "--no-http"),
    ("--grpc-listen", "127.0.0.1:{port}", "--http-listen", "0.0.0.0:{port2}"),
], ids=["grpc", "http"])
async def test_without_tokens_a_public_address_refuses_to_start(start: Start,
                                                                args: tuple[str, ...]) -> None:
    served = start(*(a.format(port=free_port(), port2=free_port()) for a in args))
    code = await asyncio.to_thread(served.wait)
    assert code == 2, served.stderr()
    stderr = served.stderr()
    assert "refusing to serve without access control" in stderr
    assert "0.0.0.0" in stderr
    assert "--insecure" in stderr
    assert "--auth-tokens-file" in stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("how", ["flag", "env"])
async def test_insecure_serves_an_open_ledger_anyway(start: Start, how: str) -> None:
    port = free_port()
    args = ["--grpc-listen", f"0.0.0.0:{port}", "--no-http"]
    if how == "flag":
        served = start(*args, "--insecure")
    else:
        served = start(*args, env=clean_env(CASLEDGER_INSECURE="1"))
    await wait_serving(served, port)
    async with channel(port) as ch:
        created = await pb_grpc.LedgerStub(ch).CreateResource(pb.CreateResourceRequest(
            parent="documents", resource_id="d1", content=b"{}",
            content_type="application/json"), timeout=10)
    assert created.actor == "anonymous"
    await stop(served)


# --- tokens ------------------------------------------------------------------------------------


async def test_with_a_tokens_file_it_starts_and_checks_tokens(
        start: Start, casledger: str, tmp_path: Path) -> None:
    file = tmp_path / "tokens.toml"
    writer = create_token(casledger, file, "--principal", "ci-bot", "--scope", "read",
                          "--scope", "write", "--prefix", "documents")
    reader = create_token(casledger, file, "--principal", "auditor", "--scope", "read")
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    assert writer not in file.read_text()
    assert reader not in file.read_text()
    port = free_port()
    served = start("--grpc-listen", f"0.0.0.0:{port}", "--no-http",
                   env=clean_env(CASLEDGER_AUTH_TOKENS_FILE=str(file)))
    await wait_serving(served, port)  # health stays open
    request = pb.CreateResourceRequest(parent="documents", resource_id="d1", content=b"{}",
                                       content_type="application/json")
    async with channel(port) as ch:
        stub = pb_grpc.LedgerStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as anonymous:
            await stub.CreateResource(request, timeout=10)
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert reason_of(anonymous.value) == "UNAUTHENTICATED"
        with pytest.raises(grpc.aio.AioRpcError) as read_only:
            await stub.CreateResource(request, timeout=10,
                                      metadata=(("authorization", f"Bearer {reader}"),))
        assert read_only.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert reason_of(read_only.value) == "PERMISSION_DENIED"
        created = await stub.CreateResource(request, timeout=10,
                                            metadata=(("authorization", f"Bearer {writer}"),))
        assert created.actor == "ci-bot"

        # The operator lists the tokens and revokes the writer's: the running service stops
        # accepting it once it reads the file again (within a second), without a restart.
        listed = token_cli(casledger, "list", "--file", str(file), "--json")
        ids = {entry["principal"]: entry["id"] for entry in json.loads(listed)}
        assert set(ids) == {"ci-bot", "auditor"}
        assert writer not in listed
        assert reader not in listed
        token_cli(casledger, "revoke", ids["ci-bot"], "--file", str(file))
        assert stat.S_IMODE(file.stat().st_mode) == 0o600
        get = pb.GetResourceRequest(name="documents/d1")
        for _ in range(100):
            try:
                await stub.GetResource(get, timeout=10,
                                       metadata=(("authorization", f"Bearer {writer}"),))
            except grpc.aio.AioRpcError as error:
                revoked = error
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the revoked token still works after 10 s")
        assert revoked.code() == grpc.StatusCode.UNAUTHENTICATED
        still = await stub.GetResource(get, timeout=10,
                                       metadata=(("authorization", f"Bearer {reader}"),))
        assert still.actor == "ci-bot"
    await stop(served)


def token_cli(casledger: str, *args: str) -> str:
    done = subprocess.run([casledger, "token", *args], capture_output=True, text=True,
                          env=clean_env(), timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_a_missing_tokens_file_does_not_start(start: Start, tmp_path: Path) -> None:
    served = start("--no-http", "--grpc-listen", f"127.0.0.1:{free_port()}",
                   "--auth-tokens-file", str(tmp_path / "absent.toml"))
    code = await asyncio.to_thread(served.wait)
    assert code != 0
    assert "cannot read the tokens file" in served.stderr()
    assert "Traceback" not in served.stderr()


def test_token_create_refuses_a_bad_scope_and_needs_a_file(casledger: str,
                                                           tmp_path: Path) -> None:
    bad = subprocess.run([casledger, "token", "create", "--principal", "x", "--scope", "root",
                          "--file", str(tmp_path / "t.toml")], capture_output=True, text=True,
                         env=clean_env(), timeout=60, check=False)
    assert bad.returncode == 2
    assert "invalid choice: 'root'" in bad.stderr
    no_file = subprocess.run([casledger, "token", "create", "--principal", "x", "--scope",
                              "read"], capture_output=True, text=True, env=clean_env(),
                             timeout=60, check=False)
    assert no_file.returncode == 2
    assert "--file" in no_file.stderr
    assert not (tmp_path / "t.toml").exists()


# --- TLS on both listeners, the bridge child over TLS, the CLI -----------------------------------


async def test_tls_everywhere_with_tokens(start: Start, casledger: str, tmp_path: Path,
                                          tls_files: TLSFiles) -> None:
    file = tmp_path / "tokens.toml"
    token = create_token(casledger, file, "--principal", "alice", "--scope", "admin")
    grpc_port, http_port = free_port(), free_port()
    served = start(
        "--grpc-listen", f"127.0.0.1:{grpc_port}", "--http-listen", f"127.0.0.1:{http_port}",
        "--auth-tokens-file", str(file), "--tls-cert", str(tls_files.cert), "--tls-key",
        str(tls_files.key), "--http-tls-cert", str(tls_files.cert), "--http-tls-key",
        str(tls_files.key))
    await wait_serving(served, grpc_port, tls_files.ca)
    trusted = ssl.create_default_context(cafile=str(tls_files.ca))
    async with httpx.AsyncClient(base_url=f"https://localhost:{http_port}", verify=trusted,
                                 timeout=5) as https:
        for _ in range(WAIT_TURNS):
            try:
                if (await https.get("/readyz")).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
        else:
            pytest.fail(f"the bridge never became ready:\n{served.stderr()}")
        anonymous = await https.put("/v1/documents/d1", content=b'{"n":1}',
                                    headers={"If-None-Match": "*"})
        assert anonymous.status_code == 401
        assert anonymous.headers["www-authenticate"] == 'Bearer realm="casledger"'
        created = await https.put("/v1/documents/d1", content=b'{"n":1}', headers={
            "If-None-Match": "*", "Authorization": f"Bearer {token}"})
        assert created.status_code == 201, created.text

    def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([casledger, *args, "--target", f"127.0.0.1:{grpc_port}"],
                              capture_output=True, text=True, env=clean_env(**env),
                              timeout=60, check=False)

    got = await asyncio.to_thread(cli, "get", "documents/d1", "--json", "--tls-ca",
                                  str(tls_files.ca), CASLEDGER_TOKEN=token)
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["actor"] == "alice"
    plaintext = await asyncio.to_thread(cli, "get", "documents/d1", CASLEDGER_TOKEN=token)
    assert plaintext.returncode == 3
    assert "cannot reach the service" in plaintext.stderr
    no_token = await asyncio.to_thread(cli, "get", "documents/d1",
                                       CASLEDGER_TLS_CA=str(tls_files.ca))
    assert no_token.returncode == 3
    assert "requires a bearer token" in no_token.stderr
    await stop(served)
