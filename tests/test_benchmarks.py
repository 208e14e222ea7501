"""The benchmark reports' arithmetic: budgets turned into steps, the target verdicts, and the
fine-tuning cost table (ratios to flow matching, the memory verdict per mode)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import finetune_cost  # noqa: E402
from finetune_cost import Row, Setting  # noqa: E402
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


# -- fine-tuning cost (benchmarks/finetune_cost.py): rows, ratios, verdicts --------------------


def _cost_row(method: str, mode: str, memory: float | None, seconds: float | None, ema_decay: float = 0.0) -> Row:
    setting = Setting(method, mode, ema_decay)
    return Row(method, mode, ema_decay, setting.teacher, seconds, memory, parameters=1000,
               trainable_parameters=1000 if mode == "full" else 100, teacher_parameters=0, network_calls=6)


def test_finetune_settings_pair_every_twinflow_variant_with_flow_matching():
    runs = finetune_cost.settings(0.99)
    for mode in finetune_cost.MODES:
        here = {(setting.method, setting.ema_decay) for setting in runs if setting.mode == mode}
        assert here == {("flow_matching", 0.0), ("twinflow", 0.99), ("twinflow", 0.0)}
    labels = {(setting.mode, setting.ema_decay): setting.teacher for setting in runs if setting.method == "twinflow"}
    assert labels[("full", 0.99)] == "EMA copy (0.99)" and labels[("lora", 0.99)] == "EMA adapter (0.99)"
    assert labels[("full", 0.0)] == "the model itself"
    with pytest.raises(ValueError, match="ema_decay"):
        finetune_cost.settings(0.0)


def test_finetune_summary_takes_the_fastest_round_and_the_median_memory():
    probes = [{"seconds_per_step": seconds, "peak_memory_mb": memory, "parameters": 10, "trainable_parameters": 4,
               "teacher_parameters": 10, "network_calls": 6}
              for seconds, memory in [(0.5, 100.0), (0.4, 130.0), (0.6, 110.0)]]
    row = finetune_cost.summarise(Setting("twinflow", "full", 0.99), probes)
    assert row.seconds_per_step == 0.4 and row.peak_memory_mb == 110.0
    assert row.seconds_rounds == [0.5, 0.4, 0.6] and row.teacher_parameters == 10 and row.error is None
    failed = finetune_cost.summarise(Setting("twinflow", "full", 0.99), probes[:1] + [{"error": "out of memory: x"}])
    assert failed.error == "out of memory: x" and failed.peak_memory_mb is None and failed.seconds_per_step is None


def test_finetune_ratios_are_to_flow_matching_of_the_same_mode():
    rows = finetune_cost.add_ratios([
        _cost_row("flow_matching", "full", 400.0, 0.5), _cost_row("twinflow", "full", 500.0, 1.0, 0.99),
        _cost_row("flow_matching", "lora", 200.0, 0.25), _cost_row("twinflow", "lora", 220.0, 0.75, 0.99),
    ])
    assert [row.memory_ratio for row in rows] == pytest.approx([1.0, 1.25, 1.0, 1.1])
    assert [row.time_ratio for row in rows] == pytest.approx([1.0, 2.0, 1.0, 3.0])
    with pytest.raises(ValueError, match="lora"):
        finetune_cost.add_ratios([_cost_row("flow_matching", "full", 1.0, 1.0), _cost_row("twinflow", "lora", 1.0, 1.0)])


def test_finetune_verdicts_per_mode_follow_the_memory_target():
    rows = finetune_cost.add_ratios([
        _cost_row("flow_matching", "full", 400.0, 0.5), _cost_row("twinflow", "full", 560.0, 1.0, 0.99),
        _cost_row("twinflow", "full", 404.0, 1.0), _cost_row("flow_matching", "lora", 200.0, 0.25),
        _cost_row("twinflow", "lora", 210.0, 0.75, 0.99), _cost_row("twinflow", "lora", None, None),
    ])
    full, lora = finetune_cost.verdicts(rows)
    assert full[:2] == ("full", False)  # 560 / 400 = 1.4 > 1.3, even though the model-as-teacher run is 1.01x
    assert "EMA copy (0.99): 1.40x, 8% over" in full[2] and "the model itself: 1.01x" in full[2]
    assert lora[:2] == ("lora", None) and "not measured" in lora[2]  # 1.05x, but one variant is missing
    assert finetune_cost.verdicts(rows, target=1.5)[0][1] is True


def test_finetune_markdown_rows_and_labels():
    rows = finetune_cost.add_ratios([_cost_row("flow_matching", "full", 400.0, 0.5),
                                     _cost_row("twinflow", "full", 500.0, 1.0, 0.99)])
    # state: 4 bytes x (1000 weights + 3 x 1000 trained: gradients and two moments), no teacher weights counted
    assert finetune_cost.table_row(rows[1]) == (
        f"| twinflow | full-parameter | EMA copy (0.99) | 1,000 | 6 | 1.000 | 500 | {16000 / 2**20:,.0f} | 1.25x | 2.00x |"
    )
    assert finetune_cost.state_megabytes(2**18, 2**18, 2**18) == pytest.approx(5.0)  # full + EMA copy: 5 x weights
    assert finetune_cost.state_megabytes(2**18, 0, 0) == pytest.approx(1.0)  # frozen weights only
    report = {"label": "Tiny model on CPU", "details": "batch 4", "machine": "test", "date": "today", "minutes": 1.0,
              "command": "python benchmarks/finetune_cost.py", "memory_kind": "peak RSS",
              "settings": {"rounds": 3, "steps": 2}, "rows": [vars(row) for row in rows]}
    text = finetune_cost.markdown(report)
    assert "**Tiny model on CPU.**" in text and "| twinflow | full-parameter | EMA copy (0.99) |" in text
    assert "peak memory <= 1.3x flow matching | teacher EMA copy (0.99): 1.25x | met |" in text
    assert "LoRA peak memory" not in text  # no LoRA rows, no LoRA verdict


def test_finetune_probe_request_round_trips_through_json():
    import json
    from dataclasses import asdict

    options = finetune_cost.Options(
        device="cpu", size="tiny", precision="fp32", gradient_checkpointing=True, lora={"rank": 4}, optimizer="adamw",
        learning_rate=1e-4, betas=[0.9, 0.999], weight_decay=0.0, grad_clip=1.0, batch_size=4, latent_size=16,
        caption_tokens=16, steps=2, threads=1,
    )
    assert finetune_cost.Options(**json.loads(json.dumps(asdict(options)))) == options


def test_finetune_report_names_the_device_and_the_model_size():
    options = finetune_cost.Options(
        device="cpu", size="tiny", precision="fp32", gradient_checkpointing=False,
        lora={"rank": 8, "alpha": 8, "target_modules": ["to_q"], "train_second_embedding": False}, optimizer="adamw",
        learning_rate=1e-4, betas=[0.9, 0.999], weight_decay=0.0, grad_clip=1.0, batch_size=4, latent_size=16,
        caption_tokens=16, steps=2, threads=2,
    )
    row = _cost_row("flow_matching", "full", 1.0, 1.0)
    row.parameters = 18_231_488
    label, details = finetune_cost.describe(options, [row], torch.device("cpu"))
    assert label.startswith("Tiny random Z-Image transformer (18.2M parameters) on CPU, 2 torch threads")
    assert "gradient checkpointing off" in details and "rank 8" in details and "emb_2" not in details
