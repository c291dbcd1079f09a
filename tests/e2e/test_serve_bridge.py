"""`casledger serve` with its HTTP bridge, as a user runs it: curl and httpx over loopback.

The service and the bridge are two processes started by one command; they answer together
(428, then 412, then success, exactly as the README shows) and stop together.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.processes import CASLEDGER, free_port, wait_http_ready

pytestmark = pytest.mark.e2e

CURL = shutil.which("curl")
WAIT_TURNS = 300  # x 0.1 s: a bound on waiting, not a timing assertion


def children_of(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "State:\tZ" in status.read_text())


class Served:
    def __init__(self, proc: subprocess.Popen[bytes], http_port: int, grpc_port: int,
                 stderr: Path) -> None:
        self.proc, self.http_port, self.grpc_port, self.stderr = proc, http_port, grpc_port, stderr

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    assert CASLEDGER, "the casledger console script is not installed next to this Python"
    http_port, grpc_port = free_port(), free_port()
    stderr = tmp_path / "stderr.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASLEDGER_")}
    with stderr.open("wb") as err:
        proc = subprocess.Popen(
            [CASLEDGER, "serve", "--db", f"sqlite:///{tmp_path / 'ledger.db'}",
             "--grpc-listen", f"127.0.0.1:{grpc_port}", "--http-listen",
             f"127.0.0.1:{http_port}", "--shutdown-grace-s", "2"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env)
    served = Served(proc, http_port, grpc_port, stderr)
    try:
        wait_http_ready(proc, served.base, stderr)
        yield served
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def curl(*args: str) -> tuple[int, dict[str, str], bytes]:
    """Run curl; return the status, the (lower-cased) headers and the body."""
    assert CURL, "curl is needed for this test"
    out = subprocess.run([CURL, "-s", "-i", "--max-time", "10", *args], capture_output=True,
                         check=True).stdout
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return status, headers, body


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_curl_session_428_then_412_then_success(served: Served) -> None:
    url = f"{served.base}/v1/documents/d1"
    json_type = "Content-Type: application/json"

    status, headers, body = curl("-X", "PUT", url, "-H", "If-None-Match: *", "-H", json_type,
                                 "-d", '{"title":"draft"}')
    assert status == 201, body
    assert headers["location"] == "/v1/documents/d1"
    first = headers["etag"]

    status, headers, body = curl("-X", "PUT", url, "-H", json_type, "-d", '{"title":"mine"}')
    assert status == 428
    assert headers["content-type"] == "application/problem+json"
    assert headers["etag"] == first
    assert headers["cache-control"] == "no-store"
    problem = json.loads(body)
    assert problem["required_header"] == "If-Match"
    assert problem["current_etag"] == first
    assert "If-Match" in problem["detail"]

    status, headers, _ = curl("-X", "PUT", url, "-H", f"If-Match: {first}", "-H", json_type,
                              "-d", '{"title":"theirs"}')
    assert status == 200
    second = headers["etag"]

    status, headers, body = curl("-X", "PUT", url, "-H", f"If-Match: {first}", "-H", json_type,
                                 "-d", '{"title":"mine"}')
    assert status == 412
    assert headers["etag"] == second
    assert json.loads(body)["current_version"] == 2

    status, headers, body = curl("-X", "PUT", url, "-H", f"If-Match: {second}", "-H", json_type,
                                 "-H", "Casledger-Reason: merge my edit", "-d",
                                 '{"title":"theirs+mine"}')
    assert status == 200
    assert body == b'{"title":"theirs+mine"}'

    status, _, body = curl(f"{url}:history")
    versions = json.loads(body)["versions"]
    assert [v["version"] for v in versions] == [1, 2, 3]
    assert versions[-1]["reason"] == "merge my edit"


def test_sigterm_stops_the_service_and_the_bridge_together(served: Served) -> None:
    bridges = children_of(served.proc.pid)
    assert len(bridges) == 1, "the bridge runs in a process of its own"
    response = httpx.put(f"{served.base}/v1/notes/n1", content=b"{}",
                         headers={"If-None-Match": "*", "Content-Type": "application/json"})
    assert response.status_code == 201

    served.proc.send_signal(signal.SIGTERM)

    assert served.proc.wait(timeout=30) == 0, served.stderr.read_text()
    for _ in range(WAIT_TURNS):
        if not alive(bridges[0]):
            break
        time.sleep(0.1)
    else:
        pytest.fail("the bridge outlived the service")


def test_a_dead_bridge_stops_the_service(served: Served) -> None:
    [bridge] = children_of(served.proc.pid)

    os.kill(bridge, signal.SIGKILL)

    assert served.proc.wait(timeout=30) == 3
    assert "bridge exited" in served.stderr.read_text()


def test_the_bridge_goes_when_the_service_is_killed(served: Served) -> None:
    [bridge] = children_of(served.proc.pid)

    served.proc.kill()
    served.proc.wait()

    for _ in range(WAIT_TURNS):
        if not alive(bridge):
            return
        time.sleep(0.1)
    pytest.fail("the bridge lingered as an orphan after its service was killed")
