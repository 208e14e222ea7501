"""Turn the benchmark's ``report.json`` into ``report.md`` and two PNG plots, with target verdicts."""

from __future__ import annotations

from pathlib import Path

from methods import METHODS, WARM_START

LABELS = {"twinflow": "TwinFlow", "rcgm": "RCGM (no TwinFlow terms)", "flow_matching": "flow matching"}
COLOURS = {"twinflow": "tab:red", "rcgm": "tab:blue", "flow_matching": "tab:green"}

# Targets of the evaluation issue.
MIN_ONE_STEP_ACCURACY = 0.95
MAX_DISTANCE_RATIO_TO_MULTI_STEP = 1.5
MIN_SPEED_RATIO = 40.0
MAX_SAMPLER_OVERHEAD = 0.10


def final_scores(results: dict) -> dict[str, dict]:
    """Each method's newest checkpoint scores, by method."""
    final = {}
    for entry in results["scores"]:
        if entry["method"] != WARM_START and entry["step"] >= final.get(entry["method"], {"step": -1})["step"]:
            final[entry["method"]] = entry
    return final


def _row(entry: dict, spec: str) -> dict | None:
    return next((row for row in entry["rows"] if row["preset"] == spec), None)


def one_step_spec(method: str) -> str:
    return "multi:steps=1" if method == "flow_matching" else "1nfe"


def verdicts(results: dict) -> list[tuple[str, bool | None, str]]:
    """``(target, met, measured)`` for each target; ``met`` is None when it could not be measured."""
    final = final_scores(results)
    twinflow = _row(final["twinflow"], "1nfe") if "twinflow" in final else None
    rcgm = _row(final["rcgm"], "1nfe") if "rcgm" in final else None
    multi = _row(final["flow_matching"], "multi:steps=50") if "flow_matching" in final else None
    checks: list[tuple[str, bool | None, str]] = []
    if twinflow:
        checks.append((f"TwinFlow 1-NFE class accuracy >= {MIN_ONE_STEP_ACCURACY:.0%}",
                       twinflow["accuracy"] >= MIN_ONE_STEP_ACCURACY, f"{twinflow['accuracy']:.3f}"))
    if twinflow and multi:
        ratio = twinflow["frechet_distance"] / multi["frechet_distance"]
        checks.append((f"TwinFlow 1-NFE Fréchet distance within {MAX_DISTANCE_RATIO_TO_MULTI_STEP}x of flow matching at 50 NFE",
                       ratio <= MAX_DISTANCE_RATIO_TO_MULTI_STEP,
                       f"{twinflow['frechet_distance']:.1f} vs {multi['frechet_distance']:.1f} ({ratio:.2f}x)"))
    multi_rows = [row for entry in results["scores"] if entry["method"] == "flow_matching"
                  for row in entry["rows"] if row["preset"] == "multi:steps=50"]
    if twinflow and len(multi_rows) > 1:
        best = min(multi_rows, key=lambda row: row["frechet_distance"])
        ratio = twinflow["frechet_distance"] / best["frechet_distance"]
        checks.append(("the same, against the best flow-matching checkpoint at 50 NFE (checkpoints vary)",
                       ratio <= MAX_DISTANCE_RATIO_TO_MULTI_STEP,
                       f"{twinflow['frechet_distance']:.1f} vs {best['frechet_distance']:.1f} ({ratio:.2f}x)"))
    if twinflow and rcgm:
        better = twinflow["frechet_distance"] < rcgm["frechet_distance"] and twinflow["precision"] > rcgm["precision"]
        checks.append(("TwinFlow 1-NFE better than RCGM 1-NFE on Fréchet distance and precision", better,
                       f"FD {twinflow['frechet_distance']:.1f} vs {rcgm['frechet_distance']:.1f}, "
                       f"precision {twinflow['precision']:.3f} vs {rcgm['precision']:.3f}"))
    sampling = {row["sampler"]: row for row in results.get("sampling_cost", [])}
    if "1nfe" in sampling and "multi:steps=50" in sampling:
        speed = sampling["1nfe"]["images_per_second"] / sampling["multi:steps=50"]["images_per_second"]
        checks.append((f"1-NFE sampling >= {MIN_SPEED_RATIO:.0f}x faster than 50-NFE", speed >= MIN_SPEED_RATIO, f"{speed:.1f}x"))
    if sampling:
        worst = max(row["overhead"] for row in sampling.values())
        checks.append((f"sampler overhead over bare forward passes <= {MAX_SAMPLER_OVERHEAD:.0%}",
                       worst <= MAX_SAMPLER_OVERHEAD, f"{worst:+.1%} (worst setting)"))
    return checks


def _mark(met: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "not measured"}[met]


def _number(value, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def markdown(results: dict, plots: dict[str, str]) -> str:
    final = final_scores(results)
    settings = results["settings"]
    lines = [
        "# Benchmark report",
        "",
        f"Machine: {results['machine']}. Date {results['date']}; the whole run took {results['minutes']:.0f} minutes.",
        f"Command: `{results['command']}`",
        "",
        "## Method comparison: the same wall-clock budget",
        "",
        f"Budget {settings['budget_minutes']:g} minutes of training per method, "
        f"{settings['warm_start_fraction']:.0%} of it a flow-matching warm start shared by all three; "
        f"the steps below spend it at the seconds per step measured in this run (training cost table). "
        f"{settings['num']} images per setting, classes balanced; digit classifier held-out accuracy "
        f"{results['classifier_test_accuracy']:.2%}. Flow matching at n NFE is n Euler steps (`multi:steps=n`).",
        "",
        "| method | warm-start steps | own steps | budgeted seconds | wall-clock training seconds |",
        "|---|---:|---:|---:|---:|",
    ]
    for method in METHODS:
        plan = results["plans"][method]
        measured = final[method]["training_seconds"] if method in final else None
        lines.append(f"| {LABELS[method]} | {plan['warm_start_steps']} | {plan['method_steps']} | "
                     f"{plan['budget_seconds']:.0f} | {_number(measured, '{:.0f}')} |")
    stretched = [LABELS[method] for method in METHODS if method in final
                 and final[method]["training_seconds"] > 1.25 * results["plans"][method]["budget_seconds"]]
    if stretched:
        lines += ["", f"Wall clock above budget for {', '.join(stretched)}: other work shared the machine during "
                      "that run. The steps, and so the training each method got, were fixed by the budget plan."]
    lines += ["", "| method | sampler | NFE | class accuracy | Fréchet distance | precision | recall | images/s |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    real = results.get("real_data")
    if real:
        lines.append(f"| real data (held-out) | - | - | {real['accuracy']:.3f} | {real['frechet_distance']:.1f} | "
                     f"{real['precision']:.3f} | {real['recall']:.3f} | - |")
    for method in METHODS:
        for row in final.get(method, {"rows": []})["rows"]:
            lines.append(f"| {LABELS[method]} | `{row['preset']}` | {row['network_calls']} | {row['accuracy']:.3f} | "
                         f"{row['frechet_distance']:.1f} | {row['precision']:.3f} | {row['recall']:.3f} | "
                         f"{_number(row['images_per_second'], '{:.0f}')} |")
    lines += ["", "| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {target} | {measured} | {_mark(met)} |" for target, met, measured in verdicts(results)]
    lines += [""] + [f"![{name}]({path})" for name, path in plots.items()]

    baseline = next(row for row in results["training_cost"] if row["objective"] == "flow_matching")
    lines += [
        "", "## Training cost (one optimizer step, batch " f"{settings['batch_size']})", "",
        f"Peak memory: {baseline['memory_kind']}, in a fresh process per objective.", "",
        "| objective | seconds / step | time ratio | network calls / step | peak memory (MB) | memory ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in results["training_cost"]:
        memory_ratio = row["peak_memory_mb"] / baseline["peak_memory_mb"] if baseline["peak_memory_mb"] else None
        lines.append(f"| {row['objective']} | {row['seconds_per_step']:.3f} | "
                     f"{row['seconds_per_step'] / baseline['seconds_per_step']:.2f}x | {row['network_calls']} | "
                     f"{row['peak_memory_mb']:.0f} | {_number(memory_ratio, '{:.2f}x')} |")
    lines += [
        "", f"## Sampling cost (trained TwinFlow network, batch {settings['sampling_batch']})", "",
        "| sampler | NFE | images/s | sampler seconds | bare forward seconds | overhead |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in results["sampling_cost"]:
        lines.append(f"| `{row['sampler']}` | {row['network_calls']} | {row['images_per_second']:.1f} | "
                     f"{row['sampler_seconds']:.2f} | {row['forward_seconds']:.2f} | {row['overhead']:+.1%} |")
    return "\n".join(lines) + "\n"


def budgeted_seconds(results: dict, method: str, step: int) -> float:
    """Training seconds of ``step`` steps at the step costs measured at the start of the run.

    The plots use this rather than the wall clock of each run: other work on the machine
    stretches the wall clock of whichever run it overlaps, not the training a method got.
    """
    plan = results["plans"][method if method != WARM_START else "flow_matching"]
    warm_cost = next(row["seconds_per_step"] for row in results["training_cost"] if row["objective"] == "flow_matching")
    warm = min(step, plan["warm_start_steps"])
    return warm * warm_cost + (step - warm) * plan["seconds_per_step"]


def _curve_points(results: dict, method: str, spec: str) -> tuple[list[float], list[dict]]:
    entries = [entry for entry in results["scores"] if entry["method"] in (method, WARM_START)]
    points = sorted(
        ((budgeted_seconds(results, method, entry["step"]) / 60, row)
         for entry in entries if (row := _row(entry, spec)) is not None),
        key=lambda point: point[0],
    )
    return [minutes for minutes, _ in points], [row for _, row in points]


def plot(results: dict, out: Path) -> dict[str, str]:
    """The two plots; returns ``{title: file name}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    final = final_scores(results)
    real = results.get("real_data")
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method, entry in final.items():
        rows = sorted(entry["rows"], key=lambda row: row["network_calls"])
        calls = [row["network_calls"] for row in rows]
        axes[0].plot(calls, [row["frechet_distance"] for row in rows], "o-", color=COLOURS[method], label=LABELS[method])
        axes[1].plot(calls, [row["accuracy"] for row in rows], "o-", color=COLOURS[method], label=LABELS[method])
    for axis, key, name in ((axes[0], "frechet_distance", "Fréchet distance (classifier features, lower is better)"),
                            (axes[1], "accuracy", "class accuracy")):
        if real:
            axis.axhline(real[key], color="grey", linestyle=":", label="real held-out digits")
        axis.set_xscale("log", base=2)
        axis.set_xlabel("network evaluations (NFE)")
        axis.set_title(name, fontsize=10)
        axis.grid(alpha=0.3)
    _finish(plt, figure, axes, "Quality against NFE, same training budget", out / "quality_vs_nfe.png")

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    series = [("twinflow", "1nfe", "-"), ("rcgm", "1nfe", "-"), ("flow_matching", "multi:steps=1", "--"),
              ("flow_matching", "multi:steps=50", "-")]
    for method, spec, style in series:
        minutes, rows = _curve_points(results, method, spec)
        if not rows:
            continue
        label = f"{LABELS[method]}, {rows[-1]['network_calls']} NFE"
        axes[0].plot(minutes, [row["frechet_distance"] for row in rows], "o" + style, color=COLOURS[method], label=label)
        axes[1].plot(minutes, [row["accuracy"] for row in rows], "o" + style, color=COLOURS[method], label=label)
    warm = [budgeted_seconds(results, WARM_START, entry["step"]) / 60 for entry in results["scores"] if entry["method"] == WARM_START]
    for axis, name in ((axes[0], "Fréchet distance (lower is better)"), (axes[1], "class accuracy")):
        if warm:
            axis.axvline(warm[0], color="grey", linestyle=":", label="end of shared warm start")
        axis.set_xlabel("training minutes (steps x measured seconds per step)")
        axis.set_title(name, fontsize=10)
        axis.grid(alpha=0.3)
    _finish(plt, figure, axes, "Quality against training time", out / "quality_vs_training_time.png")
    return {"quality against NFE": "quality_vs_nfe.png", "quality against training time": "quality_vs_training_time.png"}


def _finish(plt, figure, axes, title: str, path: Path) -> None:
    """Shared look of both figures: log-scale distance panel, legend on the accuracy panel."""
    axes[0].set_yscale("log")
    axes[1].legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def render(results: dict, out: Path) -> str:
    """Write ``report.md`` and the plots into ``out``; return the markdown."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(results, plot(results, out))
    (out / "report.md").write_text(text)
    return text
