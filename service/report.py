"""How the inspection commands show what they find: rich tables and coloured lines for people,
JSON for scripts (``--json``), progress bars on stderr only when it is a terminal.

Everything a command prints about a version goes through :func:`version_view` (JSON) or
:meth:`Output.version_line` (one line of a log), so `history`, `log` and `tail` agree. Data read
from the ledger (names, reasons, content) is always printed as :class:`rich.text.Text`, never as
markup, so a reason such as ``[red]x[/]`` is shown as written.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from .model import Version
from .verify import Problem

# Wide enough that tables piped to a file or a pager are not squeezed into 80 columns.
PIPE_WIDTH = 160
_EVENT_STYLES = {"created": "green", "updated": "yellow", "deleted": "red"}


def format_time(us: int, *, precise: bool = False) -> str:
    """RFC 3339 in UTC: microseconds in JSON, milliseconds in tables."""
    moment = datetime.fromtimestamp(us / 1_000_000, UTC)
    text = moment.isoformat(timespec="microseconds" if precise else "milliseconds")
    return text.replace("+00:00", "Z")


def event_of(v: Version) -> str:
    if v.deleted:
        return "deleted"
    return "created" if v.creates else "updated"


def version_view(v: Version, *, content: bool = False) -> dict[str, Any]:
    """A version as `--json` shows it. With `content`: ``content`` (UTF-8 text) or, when the
    bytes are not UTF-8, ``content_base64``."""
    view: dict[str, Any] = {
        "revision": v.revision, "name": v.name, "version": v.version, "event": event_of(v),
        "update_time": format_time(v.update_time_us, precise=True),
        "create_time": format_time(v.create_time_us, precise=True),
        "actor": v.actor, "reason": v.reason, "deleted": bool(v.deleted), "size": v.size,
        "content_type": v.content_type, "etag": v.etag, "hash": v.hash.hex(),
        "previous_hash": v.previous_hash.hex(),
        "ledger_previous_hash": v.ledger_previous_hash.hex(),
    }
    if content:
        try:
            view["content"] = v.content.decode()
        except UnicodeDecodeError:
            view["content_base64"] = base64.b64encode(v.content).decode("ascii")
    return view


def problem_view(problem: Problem) -> dict[str, Any]:
    return {"kind": problem.kind.value, "name": problem.name, "version": problem.version,
            "revision": problem.revision, "detail": problem.detail}


def _console(stream: Any) -> Console:
    terminal = stream.isatty()
    width = None if terminal or os.environ.get("COLUMNS") else PIPE_WIDTH
    return Console(file=stream, width=width, highlight=False, soft_wrap=False)


class Output:
    """The two streams of one command run: results on stdout, messages and progress on
    stderr. Built per run (so a captured sys.stdout is honoured)."""

    def __init__(self, json_mode: bool) -> None:
        self.json_mode = json_mode
        self.out = _console(sys.stdout)
        self.err = _console(sys.stderr)
        self._header_shown = False

    @property
    def terminal(self) -> bool:
        return self.out.is_terminal

    def json(self, value: Any) -> None:
        """One JSON document on one line of stdout (JSON Lines when called repeatedly)."""
        sys.stdout.write(json.dumps(value, separators=(",", ":")) + "\n")
        sys.stdout.flush()

    def message(self, text: str, style: str = "") -> None:
        self.err.print(Text(text, style=style), soft_wrap=True)

    def error(self, text: str) -> None:
        self.err.print(Text(f"casledger: {text}", style="red"), soft_wrap=True)

    def table(self, columns: Sequence[str], rows: Iterable[Sequence[Text | str]], *,
              title: str | None = None, show_header: bool = True) -> None:
        table = Table(*columns, title=title, show_header=show_header, header_style="bold")
        for row in rows:
            table.add_row(*(cell if isinstance(cell, Text) else Text(cell) for cell in row))
        self.out.print(table)

    def fields(self, pairs: Iterable[tuple[str, object]]) -> None:
        """A two-column table of names and values."""
        self.table(("field", "value"), ((name, str(value)) for name, value in pairs),
                   show_header=False)

    def version_line(self, v: Version) -> None:
        """One version as a log line (or a JSON line with --json); flushed at once."""
        if self.json_mode:
            self.json(version_view(v))
            return
        if not self._header_shown:
            self.out.print(Text(f"{'REVISION':>9}  {'TIME':<24}  {'EVENT':<7}  "
                                f"{'NAME@VERSION':<28}  ACTOR  ETAG  REASON", style="bold"),
                           soft_wrap=True)
            self._header_shown = True
        event = event_of(v)
        where = f"{v.name}@{v.version}"
        line = Text.assemble(
            f"{v.revision:>9}  {format_time(v.update_time_us):<24}  ",
            (f"{event:<7}", _EVENT_STYLES[event]), "  ", (f"{where:<28}", "bold"),
            f"  {v.actor}  {v.etag}", f"  {v.reason}" if v.reason else "")
        self.out.print(line, soft_wrap=True)
        self.out.file.flush()

    def problems(self, problems: Sequence[Problem], total: int) -> None:
        if self.json_mode or not problems:
            return
        self.table(("revision", "resource", "version", "problem", "detail"), (
            (str(p.revision), p.name, str(p.version), Text(p.kind.value, style="red"), p.detail)
            for p in problems), title="broken links")
        if total > len(problems):
            self.message(f"... and {total - len(problems)} more")

    @contextmanager
    def progress(self, total: int | None, description: str) -> Iterator[Callable[[int], None]]:
        """Yields `advance(n)`; draws a bar on stderr only when stderr is a terminal."""
        if not self.err.is_terminal:
            yield _ignore
            return
        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeRemainingColumn(), console=self.err, transient=True)
        with bar:
            task = bar.add_task(description, total=total)
            yield lambda n: bar.advance(task, n)


def _ignore(n: int) -> None:
    return None


class Stopwatch:
    """Wall-clock seconds since construction."""

    def __init__(self) -> None:
        self._start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self._start
