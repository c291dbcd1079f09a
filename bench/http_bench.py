"""casledger against etcd over HTTP on loopback, driven by the same load generator (wrk + Lua).

Starts etcd (a throwaway data directory, a free loopback port) and ``casledger serve`` (a fresh
SQLite ledger, durability ``full``, the HTTP bridge), then runs three scenarios with wrk, one
connection per thread (``-t N -c N``), alternating etcd and casledger run by run for
``--rounds`` rounds, and reports the medians:

1. **CAS writes**: each thread compare-and-swaps a key of its own, tracking its version --
   casledger ``PUT /v1/bench/k<thread>`` with ``If-Match: <the ETag of its last response>``;
   etcd ``POST /v3/kv/txn`` comparing the key's MOD revision with the tracked one and putting
   on success (the reply's ``header.revision`` is the new one). Every CAS should succeed.
2. **Reads of one hot key**: ``GET /v1/bench/hot`` against ``POST /v3/kv/range`` (linearizable,
   etcd's default).
3. **Contended-key goodput**: 16 threads CAS one key. casledger answers a stale write 412 with
   the current ETag, and the script retries with it; the etcd txn reads the key in its failure
   branch, so a refused txn names the current mod_revision. Successful CAS per second.

Only what the scenario measures counts as throughput ("ok/s": a successful CAS -- 2xx from
casledger, ``"succeeded": true`` from etcd -- or a read that returned the key); the scripts
count refused CAS ("conflicts") and anything else ("errors": status, first body) apart, and wrk
its socket errors and timeouts. Latencies are wrk's, over every request of the run (retries
and the one learning read per thread included). Each run also records the CPU time the servers
used (service + bridge for casledger), so "CPU ms/op" compares the cost of an operation even
when other work on the machine bends the wall-clock figures.

    python -m bench http                      # 3 rounds x 3 scenarios x 2 systems, 10 s each
    python -m bench http --quick --rounds 1   # a smoke run: 2 s each
    python -m bench http --scenario cas --threads 4 --duration 5
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    casledger_serve,
    console,
    cpu_seconds,
    free_port,
    median,
    print_table,
    rss_kib,
    sqlite_url,
    write_results,
)

WRK_DIR = Path(__file__).parent / "wrk"
SYSTEMS = ("etcd", "casledger")
ISSUE_BASELINE = {"cas": 2500.0, "read": 7900.0}  # etcd under wrk, as issue 6 quotes it
READY_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    threads: int
    scripts: dict[str, str]  # system -> Lua script in bench/wrk
    args: tuple[str, ...] = ()


@dataclass
class Run:
    """One wrk run against one system."""

    system: str
    scenario: str
    round: int
    threads: int
    seconds: float
    ok: int
    ok_per_s: float
    requests_per_s: float
    conflicts: int
    learns: int
    errors: int
    statuses: dict[str, int]
    sample: str | None
    socket_errors: dict[str, int]
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    server_cpu_s: float
    cpu_ms_per_op: float | None
    # Versions the written keys gained during the run, read from the system before and after:
    # at least `ok`, and at most `ok` + threads (writes in flight when wrk stopped). None for
    # reads.
    committed: int | None = None
    rss_kib: dict[str, int] = field(default_factory=dict)

    @property
    def miscounted(self) -> bool:
        """The scripts' count of successful CAS disagrees with what the system holds."""
        return self.committed is not None and not (
            self.ok <= self.committed <= self.ok + self.threads)

    @property
    def trouble(self) -> int:
        """Errors of any kind: unexpected answers, socket errors and timeouts (not the HTTP
        status count, which includes the 412s that contention is made of)."""
        s = self.socket_errors
        return (self.errors + s["connect"] + s["read"] + s["write"] + s["timeout"]
                + int(self.miscounted))


@dataclass
class Target:
    """A system under test: where wrk sends its requests and which processes serve them."""

    system: str
    url: str
    pids: dict[str, int]  # role -> pid


def ensure_tool(binary: str, package: str) -> str:
    """The path of `binary`; when it is missing, `apt-get install -y package` (as root), and
    say so."""
    found = shutil.which(binary)
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        raise SystemExit(f"{binary} is not installed: apt-get install -y {package}")
    print(f"{binary} is missing: installing it with apt-get install -y {package}",
          file=sys.stderr)
    if subprocess.run([apt, "install", "-y", package]).returncode != 0:
        subprocess.run([apt, "update"], check=True)
        subprocess.run([apt, "install", "-y", package], check=True)
    found = shutil.which(binary)
    if found is None:
        raise SystemExit(f"apt-get install -y {package} did not provide {binary}")
    return found


def _get(url: str, timeout: float = 1.0) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            body: bytes = reply.read()
            return body
    except (urllib.error.URLError, OSError):
        return None


def _post_json(url: str, document: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(document).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        answer: dict[str, Any] = json.loads(reply.read())
        return answer


@contextmanager
def etcd_serve(etcd: str, directory: Path) -> Iterator[Target]:
    """A single-member etcd on loopback with its data in `directory`, until the block ends."""
    client, peer = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    command = [etcd, "--name", "bench", "--data-dir", str(directory / "etcd"),
               "--listen-client-urls", client, "--advertise-client-urls", client,
               "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
               "--initial-cluster", f"bench={peer}", "--initial-cluster-state", "new",
               "--logger", "zap", "--log-level", "warn"]
    with open(directory / "etcd.log", "wb") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while (_get(f"{client}/health") or b"").find(b'"health":"true"') < 0:
                if process.poll() is not None or time.monotonic() > deadline:
                    tail = (directory / "etcd.log").read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"etcd did not start (exit {process.poll()}):\n{tail}")
                time.sleep(0.1)
            yield Target("etcd", client, {"etcd": process.pid})
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def etcd_version(etcd: str) -> str:
    out = subprocess.run([etcd, "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0].split(":", 1)[-1].strip() if out else "?"


def hot_value(size: int) -> bytes:
    """The hot key's value, the same bytes in both systems (like the CAS scripts' values)."""
    head = b'{"t":-1,"n":0,"pad":"'
    return head + b"x" * max(size - len(head) - 2, 0) + b'"}'


def seed_hot_key(targets: dict[str, Target], size: int) -> None:
    """Write bench/hot in both systems, so that the read scenario finds it."""
    value = hot_value(size)
    etcd = targets["etcd"].url
    _post_json(f"{etcd}/v3/kv/put", {"key": base64.b64encode(b"bench/hot").decode(),
                                      "value": base64.b64encode(value).decode()})
    request = urllib.request.Request(f"{targets['casledger'].url}/v1/bench/hot", data=value,
                                     method="PUT", headers={"If-None-Match": "*",
                                                            "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10):
            pass
    except urllib.error.HTTPError as error:  # 412: it exists already
        if error.code != 412:
            raise


def written_keys(scenario: Scenario) -> list[str]:
    """The keys a scenario's scripts write (none for reads)."""
    if "own" in scenario.args:
        return [f"bench/k{i}" for i in range(scenario.threads)]
    if "shared" in scenario.args:
        return ["bench/contended"]
    return []


def versions(target: Target, keys: list[str]) -> int:
    """The sum of the keys' version numbers (0 for an absent key), as the system tells them."""
    total = 0
    for key in keys:
        if target.system == "etcd":
            reply = _post_json(f"{target.url}/v3/kv/range",
                               {"key": base64.b64encode(key.encode()).decode()})
            total += sum(int(kv.get("version", 0)) for kv in reply.get("kvs", []))
            continue
        try:
            with urllib.request.urlopen(f"{target.url}/v1/{key}", timeout=10) as answer:
                etag = answer.headers["ETag"]
        except urllib.error.HTTPError as error:
            if error.code != 404:
                raise
            continue
        total += int(etag.strip('"').split("-", 1)[0])
    return total


def run_wrk(wrk: str, target: Target, scenario: Scenario, seconds: int, value_bytes: int,
            round_: int) -> Run:
    """One wrk run of `scenario` against `target`, its WRK_RESULT line parsed."""
    script = WRK_DIR / scenario.scripts[target.system]
    command = [wrk, "-t", str(scenario.threads), "-c", str(scenario.threads), "-d",
               f"{seconds}s", "--timeout", "10s", "--latency", "-s", str(script), target.url,
               "--", *scenario.args, str(value_bytes)]
    keys = written_keys(scenario)
    versions_before = versions(target, keys) if keys else 0
    cpu_before = {role: cpu_seconds(pid) for role, pid in target.pids.items()}
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    server_cpu = sum(cpu_seconds(pid) - cpu_before[role] for role, pid in target.pids.items())
    line = next((line for line in done.stdout.splitlines() if line.startswith("WRK_RESULT ")),
                None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed (exit {done.returncode}): {' '.join(command)}\n"
                           f"{done.stdout}\n{done.stderr}")
    result = json.loads(line.removeprefix("WRK_RESULT "))
    committed = versions(target, keys) - versions_before if keys else None
    duration = result["duration_us"] / 1e6
    latency = result["latency_us"]
    return Run(
        system=target.system, scenario=scenario.name, round=round_, threads=result["threads"],
        seconds=round(duration, 3), ok=result["ok"], ok_per_s=round(result["ok"] / duration, 1),
        requests_per_s=round(result["requests"] / duration, 1), conflicts=result["conflicts"],
        learns=result["learns"], errors=result["errors"], statuses=result["statuses"],
        sample=result["sample"], socket_errors=result["socket_errors"],
        p50_ms=latency["p50"] / 1000, p90_ms=latency["p90"] / 1000,
        p99_ms=latency["p99"] / 1000, max_ms=latency["max"] / 1000,
        server_cpu_s=round(server_cpu, 3),
        cpu_ms_per_op=round(server_cpu * 1000 / result["ok"], 4) if result["ok"] else None,
        committed=committed,
        rss_kib={role: rss_kib(pid) for role, pid in target.pids.items()})


def scenarios(threads: int, contended_threads: int) -> list[Scenario]:
    return [
        Scenario("cas", f"CAS writes, a key per thread ({threads} threads)", threads,
                 {"etcd": "etcd_cas.lua", "casledger": "casledger_cas.lua"}, ("own",)),
        Scenario("read", f"reads of one hot key ({threads} threads)", threads,
                 {"etcd": "etcd_read.lua", "casledger": "casledger_read.lua"}),
        Scenario("contended", f"contended-key CAS goodput ({contended_threads} threads)",
                 contended_threads,
                 {"etcd": "etcd_cas.lua", "casledger": "casledger_cas.lua"}, ("shared",)),
    ]


def summarize(scenario: Scenario, runs: list[Run]) -> dict[str, Any]:
    """Medians per system and the casledger/etcd ratios for one scenario."""
    out: dict[str, Any] = {"scenario": scenario.name, "title": scenario.title,
                           "threads": scenario.threads}
    for system in SYSTEMS:
        mine = [r for r in runs if r.system == system]
        costs = [r.cpu_ms_per_op for r in mine if r.cpu_ms_per_op is not None]
        out[system] = {
            "ok_per_s": round(median(r.ok_per_s for r in mine), 1),
            "requests_per_s": round(median(r.requests_per_s for r in mine), 1),
            "p50_ms": round(median(r.p50_ms for r in mine), 3),
            "p99_ms": round(median(r.p99_ms for r in mine), 3),
            "cpu_ms_per_op": round(median(costs), 4) if costs else None,
            "conflicts": sum(r.conflicts for r in mine),
            "errors": sum(r.trouble for r in mine),
            "statuses": _merge([r.statuses for r in mine]),
            "runs_ok_per_s": [r.ok_per_s for r in mine],
        }
    e, c = out["etcd"], out["casledger"]
    out["ratio"] = {key: (round(c[key] / e[key], 3) if e[key] and c[key] is not None else None)
                    for key in ("ok_per_s", "requests_per_s", "p50_ms", "p99_ms",
                                "cpu_ms_per_op")}
    return out


def _merge(tables: list[dict[str, int]]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for table in tables:
        for key, count in table.items():
            merged[key] = merged.get(key, 0) + count
    return merged


def show(summaries: list[dict[str, Any]], runs: list[Run], rounds: int, seconds: int) -> None:
    out = console()
    rows: list[dict[str, Any]] = []
    for s in summaries:
        for system in (*SYSTEMS, "ratio"):
            m = s[system]
            rows.append({
                "scenario": f"{s['scenario']} ({s['threads']} threads)" if system == "etcd"
                else "",
                "system": "casledger/etcd" if system == "ratio" else system,
                "ok/s": m["ok_per_s"], "req/s": m["requests_per_s"], "p50 ms": m["p50_ms"],
                "p99 ms": m["p99_ms"], "server CPU ms/op": m["cpu_ms_per_op"],
                "conflicts": m.get("conflicts"), "errors": m.get("errors")})
    print_table(f"casledger vs etcd over HTTP on loopback: medians of {rounds} round(s) of "
                f"{seconds} s (ratio = casledger / etcd: above 1 for a latency means slower)",
                rows, list(rows[0]), out=out)
    detail = [{"scenario": r.scenario, "round": r.round, "system": r.system,
               "ok/s": r.ok_per_s, "req/s": r.requests_per_s, "ok": r.ok,
               "committed": r.committed, "conflicts": r.conflicts,
               "errors": r.trouble, "p50 ms": r.p50_ms, "p99 ms": r.p99_ms,
               "server CPU s": r.server_cpu_s,
               "RSS MiB": " + ".join(f"{kib / 1024:.0f}" for kib in r.rss_kib.values())}
              for r in runs]
    print_table("every run", detail, list(detail[0]), out=out)
    for r in runs:
        if r.trouble:
            out.print(f"[bold red]{r.system} {r.scenario} round {r.round}:[/] {r.errors} "
                      f"unexpected answers {r.statuses}, socket errors {r.socket_errors}; "
                      f"first: {r.sample}", markup=True, soft_wrap=True)
        if r.miscounted:
            out.print(f"[bold red]{r.system} {r.scenario} round {r.round}:[/] the script "
                      f"counted {r.ok} successful CAS but the keys gained {r.committed} "
                      "versions", markup=True, soft_wrap=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench http",
                                     description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 2 s per run unless --duration says otherwise")
    parser.add_argument("--duration", type=int, default=None,
                        help="seconds per wrk run (default 10, 2 with --quick)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="A/B rounds per scenario; medians are reported (default 3)")
    parser.add_argument("--threads", type=int, default=8,
                        help="wrk threads = connections for the CAS and read scenarios "
                             "(default 8)")
    parser.add_argument("--contended-threads", type=int, default=16,
                        help="wrk threads = connections on the contended key (default 16)")
    parser.add_argument("--value-bytes", type=int, default=64,
                        help="size of each value written, and of the hot key (default 64)")
    parser.add_argument("--scenario", action="append", choices=("cas", "read", "contended"),
                        help="run only these scenarios (repeatable; default all)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="seconds of CAS writes to each system before measuring (default 1;"
                             " 0: none)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the temporary data directories go (default: the system's)")
    args = parser.parse_args(argv)
    seconds = args.duration or (2 if args.quick else 10)
    if seconds < 1 or args.rounds < 1:
        parser.error("--duration and --rounds must be at least 1")
    wrk = ensure_tool("wrk", "wrk")
    etcd = ensure_tool("etcd", "etcd-server")
    chosen = [s for s in scenarios(args.threads, args.contended_threads)
              if not args.scenario or s.name in args.scenario]
    load_start = os.getloadavg()
    out = console()
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="casledger-http-bench-", dir=args.dir) as tmp:
        directory = Path(tmp)
        with etcd_serve(etcd, directory) as etcd_target, \
                casledger_serve(sqlite_url(directory / "ledger.db"), grpc_port=free_port(),
                                http_port=free_port()) as served:
            assert served.http_url is not None
            targets = {"etcd": etcd_target,
                       "casledger": Target("casledger", served.http_url,
                                           {"service": served.pid,
                                            **({"bridge": served.bridge_pid}
                                               if served.bridge_pid else {})})}
            seed_hot_key(targets, args.value_bytes)
            if args.warmup:
                warm = Scenario("warmup", "warm-up", args.threads,
                                {"etcd": "etcd_cas.lua", "casledger": "casledger_cas.lua"},
                                ("own",))
                for system in SYSTEMS:
                    run_wrk(wrk, targets[system], warm, args.warmup, args.value_bytes, 0)
            for scenario in chosen:
                for round_ in range(1, args.rounds + 1):
                    for system in SYSTEMS:  # alternating: a burst of other work hits both
                        run = run_wrk(wrk, targets[system], scenario, seconds,
                                      args.value_bytes, round_)
                        runs.append(run)
                        out.print(f"{scenario.name} round {round_} {system}: "
                                  f"{run.ok_per_s:,.0f} ok/s, p50 {run.p50_ms:.2f} ms, "
                                  f"p99 {run.p99_ms:.2f} ms, {run.conflicts} conflicts, "
                                  f"{run.trouble} errors")
        casledger_log = served.log_tail(200)  # after the shutdown: its messages too
    summaries = [summarize(s, [r for r in runs if r.scenario == s.name]) for s in chosen]
    show(summaries, runs, args.rounds, seconds)
    baseline = {s["scenario"]: s["etcd"]["ok_per_s"] for s in summaries}
    quoted = ", ".join(f"{name} {baseline[name]:,.0f}/s (issue: ~{ISSUE_BASELINE[name]:,.0f}/s)"
                       for name in ISSUE_BASELINE if name in baseline)
    if quoted:
        out.print(f"etcd baseline: {quoted}; load average at start {load_start[0]:.2f}, "
                  f"now {os.getloadavg()[0]:.2f}")
    path = write_results("http", {
        "config": {"seconds": seconds, "rounds": args.rounds, "threads": args.threads,
                   "contended_threads": args.contended_threads,
                   "value_bytes": args.value_bytes, "warmup_s": args.warmup,
                   "durability": "full", "etcd": etcd_version(etcd),
                   "wrk": subprocess.run([wrk, "-v"], capture_output=True,
                                         text=True).stdout.splitlines()[0:1]},
        "load_average_start": load_start,
        "issue_baseline_etcd": ISSUE_BASELINE,
        "summary": summaries, "runs": [asdict(r) for r in runs],
        "casledger_log_tail": casledger_log.splitlines()[-50:]})
    out.print(f"results written to {path}")
    return 1 if any(r.trouble for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
