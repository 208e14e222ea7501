"""The benchmark report's arithmetic: budgets turned into steps, and the target verdicts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from methods import METHODS, WARM_START, plan_methods  # noqa: E402
from render import final_scores, markdown, verdicts  # noqa: E402


def test_every_method_gets_the_same_budget():
    costs = {"flow_matching": 0.37, "rcgm": 0.73, "twinflow": 0.75}
    plans = plan_methods(540.0, costs, warm_start_fraction=0.3)
    assert set(plans) == set(METHODS)
    warm = {plan.warm_start_steps for plan in plans.values()}
    assert warm == {round(0.3 * 540 / 0.37)}  # one shared warm start
    for method, plan in plans.items():
        spent = plan.warm_start_steps * costs["flow_matching"] + plan.method_steps * costs[method]
        assert spent == pytest.approx(540.0, abs=costs[method] / 2 + 1e-9)
    # twice the cost per step, about half the steps
    assert plans["flow_matching"].method_steps == pytest.approx(2 * plans["rcgm"].method_steps, rel=0.02)


def test_plan_errors_name_the_problem():
    with pytest.raises(ValueError, match="twinflow"):
        plan_methods(60.0, {"flow_matching": 0.3, "rcgm": 0.6})
    with pytest.raises(ValueError, match="warm_start_fraction"):
        plan_methods(60.0, {"flow_matching": 0.3, "rcgm": 0.6, "twinflow": 0.6}, warm_start_fraction=1.0)


def _row(spec, calls, accuracy, distance, precision, recall=0.5):
    return {"preset": spec, "network_calls": calls, "accuracy": accuracy, "frechet_distance": distance,
            "precision": precision, "recall": recall, "images_per_second": 100.0 / max(calls, 1), "seconds": 1.0, "count": 100}


def _results(twinflow_distance: float, twinflow_accuracy: float, one_step_speed: float) -> dict:
    scores = [
        {"method": WARM_START, "step": 10, "training_seconds": 5.0, "rows": [_row("1nfe", 1, 0.1, 500, 0.1)]},
        {"method": "twinflow", "step": 20, "training_seconds": 10.0, "rows": [_row("1nfe", 1, 0.5, 300, 0.3)]},
        {"method": "twinflow", "step": 30, "training_seconds": 15.0,
         "rows": [_row("1nfe", 1, twinflow_accuracy, twinflow_distance, 0.8), _row("2nfe", 2, 0.97, 30, 0.8)]},
        {"method": "rcgm", "step": 30, "training_seconds": 15.0, "rows": [_row("1nfe", 1, 0.9, 80, 0.6)]},
        {"method": "flow_matching", "step": 50, "training_seconds": 15.0,
         "rows": [_row("multi:steps=1", 1, 0.2, 400, 0.1), _row("multi:steps=50", 50, 0.97, 20, 0.85)]},
    ]
    return {
        "machine": "test", "date": "today", "minutes": 1.0, "command": "python benchmarks/report.py",
        "settings": {"budget_minutes": 0.25, "warm_start_fraction": 0.3, "num": 100, "batch_size": 64, "sampling_batch": 100},
        "classifier_test_accuracy": 0.98,
        "plans": {m: {"warm_start_steps": 10, "method_steps": 20, "budget_seconds": 15.0, "seconds_per_step": 0.5} for m in METHODS},
        "scores": scores,
        "real_data": _row("real", 0, 0.98, 10, 0.9),
        "training_cost": [
            {"objective": "flow_matching", "seconds_per_step": 0.4, "network_calls": 1, "peak_memory_mb": 200.0, "memory_kind": "rss"},
            {"objective": "twinflow", "seconds_per_step": 0.8, "network_calls": 6, "peak_memory_mb": 220.0, "memory_kind": "rss"},
        ],
        "sampling_cost": [
            {"sampler": "1nfe", "network_calls": 1, "images_per_second": one_step_speed, "overhead": 0.02,
             "sampler_seconds": 1.0, "forward_seconds": 1.0},
            {"sampler": "multi:steps=50", "network_calls": 50, "images_per_second": 10.0, "overhead": 0.01,
             "sampler_seconds": 50.0, "forward_seconds": 50.0},
        ],
    }


def test_final_scores_take_the_newest_checkpoint_of_each_method():
    final = final_scores(_results(25.0, 0.96, 450.0))
    assert set(final) == set(METHODS)  # the warm start is not a method
    assert final["twinflow"]["step"] == 30


def test_verdicts_follow_the_targets():
    met = dict((target, ok) for target, ok, _ in verdicts(_results(25.0, 0.96, 450.0)))
    assert all(met.values()) and len(met) == 5
    missed = {target: ok for target, ok, _ in verdicts(_results(31.0, 0.94, 390.0))}
    # 31 > 1.5 x 20, 0.94 < 95 %, 39x < 40x; TwinFlow still beats RCGM (31 < 80, 0.8 > 0.6)
    assert [ok for ok in missed.values()] == [False, False, True, False, True]


def test_markdown_reports_ratios_and_verdicts():
    text = markdown(_results(31.0, 0.96, 450.0), {"plot": "plot.png"})
    assert "| twinflow | 0.800 | 2.00x | 6 | 220 | 1.10x |" in text
    assert "31.0 vs 20.0 (1.55x) | **missed** |" in text
    assert "| TwinFlow | `1nfe` | 1 | 0.960 | 31.0 | 0.800 | 0.500 | 100 |" in text
    assert "![plot](plot.png)" in text


def test_plot_time_axis_counts_steps_at_the_measured_cost():
    from render import budgeted_seconds

    results = _results(25.0, 0.96, 450.0)  # warm start 10 steps at 0.4 s, then 0.5 s per own step
    assert budgeted_seconds(results, WARM_START, 10) == pytest.approx(4.0)
    assert budgeted_seconds(results, "twinflow", 30) == pytest.approx(4.0 + 20 * 0.5)
    assert budgeted_seconds(results, "rcgm", 5) == pytest.approx(2.0)
