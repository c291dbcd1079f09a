"""`make bench` kept working: each benchmark run for a moment, as `python -m bench` runs it.

The figures of such short runs mean nothing and nothing is asserted about them (timing belongs to
`make bench`, not to tests). What is checked is that each benchmark runs end to end against the
real `casledger serve` (and, for `bench http`, the real etcd and wrk), exits 0, writes its JSON
results, and that every request it made succeeded — so a change that breaks a benchmark, or a
benchmark that stops measuring what it says, fails here rather than on the day figures are taken.

`bench http` needs etcd and wrk (Debian packages etcd-server and wrk); without them it is skipped,
since a test does not install system packages.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]


def bench(tmp_path: Path, *args: str) -> dict[str, Any]:
    """Run `python -m bench ARGS` with its results in `tmp_path`; the one JSON file it wrote."""
    results = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASLEDGER_")}
    env["CASLEDGER_BENCH_RESULTS"] = str(results)
    done = subprocess.run([sys.executable, "-m", "bench", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    written = list(results.glob("*.json")) if results.exists() else []
    if not written:  # verify takes --output
        written = list(tmp_path.glob("*.json"))
    assert len(written) == 1, (written, done.stdout[-2000:])
    document: dict[str, Any] = json.loads(written[0].read_text())
    return document


def test_bench_grpc(tmp_path: Path) -> None:
    result = bench(tmp_path, "grpc", "--rounds", "1", "--duration", "1", "--warmup", "0.3",
                   "--concurrency", "4")

    rows = {row["target"]: row for row in result["summary"]}
    assert set(rows) == {"echo", "casledger"}
    for row in rows.values():
        assert row["calls/s"] > 0
        assert row["errors"] == 0
    assert result["ratio"] > 0


def test_bench_scale(tmp_path: Path) -> None:
    result = bench(tmp_path, "scale", "--sizes", "1e3", "--duration", "0.5",
                   "--concurrency", "2")

    [size] = result["results"]
    assert size["versions"] == 1000
    for phase in ("read", "write"):
        assert size[phase]["calls"] > 0
        assert size[phase]["errors"]["counts"] == {}


def test_bench_verify(tmp_path: Path) -> None:
    result = bench(tmp_path, "verify", "--versions", "2000", "--no-sweep", "--repeat", "1",
                   "--jobs", "2", "--dir", str(tmp_path), "--output",
                   str(tmp_path / "verify.json"))

    [growth] = result["growth"]
    assert growth["versions"] == 2000
    for run in (growth["single"], growth["parallel"]):
        assert run["verify_s"] > 0
        assert run["ratio_stream"] > 0
    assert growth["parallel"]["jobs"] == 2


@pytest.mark.skipif(not (shutil.which("etcd") and shutil.which("wrk")),
                    reason="bench http needs etcd and wrk: apt-get install -y etcd-server wrk")
def test_bench_http(tmp_path: Path) -> None:
    result = bench(tmp_path, "http", "--scenario", "cas", "--rounds", "1", "--duration", "1",
                   "--warmup", "0", "--dir", str(tmp_path))

    runs = result["runs"]
    assert {run["system"] for run in runs} == {"etcd", "casledger"}
    for run in runs:
        assert run["ok"] > 0, run
        assert run["errors"] == 0, run
        # The scripts' count of successful CAS agrees with what each system holds.
        assert run["ok"] <= run["committed"] <= run["ok"] + run["threads"], run
