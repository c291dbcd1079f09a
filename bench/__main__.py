"""``python -m bench [SUBCOMMAND] [ARGS...]`` (``make bench BENCH_ARGS=...``).

    python -m bench                  http, then grpc, then scale (``--quick`` is passed on)
    python -m bench --quick          the same, each as a short smoke run
    python -m bench http ...         casledger vs etcd over HTTP with wrk (bench/http_bench.py)
    python -m bench grpc ...         the gRPC benchmark (bench/grpc_bench.py)
    python -m bench scale ...        the scale benchmark (bench/scale_bench.py)
    python -m bench verify ...       offline `casledger verify` (bench/verify_bench.py)

``python -m bench SUBCOMMAND --help`` describes each one's options. Each module is imported only
when its subcommand runs, so one that is missing or broken does not stop the others.
"""

from __future__ import annotations

import importlib
import sys
import traceback
from collections.abc import Callable, Sequence

SUBCOMMANDS = {
    "http": "bench.http_bench",
    "grpc": "bench.grpc_bench",
    "scale": "bench.scale_bench",
    "verify": "bench.verify_bench",
}
ALL = ("http", "grpc", "scale")


class Missing(Exception):
    """The module of a subcommand is not there."""


def entry(subcommand: str) -> Callable[[list[str]], int]:
    module_name = SUBCOMMANDS[subcommand]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise  # the module is there, something it imports is not
        raise Missing(f"{module_name} does not exist (yet)") from None
    main: Callable[[list[str]], int] = module.main
    return main


def run_all(argv: Sequence[str]) -> int:
    unknown = [arg for arg in argv if arg != "--quick"]
    if unknown:
        print(f"python -m bench: without a subcommand only --quick is accepted, not "
              f"{' '.join(unknown)}; try python -m bench http {' '.join(argv)}", file=sys.stderr)
        return 2
    failed = []
    for subcommand in ALL:
        print(f"\n=== python -m bench {subcommand} {' '.join(argv)}".rstrip(), flush=True)
        try:
            code = entry(subcommand)(list(argv))
        except Missing as missing:
            print(f"skipped {subcommand}: {missing}", file=sys.stderr)
            code = 1
        except Exception:  # one benchmark's failure does not stop the next
            traceback.print_exc()
            code = 1
        if code:
            failed.append(f"{subcommand} (exit {code})")
    if failed:
        print(f"\nfailed or skipped: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if not argv or argv[0].startswith("-"):
        return run_all(argv)
    subcommand, rest = argv[0], list(argv[1:])
    if subcommand not in SUBCOMMANDS:
        print(f"python -m bench: unknown subcommand {subcommand!r}; one of "
              f"{', '.join(SUBCOMMANDS)} (or none: {', '.join(ALL)})", file=sys.stderr)
        return 2
    try:
        return entry(subcommand)(rest)
    except Missing as missing:
        print(f"python -m bench {subcommand}: {missing}", file=sys.stderr)
        return 2


sys.exit(main(sys.argv[1:]))
