"""The linearizability checker of the compare-and-swap register, on hand-made histories (the
classic anomalies and the ones it must accept) and on generated ones: every history produced by a
real atomic register is accepted, and the same history with one read corrupted is refused."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.linearizability import CheckerGaveUp, Op, cas, check, check_keys, read, write

# --- accepted -----------------------------------------------------------------------------------


def test_an_empty_history_is_linearizable() -> None:
    result = check([], initial=0)
    assert result.linearizable
    assert result.ops == 0


def test_a_sequential_history_is_linearizable_and_the_witness_is_its_order() -> None:
    history = [
        write("a", 0, 1, 1),
        read("b", 2, 3, 1),
        cas("a", 4, 5, 1, 2),
        cas("b", 6, 7, 1, 3, outcome="fail"),
        read("a", 8, 9, 2),
    ]
    result = check(history, initial=0)
    assert result.linearizable, result.explain()
    assert list(result.linearization) == history
    assert result.ops == 5


@pytest.mark.parametrize("seen", [1, 2])
def test_a_read_concurrent_with_a_write_may_see_either_value(seen: int) -> None:
    history = [write("a", 0, 1, 1), write("a", 2, 6, 2), read("b", 3, 4, seen)]
    assert check(history, initial=0).linearizable


def test_concurrent_cas_one_wins_one_fails() -> None:
    history = [read("a", 0, 1, 0), read("b", 0, 1, 0),
               cas("a", 2, 5, 0, 1), cas("b", 3, 4, 0, 1, outcome="fail"),
               read("c", 6, 7, 1)]
    result = check(history, initial=0)
    assert result.linearizable, result.explain()
    # b completed first, yet it must be ordered after a (a failure means a was already in).
    assert [op.process for op in result.linearization[2:4]] == ["a", "b"]


def test_an_indeterminate_cas_whose_effect_is_seen_is_assumed_applied() -> None:
    # a's CAS timed out; b later reads the value only that CAS could have written.
    history = [cas("a", 1, math.inf, 0, 1, outcome="unknown"), read("b", 5, 6, 1),
               cas("b", 7, 8, 1, 2), read("a", 9, 10, 2)]
    result = check(history, initial=0)
    assert result.linearizable, result.explain()
    assert history[0] in result.linearization
    # Without it nothing explains the read: the indeterminate operation is what made it pass.
    assert not check(history[1:], initial=0).linearizable


def test_an_indeterminate_cas_whose_effect_is_never_seen_is_dropped() -> None:
    history = [cas("a", 1, 2, 0, 1, outcome="unknown"), read("b", 5, 6, 0),
               cas("b", 7, 8, 0, 5), read("c", 9, 10, 5)]
    result = check(history, initial=0)
    assert result.linearizable, result.explain()
    assert history[0] not in result.linearization


def test_an_indeterminate_write_may_take_effect_long_after_its_invocation() -> None:
    history = [write("a", 0, 1, 7, outcome="unknown"), read("b", 2, 3, 0),
               read("b", 4, 5, 0), read("c", 6, 7, 7)]
    assert check(history, initial=0).linearizable


def test_reads_that_did_not_return_carry_no_information() -> None:
    history = [read("a", 0, 1, 42, outcome="unknown"), read("b", 2, 3, 99, outcome="fail"),
               read("c", 4, 5, 0)]
    result = check(history, initial=0)
    assert result.linearizable
    assert result.ops == 1


# --- refused -----------------------------------------------------------------------------------


def test_stale_read() -> None:
    history = [write("a", 0, 1, 1), write("a", 2, 3, 2), read("b", 4, 5, 1)]
    result = check(history, initial=0)
    assert not result.linearizable
    assert history[2] in result.stuck_on
    assert "NOT linearizable" in result.explain()


def test_lost_update_two_cas_on_the_same_value_both_succeed() -> None:
    # The classic: both read 0, both compare-and-swap 0 -> 1, both told they won.
    history = [read("a", 0, 1, 0), read("b", 0, 1, 0),
               cas("a", 2, 4, 0, 1), cas("b", 3, 5, 0, 1)]
    assert not check(history, initial=0).linearizable


def test_lost_update_read_after_both_increments_sees_one() -> None:
    # Two acknowledged increments from 0 (1 then 2), yet a later read sees 1: an increment lost.
    history = [cas("a", 0, 2, 0, 1), cas("b", 1, 3, 1, 2), read("c", 4, 5, 1)]
    assert not check(history, initial=0).linearizable


def test_a_failed_cas_needs_another_value_at_some_point_in_its_window() -> None:
    history = [write("a", 0, 1, 0), cas("b", 2, 3, 0, 1, outcome="fail")]
    assert not check(history, initial=None).linearizable
    # With a concurrent write to explain it, the same failure is fine.
    assert check([*history, write("c", 2, 4, 9)], initial=None).linearizable


def test_real_time_order_is_respected() -> None:
    # Concurrent writes of 1 and 2; once a read after both saw 2, a later read cannot see 1.
    history = [write("a", 0, 1, 1), write("b", 0, 1, 2), read("c", 2, 3, 2), read("c", 4, 5, 1)]
    assert not check(history, initial=0).linearizable
    assert check(history[:3], initial=0).linearizable


def test_an_indeterminate_operation_cannot_explain_a_read_that_ended_before_it_began() -> None:
    history = [read("a", 0, 1, 1), write("b", 2, math.inf, 1, outcome="unknown")]
    assert not check(history, initial=0).linearizable


def test_an_indeterminate_cas_cannot_take_effect_twice() -> None:
    history = [cas("a", 0, 1, 0, 1, outcome="unknown"), read("b", 2, 3, 1),
               write("c", 4, 5, 0), read("b", 6, 7, 1)]
    assert not check(history, initial=0).linearizable


def test_keys_are_checked_separately() -> None:
    results = check_keys([("x", write("a", 0, 1, 1)), ("y", read("b", 2, 3, 0)),
                          ("x", read("b", 2, 3, 1)), ("y", read("a", 4, 5, 1))],
                         initial={"x": 0, "y": 0})
    assert results["x"].linearizable
    assert not results["y"].linearizable


def test_op_validation() -> None:
    with pytest.raises(ValueError, match="completes after"):
        read("a", 2, 1, 0)
    with pytest.raises(ValueError, match="kind"):
        Op("a", "incr", 0, 1)  # type: ignore[arg-type]
    assert cas("a", 0, 5, 0, 1, outcome="unknown").complete == math.inf


def test_the_search_is_bounded() -> None:
    # 16 concurrent writes of distinct values and a read of a value never written: every order
    # of the writes is tried before the answer is no, unless the budget stops it first.
    history = [write(i, 0, 10, i) for i in range(16)] + [read("r", 11, 12, -1)]
    with pytest.raises(CheckerGaveUp):
        check(history, initial=0, max_states=1000)


# --- generated: histories of a real atomic register --------------------------------------------


def simulate(seed: int, processes: int, steps: int, *, values: int = 4,
             lost: float = 0.05) -> list[Op]:
    """Clients running on a real atomic register, each operation taking effect at one instant
    between its invocation and its completion; those still running at the end are
    indeterminate, whether they took effect or not, and some replies are lost on the way."""
    rng = random.Random(seed)
    register = 0
    running: dict[int, dict[str, object]] = {}
    done: list[Op] = []
    for t in range(steps):
        p = rng.randrange(processes)
        op = running.get(p)
        if op is None:
            kind = rng.choice(["read", "write", "cas", "cas"])
            running[p] = {"kind": kind, "invoke": t, "applied": False,
                          "value": rng.randrange(values), "expected": rng.randrange(values)}
        elif not op["applied"]:
            op["applied"] = True
            if op["kind"] == "read":
                op["value"] = register
            elif op["kind"] == "write":
                register = op["value"]  # type: ignore[assignment]
            elif register == op["expected"]:
                register, op["outcome"] = op["value"], "ok"  # type: ignore[assignment]
            else:
                op["outcome"] = "fail"
        else:
            reply_lost = rng.random() < lost
            done.append(finish(p, op, t, "unknown" if reply_lost else op.get("outcome", "ok")))
            del running[p]
    done += [finish(p, op, steps, "unknown") for p, op in running.items()]
    return done


def finish(p: int, op: dict[str, object], t: int, outcome: object) -> Op:
    return Op(p, op["kind"], float(op["invoke"]),  # type: ignore[arg-type]
              math.inf if outcome == "unknown" else float(t), value=op["value"],
              expected=op["expected"] if op["kind"] == "cas" else None,
              outcome=outcome)  # type: ignore[arg-type]


@given(seed=st.integers(0, 2**32), processes=st.integers(1, 6), steps=st.integers(0, 120))
@settings(deadline=None, max_examples=150, derandomize=True, database=None)
def test_histories_of_an_atomic_register_are_linearizable(seed: int, processes: int,
                                                          steps: int) -> None:
    history = simulate(seed, processes, steps)
    result = check(history, initial=0)
    assert result.linearizable, result.explain()


@given(seed=st.integers(0, 2**32), processes=st.integers(1, 6), steps=st.integers(10, 120),
       pick=st.integers(0, 10**6))
@settings(deadline=None, max_examples=150, derandomize=True, database=None)
def test_a_read_of_a_value_never_written_is_caught(seed: int, processes: int, steps: int,
                                                   pick: int) -> None:
    history = simulate(seed, processes, steps)
    reads = [i for i, op in enumerate(history) if op.kind == "read" and op.outcome == "ok"]
    if not reads:
        return
    i = reads[pick % len(reads)]
    history[i] = replace(history[i], value=-1)
    assert not check(history, initial=0).linearizable


@given(seed=st.integers(0, 2**32), steps=st.integers(20, 120), pick=st.integers(0, 10**6))
@settings(deadline=None, max_examples=100, derandomize=True, database=None)
def test_a_cas_reported_as_the_opposite_is_caught_when_nothing_else_explains_it(
        seed: int, steps: int, pick: int) -> None:
    # One client at a time and no lost replies: nothing concurrent can explain a flipped outcome.
    history = simulate(seed, 1, steps, lost=0.0)
    flips = [i for i, op in enumerate(history) if op.kind == "cas" and op.outcome != "unknown"
             and op.expected != op.value]
    if not flips:
        return
    i = flips[pick % len(flips)]
    history[i] = replace(history[i], outcome="fail" if history[i].outcome == "ok" else "ok")
    assert not check(history, initial=0).linearizable


def test_a_long_history_of_many_clients_checks_without_blowing_up() -> None:
    history = simulate(seed=7, processes=12, steps=1200)
    assert len(history) > 300
    result = check(history, initial=0)
    assert result.linearizable, result.explain()
    # Just-in-time linearization and the memo keep the search near-linear in practice.
    assert result.explored < 100 * len(history)
