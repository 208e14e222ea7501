"""bf16 autocast and the objective's targets (spec 2.3, 2.5), on a small random Z-Image transformer.

The RCGM residual scales network outputs by up to 1 / dt = 100 before its clamp at 1, so bf16
rounding noise there is of the clamp's size; float32 targets (the default where the weights are
float32) bound it. Delta_v is a plain difference of two outputs: its bf16 error is far below the
clamp, and the rectify target F - Delta_v is formed in float32. The numbers come from
benchmarks/bf16_targets.py, which the README reports at a larger width.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bf16_targets  # noqa: E402

from twinflow.objective import TwinFlowObjective, objective_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def report():
    return bf16_targets.measure(width=128, layers=2, batch=24, size=8, seed=2)


def test_float32_targets_bound_the_residual_error(report):
    errors = report["residual_error"]["bf16 float32 targets"]
    # what is left is the un-amplified bf16 error of the guidance term in v
    assert errors["max"] < 0.05 and errors["rms"] < 0.01, errors


def test_bf16_targets_err_by_a_sizeable_part_of_the_clamp_on_long_jumps(report):
    """Why float32 targets: in the autocast precision R errs by tenths of the clamp of 1."""
    long_jumps = report["residual_error"]["bf16 compute targets"]["by_jump"]["0.5-1.0"]
    assert long_jumps["rms"] > 0.05 and long_jumps["max"] > 0.2, long_jumps
    float32 = report["residual_error"]["bf16 float32 targets"]["by_jump"]["0.5-1.0"]
    assert float32["rms"] < long_jumps["rms"] / 10


def test_delta_v_error_is_far_below_the_clamp(report):
    delta = report["delta_v"]
    assert delta["error_max"] < 0.05 and delta["error_rms"] < 0.05 * delta["rms_fp32"], delta


def test_target_precision_follows_the_weights():
    network = bf16_targets.tiny_z_image(64, 1)
    data = torch.randn(8, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    condition = {"prompt_embeds": torch.randn(8, 4, 64, generator=torch.Generator().manual_seed(1))}
    null = {"prompt_embeds": torch.zeros(8, 4, 64)}

    def calls(target_precision, autocast=True):
        objective = TwinFlowObjective(objective_config("twinflow", target_precision=target_precision))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return objective(network, data, condition, null, generator=torch.Generator().manual_seed(2)).network_calls

    # float32 weights under autocast: one more call (the prediction in float32) with auto/float32
    assert calls("auto") == calls("float32") == calls("compute") + 1 == 7
    assert calls("auto", autocast=False) == 6  # no autocast: everything is float32 already
    network.to(torch.bfloat16)  # a bf16 base: a float32 call is impossible
    assert calls("auto") == 6
    with pytest.raises(ValueError, match="objective.target_precision: float32 needs float32 weights"):
        calls("float32")
    with pytest.raises(ValueError, match="target_precision must be one of"):
        objective_config("twinflow", target_precision="fp64")
