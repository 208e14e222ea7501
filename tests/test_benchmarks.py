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
from methods import METHODS, WARM_START, plan_methods, recipe  # noqa: E402
from render import final_scores, markdown, verdicts  # noqa: E402

from twinflow.train import load_config  # noqa: E402


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


def test_the_comparison_trains_as_its_step_costs_are_timed():
    """costs.py times float32 steps at the report's batch; the demo file says batch 80 and
    precision auto (bf16 on a CPU with native bf16), which would break the budget plan."""
    demo_path = str(Path(__file__).resolve().parents[1] / "configs" / "mnist_twinflow.yaml")
    demo = load_config(demo_path)
    assert demo["training"]["batch_size"] != 48 and demo["precision"] != "fp32"
    config = recipe(demo_path, [{"steps": 5, "objective": {"preset": "rcgm"}}], 48)
    assert config["training"]["batch_size"] == 48
    assert config["precision"] == "fp32"
    assert config["phases"] == [{"steps": 5, "objective": {"preset": "rcgm"}}]


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


# ---- benchmarks/gpu_check.py: its CPU fallback runs every section (tiny models), guarded ---------------

import gpu_check  # noqa: E402


@pytest.fixture(scope="module")
def gpu_check_cpu(tmp_path_factory):
    """One quick CPU-fallback run of the GPU check (tiny random models): its JSON and markdown."""
    import json

    stem = tmp_path_factory.mktemp("gpu_check") / "gpu_check"
    assert gpu_check.main(["--device", "cpu", "--quick", "--out", str(stem)]) == 0
    return json.loads(stem.with_suffix(".json").read_text()), stem.with_suffix(".md").read_text()


def _gpu_check_rows(report: dict, kind: str) -> list[dict]:
    return [row for entry in report["sections"] if entry["name"].split("/")[0] == kind for row in entry["rows"]]


def test_gpu_check_cpu_fallback_runs_every_section_and_says_so(gpu_check_cpu):
    report, text = gpu_check_cpu
    families = ("z_image", "qwen_image")
    expected = {"plan", "training_full/z_image"} | {
        f"{kind}/{family}" for family in families for kind in ("build", "generation", "sampler_overhead", "training_lora")
    }
    assert {entry["name"] for entry in report["sections"]} == expected
    assert [(entry["name"], entry["error"]) for entry in report["sections"] if entry["status"] != "ok"] == []
    assert report["kind"] == "cpu-tiny" and report["gpu_figures"] is False
    assert "CPU FALLBACK" in report["warning"] and "still open" in report["warning"]
    assert text.startswith("# GPU check") and f"> **{report['warning']}**" in text

    # 1. latency: the project's presets at 1, 2, 4 NFE; transformer and VAE lie inside the call's time
    generation = _gpu_check_rows(report, "generation")
    assert sorted((row["family"], row["nfe"]) for row in generation) == sorted((f, n) for f in families for n in (1, 2, 4))
    for row in generation:
        assert row["preset"] == f"{row['nfe']}nfe" and row["network_calls"] == row["nfe"]
        assert min(row["seconds"], row["transformer_s"], row["vae_s"], row["other_s"], row["peak_memory_mib"]) > 0
        assert row["transformer_s"] + row["vae_s"] + row["other_s"] == pytest.approx(row["seconds"])
        assert f"| {row['family']} | {row['nfe']} | `{row['preset']}` | {row['seconds']:.4f} |" in text

    # 2. sampler overhead: the sampler made exactly NFE transformer calls; every timing is real
    overhead = _gpu_check_rows(report, "sampler_overhead")
    assert sorted((row["family"], row["nfe"]) for row in overhead) == sorted((f, n) for f in families for n in (1, 2, 4))
    for row in overhead:
        assert row["network_calls"] == row["nfe"]
        assert min(row["sample_s"], row["adapter_calls_s"], row["transformer_calls_s"]) > 0
        assert row["sample_vs_transformer"] == pytest.approx(row["sample_s"] / row["transformer_calls_s"])

    # 3. training: TwinFlow makes more network calls per step than flow matching, on the same model
    training = _gpu_check_rows(report, "training_lora") + _gpu_check_rows(report, "training_full")
    groups = {(row["family"], row["mode"]) for row in training}
    assert groups == {("z_image", "lora"), ("qwen_image", "lora"), ("z_image", "full")}
    for family, mode in groups:
        rows = [row for row in training if (row["family"], row["mode"]) == (family, mode)]
        assert all(row["error"] is None and row["seconds_per_step"] > 0 and row["peak_memory_mib"] > 0 for row in rows)
        baseline, = [row for row in rows if row["method"] == "flow_matching"]
        assert baseline["network_calls"] == 1 and baseline["time_vs_flow_matching"] == pytest.approx(1.0)
        assert all(row["network_calls"] > 1 for row in rows if row["method"] == "twinflow")
        assert len(rows) == (3 if mode == "full" else 2)
        if mode == "lora":  # only the adapters (and emb_2) train; the teacher is the second adapter
            assert 0 < baseline["trainable_parameters"] < baseline["parameters"]
            assert {row["teacher"] for row in rows} == {"none", "EMA adapter (0.99)"}
        else:
            assert {row["teacher"] for row in rows} == {"none", "the model itself", "EMA copy (0.99)"}
    assert "| qwen_image | LoRA | twinflow | EMA adapter (0.99) |" in text
    assert "| z_image | full-parameter | twinflow | EMA copy (0.99) |" in text

    # the real configurations, built on the meta device: the released models' sizes
    plan = {row["family"]: row for row in _gpu_check_rows(report, "plan")}
    assert plan["z_image"]["parameters"] == pytest.approx(6.15e9, rel=0.01)
    assert plan["qwen_image"]["parameters"] == pytest.approx(20.43e9, rel=0.01)
    assert plan["qwen_image"]["lora_rank"] == 64 and plan["qwen_image"]["lora_ema_parameters"] > 0


def test_gpu_check_skips_what_the_deadline_leaves_no_time_for(tmp_path):
    import json

    stem = tmp_path / "late"
    assert gpu_check.main(["--device", "cpu", "--deadline", "0", "--out", str(stem)]) == 0
    report = json.loads(stem.with_suffix(".json").read_text())
    assert report["sections"] and all(entry["status"] == "skipped" for entry in report["sections"])
    assert set(report["skipped"]) == {entry["name"] for entry in report["sections"]}
    assert all("deadline" in entry["reason"] or "needs build/" in entry["reason"] for entry in report["sections"])
    assert "| generation/z_image | skipped |" in stem.with_suffix(".md").read_text()


def test_gpu_check_records_a_failing_section_and_runs_the_rest(tmp_path, monkeypatch):
    import json

    def broken(*args, **kwargs):
        raise RuntimeError("diffusers API mismatch (planted)")

    monkeypatch.setattr(gpu_check, "generation_section", broken)
    stem = tmp_path / "failing"
    arguments = ["--device", "cpu", "--quick", "--families", "z_image", "--sections", "generation,sampler_overhead",
                 "--nfe", "1", "--out", str(stem)]
    assert gpu_check.main(arguments) == 0
    report = json.loads(stem.with_suffix(".json").read_text())
    status = {entry["name"]: entry for entry in report["sections"]}
    assert status["generation/z_image"]["status"] == "failed"
    assert status["generation/z_image"]["error"] == "RuntimeError: diffusers API mismatch (planted)"
    assert status["sampler_overhead/z_image"]["status"] == "ok" and status["sampler_overhead/z_image"]["rows"]
    assert status["training_lora/z_image"]["reason"] == "not selected (--sections)"
    assert report["failed"] == ["generation/z_image"]
    assert "## Failures" in stem.with_suffix(".md").read_text()


def test_gpu_check_plans_the_full_size_run_on_a_gpu(monkeypatch):
    import twinflow.devices

    monkeypatch.setattr(twinflow.devices, "resolve_device", lambda name: torch.device("cuda"))
    plan = gpu_check.resolve_plan(gpu_check.parse_args([]))
    assert plan.kind == "full-size" and plan.is_gpu_figure and plan.torch_dtype == torch.bfloat16
    assert (plan.size, plan.nfe, plan.precision, plan.lora_rank, plan.fused_adamw) == (1024, [1, 2, 4], "bf16", 64, True)
    assert (plan.train_batch, plan.train_latent, plan.train_steps % 2) == (2, 64, 0)  # 512 px; whole slice rotations
    assert plan.families == ["z_image", "qwen_image"] and plan.full_families == ["z_image"]
    assert plan.deadline_s == 480 and plan.out == "benchmarks/results/gpu_check" and plan.layers is None
    assert gpu_check.transformer_overrides("qwen_image", None) == {}  # the real configurations, all blocks
    quick_look = gpu_check.resolve_plan(gpu_check.parse_args(["--layers", "2", "--families", "qwen_image"]))
    assert quick_look.kind == "truncated" and not quick_look.is_gpu_figure and quick_look.full_families == []
    assert quick_look.out == "benchmarks/results/gpu_check_cuda_truncated"  # never over the GPU report
    assert gpu_check.transformer_overrides("z_image", 2) == {"n_layers": 2, "n_refiner_layers": 2}


# ---- benchmarks/demo_recipe.py: recipes on the command line, the table and the curve ------------------
def test_demo_recipe_parsing_table_and_plot(tmp_path):
    import demo_recipe

    parsed = demo_recipe.parse_recipe("new=configs/mnist_twinflow.yaml,a.b=1,c=2")
    assert parsed == ("new", Path("configs/mnist_twinflow.yaml"), ["a.b=1", "c=2"])
    with pytest.raises(SystemExit, match="NAME=CONFIG"):
        demo_recipe.parse_recipe("configs/mnist_twinflow.yaml")
    row = {"accuracy": 0.9, "frechet_distance": 30.0, "precision": 0.8, "recall": 0.6}

    def point(step, seconds, fd):
        return {"step": step, "training_seconds": seconds, "rows": {"1nfe": {**row, "frechet_distance": fd}}}

    results = {
        "machine": "test", "command": "python benchmarks/demo_recipe.py", "num": 500, "presets": ["1nfe"],
        "real": {"accuracy": 0.98, "frechet_distance": 10.0},
        "recipes": {"old": {"config": "a.yaml", "overrides": [], "command_seconds": 300.0,
                            "model": [point(100, 50.0, 80.0), point(200, 100.0, 40.0)], "ema": [point(200, 100.0, 38.0)]}},
    }
    text = demo_recipe.markdown(results)
    assert "| old | model | 200 | 100 | 0.900 / 40.0 |" in text and "| old | ema | 200 | 100 | 0.900 / 38.0 |" in text
    assert "took 300 s" in text
    demo_recipe.plot(results, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 1000
