"""Training curves as a PNG: the loss terms of ``metrics.jsonl`` against the step."""

from __future__ import annotations

from pathlib import Path

TERMS = ("loss", "loss_base", "loss_adversarial", "loss_rectify")


def plot_training_curves(metrics: list[dict], path: str | Path) -> Path | None:
    """Plot each logged loss term (log scale) with the phase boundaries; None without matplotlib or data."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not metrics:
        return None
    steps = [line["step"] for line in metrics]
    figure, axis = plt.subplots(figsize=(7, 4), dpi=110)
    for term in TERMS:
        # A term that is switched off in a phase is logged as 0: leave a gap there.
        values = [line.get(term) or float("nan") for line in metrics]
        if any(value == value for value in values):
            axis.plot(steps, values, label=term.replace("loss_", "L_"))
    for previous, current in zip(metrics, metrics[1:]):
        if previous.get("phase") != current.get("phase"):
            axis.axvline(current["step"], color="grey", linestyle=":", linewidth=1)
    axis.set_yscale("log")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    axis.set_title("training losses (dotted: phase change)")
    axis.legend()
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    plt.close(figure)
    return path
