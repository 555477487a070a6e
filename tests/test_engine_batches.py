"""The engine's micro-batches: sorted by length, within the token and attention budgets, and the cheapest
plan there is (against a brute force)."""

from __future__ import annotations

import pytest

from reranker_ops.worker.engine import CALL_COST_TOKENS, plan_cost, plan_microbatches

pytestmark = pytest.mark.timeout(60)


def _cheapest_plan_by_brute_force(lengths, token_budget, attention_budget, call_tokens=CALL_COST_TOKENS):
    """Every way to cut the sorted pairs into runs, each run within the budgets (or alone)."""
    import itertools

    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best = None
    for cuts in itertools.product((False, True), repeat=len(order) - 1):
        runs, run = [], [order[0]]
        for i, cut in zip(order[1:], cuts):
            if cut:
                runs.append(run)
                run = []
            run.append(i)
        runs.append(run)
        ok = all(len(r) == 1 or (len(r) * -(-max(lengths[i] for i in r) // 8) * 8 <= token_budget and
                                 len(r) * (-(-max(lengths[i] for i in r) // 8) * 8) ** 2 <= attention_budget)
                 for r in runs)
        if ok:
            cost = plan_cost(lengths, runs, call_tokens)
            best = cost if best is None else min(best, cost)
    return best


def test_microbatches_sorted_and_within_budget():
    lengths = [500, 10, 12, 300, 11, 9, 700, 20]
    batches = plan_microbatches(lengths, token_budget=1024)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        width = max(-(-lengths[i] // 8) * 8 for i in b)
        assert len(b) == 1 or width * len(b) <= 1024
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat)
    assert plan_microbatches([2000], 512) == [[0]]  # a pair longer than the budget runs alone


def test_microbatches_are_the_cheapest_plan():
    """Pairs of one-line length mixed with paragraph-long ones: filling every call to the budget pads the
    short ones to the long ones. The plan is the exact optimum of the cost model, checked by brute force."""
    import random

    rng = random.Random(3)
    for _ in range(40):
        lengths = [rng.choice((rng.randint(5, 40), rng.randint(100, 300))) for _ in range(rng.randint(1, 9))]
        plan = plan_microbatches(lengths, token_budget=1024, attention_budget=512 * 512)
        assert sorted(i for b in plan for i in b) == list(range(len(lengths)))
        assert plan_cost(lengths, plan) == pytest.approx(_cheapest_plan_by_brute_force(lengths, 1024, 512 * 512))
    # one call would pad 9..12 to 300 tokens (4 x 300 = 1200 token-units); the plan runs them apart
    lengths = [9, 10, 11, 12, 300]
    assert sorted(map(sorted, plan_microbatches(lengths, token_budget=4096))) == [[0, 1, 2, 3], [4]]


def test_the_plan_is_the_cheapest_at_any_price_of_a_call_and_fewer_calls_as_it_rises():
    """benchmarks/plan_cost.py plans with each precision's own price of a call (INT8 makes a token cheaper, not
    a call): the plan is the optimum at that price too, and a dearer call never makes more calls."""
    import random

    rng = random.Random(5)
    for _ in range(30):
        lengths = [rng.choice((rng.randint(5, 40), rng.randint(60, 200))) for _ in range(rng.randint(2, 9))]
        calls = []
        for price in (2.0, 14.0, 40.0, 400.0, 1000.0):
            plan = plan_microbatches(lengths, token_budget=1024, attention_budget=512 * 512, call_tokens=price)
            assert sorted(i for b in plan for i in b) == list(range(len(lengths)))
            assert plan_cost(lengths, plan, call_tokens=price) == pytest.approx(
                _cheapest_plan_by_brute_force(lengths, 1024, 512 * 512, call_tokens=price))
            calls.append(len(plan))
        assert calls == sorted(calls, reverse=True), (lengths, calls)
    # four one-liners and two 160-token passages: one call pads the one-liners by ~600 token-units, so they run
    # apart at 14 tokens a call and at 400, and together only when a call costs more than that padding
    lengths = [12, 13, 14, 15, 160, 161]
    assert len(plan_microbatches(lengths, token_budget=4096, call_tokens=14.0)) == 2
    assert len(plan_microbatches(lengths, token_budget=4096, call_tokens=400.0)) == 2
    assert len(plan_microbatches(lengths, token_budget=4096, call_tokens=1000.0)) == 1
