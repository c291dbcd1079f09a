"""A linearizability checker for one compare-and-swap register, in the manner of Knossos and
porcupine: Wing & Gong's search, with Lowe's memoization.

A history is a list of :class:`Op`, each with the client that ran it, its invocation and
completion times and its outcome:

``read() -> value``        ``ok`` carries the value seen; a read that failed or timed out
                           tells nothing and is dropped.
``write(value)``           ``ok``, or ``unknown``.
``cas(expected, new)``     ``ok`` (the register held `expected` and now holds `new`), ``fail``
                           (it did not hold `expected` at the moment the CAS took effect: a
                           refused compare-and-swap is an observation too), or ``unknown``.

``unknown`` is an indeterminate outcome (a timeout, a crash, a lost reply): the operation may or
may not have taken effect. Its completion is taken as +inf, so it may be linearized anywhere after
its invocation, or never (a CAS that took effect and failed changed nothing, which is the same as
never).

The history is linearizable when some total order of its operations (leaving out any subset of
the indeterminate ones) respects real time — an operation that completed before another was
invoked comes first — and replays on a register that starts at `initial`, every read seeing the
value it saw and every CAS succeeding or failing as it did.

The search (Wing & Gong 1993; Lowe 2017; porcupine's ``checkSingle``) walks the invocation and
completion events in time order: only operations invoked before the earliest completion still
pending are candidates to linearize next ("just-in-time linearization"); reaching a completion of
an operation not yet linearized means backtracking. Each (set of linearized operations, register
value) is visited at most once: the set is a bitmask, and the register values must be hashable.
Per key, a history of a few hundred operations from a dozen clients checks in milliseconds.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["read", "write", "cas"]
Outcome = Literal["ok", "fail", "unknown"]

__all__ = ["CheckerGaveUp", "Op", "Result", "cas", "check", "check_keys", "read", "write"]


@dataclass(frozen=True, slots=True)
class Op:
    """One operation of one client on the register."""

    process: Hashable
    kind: Kind
    invoke: float
    complete: float
    value: Any = None
    """read: the value seen; write: the value written; cas: the new value."""
    expected: Any = None
    """cas only: the value the register must hold."""
    outcome: Outcome = "ok"
    label: str = ""
    """Anything that identifies the operation in a report (an operation id, a request)."""

    def __post_init__(self) -> None:
        if self.kind not in ("read", "write", "cas"):
            raise ValueError(f"unknown operation kind {self.kind!r}")
        if self.outcome not in ("ok", "fail", "unknown"):
            raise ValueError(f"unknown outcome {self.outcome!r}")
        if self.outcome == "unknown" and self.complete != math.inf:
            # An indeterminate operation may take effect at any time after its invocation.
            object.__setattr__(self, "complete", math.inf)
        if self.outcome != "unknown" and not self.invoke <= self.complete < math.inf:
            raise ValueError(f"{self}: a determinate operation completes after its invocation")

    def __str__(self) -> str:
        what = {"read": f"read -> {self.value!r}", "write": f"write({self.value!r})",
                "cas": f"cas({self.expected!r} -> {self.value!r})"}[self.kind]
        label = f" [{self.label}]" if self.label else ""
        return (f"{self.process}: {what} {self.outcome} "
                f"@{self.invoke:.6f}..{self.complete:.6f}{label}")


def read(process: Hashable, invoke: float, complete: float, value: Any, *,
         outcome: Outcome = "ok", label: str = "") -> Op:
    return Op(process, "read", invoke, complete, value=value, outcome=outcome, label=label)


def write(process: Hashable, invoke: float, complete: float, value: Any, *,
          outcome: Outcome = "ok", label: str = "") -> Op:
    return Op(process, "write", invoke, complete, value=value, outcome=outcome, label=label)


def cas(process: Hashable, invoke: float, complete: float, expected: Any, new: Any, *,
        outcome: Outcome = "ok", label: str = "") -> Op:
    return Op(process, "cas", invoke, complete, value=new, expected=expected, outcome=outcome,
              label=label)


class CheckerGaveUp(RuntimeError):
    """The search visited more states than allowed: neither proved nor refuted."""


@dataclass(frozen=True, slots=True)
class Result:
    linearizable: bool
    ops: int
    """Operations checked: those that carry information (failed or indeterminate reads do not)."""
    explored: int
    """Distinct (linearized set, value) states visited."""
    linearization: tuple[Op, ...] = ()
    """When linearizable: a witness order (indeterminate operations it leaves out never took
    effect). Otherwise: the longest prefix the search could linearize."""
    stuck_on: tuple[Op, ...] = field(default=())
    """When not linearizable: the operations still pending where that longest prefix stopped;
    the first completion among them is the one the search could not get past."""

    def explain(self) -> str:
        if self.linearizable:
            return f"linearizable ({self.ops} operations, {self.explored} states)"
        lines = [f"NOT linearizable ({self.ops} operations, {self.explored} states); "
                 f"the longest linearizable prefix ({len(self.linearization)} operations) ends:"]
        lines += [f"  {op}" for op in self.linearization[-8:]]
        lines.append("and none of these can come next:")
        lines += [f"  {op}" for op in self.stuck_on[:16]]
        return "\n".join(lines)


def step(value: Any, op: Op) -> tuple[bool, Any]:
    """The register's sequential specification: (consistent?, the value after `op`)."""
    if op.kind == "read":
        return value == op.value, value
    if op.kind == "write":
        return True, op.value
    if op.outcome == "fail":
        return value != op.expected, value
    # ok, or unknown and taken to have happened (an unknown CAS that failed changed nothing,
    # which the search covers by never linearizing it).
    return (True, op.value) if value == op.expected else (False, value)


def informative(op: Op) -> bool:
    """Whether `op` constrains the history: a read that did not return, or a write refused for
    sure, tells nothing."""
    if op.kind == "read":
        return op.outcome == "ok"
    if op.kind == "write":
        return op.outcome != "fail"
    return True


def check(history: Iterable[Op], initial: Any = None, *,
          max_states: int = 2_000_000) -> Result:
    """Whether `history` (of one register that starts at `initial`) is linearizable."""
    ops = [op for op in history if informative(op)]
    n = len(ops)
    # Events: (time, 0 = invocation | 1 = completion, op index). At equal times invocations
    # sort first: the two operations are then taken as concurrent, the weaker assumption.
    events = sorted([(op.invoke, 0, i) for i, op in enumerate(ops)]
                    + [(op.complete, 1, i) for i, op in enumerate(ops)])
    # A doubly linked list over the events; slot 0 is the head sentinel, event k is slot k + 1.
    size = len(events) + 1
    nxt = list(range(1, size + 1))
    nxt[-1] = 0  # 0 ends the list (the sentinel is never a successor)
    prv = list(range(-1, size - 1))
    is_call = [False] + [kind == 0 for _, kind, _ in events]
    op_of = [-1] + [i for _, _, i in events]
    completion_slot = [0] * n
    for slot in range(1, size):
        if not is_call[slot]:
            completion_slot[op_of[slot]] = slot

    def lift(call: int) -> None:
        for slot in (call, completion_slot[op_of[call]]):
            nxt[prv[slot]] = nxt[slot]
            if nxt[slot]:
                prv[nxt[slot]] = prv[slot]

    def unlift(call: int) -> None:
        for slot in (completion_slot[op_of[call]], call):
            nxt[prv[slot]] = slot
            if nxt[slot]:
                prv[nxt[slot]] = slot

    value = initial
    linearized = 0
    stack: list[tuple[int, Any]] = []  # (call slot, value before it)
    seen: set[tuple[int, Any]] = set()
    longest: list[int] = []
    longest_stuck: list[int] = []
    deepest = -1
    slot = nxt[0]
    while nxt[0]:
        if is_call[slot]:
            i = op_of[slot]
            consistent, after = step(value, ops[i])
            if consistent:
                state = (linearized | 1 << i, after)
                if state not in seen:
                    seen.add(state)
                    if len(seen) > max_states:
                        raise CheckerGaveUp(f"over {max_states} states for {n} operations")
                    stack.append((slot, value))
                    value, linearized = after, state[0]
                    lift(slot)
                    slot = nxt[0]
                    continue
            slot = nxt[slot]
            continue
        # The earliest pending completion, of an operation not linearized yet.
        if ops[op_of[slot]].complete == math.inf:
            # Completions sort by time, so every operation still pending is indeterminate:
            # they never took effect, and everything else is linearized.
            break
        if len(stack) > deepest:  # strictly: at most n copies, whatever the backtracking
            deepest = len(stack)
            longest = [call for call, _ in stack]
            longest_stuck = pending(nxt, is_call, op_of)
        if not stack:
            return Result(False, n, len(seen), tuple(ops[op_of[c]] for c in longest),
                          tuple(ops[i] for i in longest_stuck))
        slot, value = stack.pop()
        linearized &= ~(1 << op_of[slot])
        unlift(slot)
        slot = nxt[slot]
    return Result(True, n, len(seen), tuple(ops[op_of[call]] for call, _ in stack))


def pending(nxt: Sequence[int], is_call: Sequence[bool], op_of: Sequence[int]) -> list[int]:
    """The operations whose invocations are still in the event list, in time order."""
    found, slot = [], nxt[0]
    while slot:
        if is_call[slot]:
            found.append(op_of[slot])
        slot = nxt[slot]
    return found


def check_keys(history: Iterable[tuple[Hashable, Op]],
               initial: Mapping[Hashable, Any] | None = None, *,
               max_states: int = 2_000_000) -> dict[Hashable, Result]:
    """Check each key's register on its own (linearizability is local: Herlihy & Wing 1990)."""
    by_key: dict[Hashable, list[Op]] = defaultdict(list)
    for key, op in history:
        by_key[key].append(op)
    initial = initial or {}
    return {key: check(ops, initial.get(key), max_states=max_states)
            for key, ops in by_key.items()}
