"""`casledger serve` runs two processes; each exposes its own metrics (the service on
--metrics-listen, the bridge at GET /metrics) and writes JSON lines to stderr when it is not a
terminal, and a request id sent to the bridge shows up in both processes' access lines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.processes import CASLEDGER, free_port, wait_http_ready

pytestmark = pytest.mark.e2e



class Served:
    def __init__(self, proc: subprocess.Popen[bytes], stderr: Path, http_port: int,
                 metrics_port: int) -> None:
        self.proc, self.stderr = proc, stderr
        self.base = f"http://127.0.0.1:{http_port}"
        self.metrics = f"http://127.0.0.1:{metrics_port}/metrics"

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stderr.read_text().splitlines()]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    assert CASLEDGER, "the casledger console script is not installed next to this Python"
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    stderr = tmp_path / "stderr.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASLEDGER_")}
    env["CASLEDGER_MAX_IN_FLIGHT"] = "32"  # a variable reaches both processes
    with stderr.open("wb") as err:
        proc = subprocess.Popen(
            [CASLEDGER, "serve", "--db", f"sqlite:///{tmp_path / 'ledger.db'}",
             "--grpc-listen", f"127.0.0.1:{grpc_port}", "--http-listen",
             f"127.0.0.1:{http_port}", "--metrics-listen", f"127.0.0.1:{metrics_port}",
             "--shutdown-grace-s", "2"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env)
    served = Served(proc, stderr, http_port, metrics_port)
    try:
        wait_http_ready(proc, served.base, stderr)
        yield served
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_each_process_has_its_metrics_and_both_log_the_request_id(served: Served) -> None:
    created = httpx.put(f"{served.base}/v1/documents/a", content=b"{}", headers={
        "If-None-Match": "*", "Content-Type": "application/json", "X-Request-Id": "e2e-1"})
    refused = httpx.put(f"{served.base}/v1/documents/a", content=b"{}", headers={
        "Content-Type": "application/json", "X-Request-Id": "e2e-2"})
    bridge_metrics = httpx.get(f"{served.base}/metrics").text
    service_metrics = httpx.get(served.metrics).text
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(timeout=30) == 0

    assert created.status_code == 201
    assert created.headers["x-request-id"] == "e2e-1"
    assert refused.status_code == 428
    assert ('casledger_http_requests_total{method="PUT",route="/v1/{name}",status="428"} 1.0'
            in bridge_metrics)
    assert "casledger_grpc_requests_total" not in bridge_metrics
    assert ('casledger_cas_conflicts_total{reason="PRECONDITION_REQUIRED"} 1.0'
            in service_metrics)
    assert "casledger_http_requests_total" not in service_metrics

    lines = served.lines()  # every line of both processes is a JSON object
    for request_id, status, code in (("e2e-1", 201, "OK"), ("e2e-2", 428,
                                                            "FAILED_PRECONDITION")):
        mine = [line for line in lines if line.get("request_id") == request_id]
        assert {line["logger"] for line in mine} == {"casledger.access.http",
                                                      "casledger.access.grpc"}, mine
        assert [line["status"] for line in mine if "status" in line] == [status]
        assert code in [line["code"] for line in mine if "code" in line]
