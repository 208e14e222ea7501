"""benchmarks/distill.py's pieces on a seconds-long configuration, and its claim in miniature.

The pieces: the base is built once and reused while its settings stay the same (a changed
setting rebuilds it); the run plan spends one budget per run; the samples' npz format; the
verdict logic; an ablation's recipe. The claim: a few TwinFlow steps from a pretrained
(flow-matching) base make its one-step samples better than the base's own one-step (Euler)
samples, which are the blurry average of the caption's digits: closer, as a distribution, to the
cached latents of the data (energy distance in latent space).
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import distill  # noqa: E402

from twinflow.adapters import load_adapter  # noqa: E402
from twinflow.data import CachedLatents  # noqa: E402
from twinflow.sampler import sample, sampler_from_spec  # noqa: E402
from twinflow.train.checkpoint import list_checkpoints  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

# 24 digits (+ 2 with the null prompt), a 2-block transformer of width 64, a barely trained VAE:
# the latents need not decode well for these tests, which compare in latent space.
SMOKE = distill.Settings(
    vae_steps=2, base_steps=300, run_steps=80, checkpoints=1, samples=40, digits=24, batch_size=16, width=64, layers=2,
)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> distill.Base:
    distill.quiet_libraries()
    return distill.prepare_base(tmp_path_factory.mktemp("distill"), SMOKE)


def test_the_base_is_built_once_and_reused_while_its_settings_hold(base, monkeypatch):
    assert not base.reused and (base.export / "model_index.json").is_file()
    assert base.record["steps"] == SMOKE.base_steps and base.record["identity"] == SMOKE.base_identity()
    weights = base.export / "transformer" / "diffusion_pytorch_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = distill.prepare_base(base.work, SMOKE)
    assert again.reused and again.record == base.record and weights.stat().st_mtime_ns == stamp
    # a setting of the base (not a run's budget) changes the identity and starts a rebuild
    assert replace(SMOKE, run_seconds=1.0).base_identity() == SMOKE.base_identity()
    changed = replace(SMOKE, seed=1)
    assert changed.base_identity() != SMOKE.base_identity()

    class Rebuilding(Exception):
        pass

    def refuse(*args, **kwargs):
        raise Rebuilding

    monkeypatch.setattr(distill, "digit_images", refuse)
    with pytest.raises(Rebuilding):
        distill.prepare_base(base.work / "elsewhere", SMOKE)  # nothing cached there
    record = json.loads((base.work / "base" / "identity.json").read_text())
    assert record["identity"] == SMOKE.base_identity()


def test_every_run_gets_the_same_budget():
    costs = {"twinflow": 0.68, "twinflow_lora": 0.82, "flow_matching": 0.33}
    steps = {name: distill.steps_for(300.0, cost) for name, cost in costs.items()}
    for name, cost in costs.items():
        assert steps[name] * cost == pytest.approx(300.0, abs=cost / 2)
    assert steps["flow_matching"] > 2 * steps["twinflow"] * 0.95
    assert distill.steps_for(0.1, 5.0) == 1
    with pytest.raises(ValueError, match="positive budget"):
        distill.steps_for(0.0, 1.0)


def test_samples_are_28_by_28_digits_in_an_npz(tmp_path):
    from PIL import Image

    images, labels = distill.digit_images(replace(SMOKE, digits=12))
    pixels = ((distill.padded_rgb(images) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    decoded = distill.digits_from_images([Image.fromarray(image) for image in pixels])  # what generation returns
    assert decoded.shape == (12, 1, 28, 28) and decoded.dtype == torch.float32
    torch.testing.assert_close(decoded, (images + 1) / 2, atol=1 / 255, rtol=0)
    path = distill.save_samples(tmp_path / "samples" / "twinflow_1nfe.npz", decoded, labels)
    stored = np.load(path)
    assert sorted(stored.files) == ["images", "labels"]
    assert stored["images"].dtype == np.float32 and stored["images"].shape == (12, 1, 28, 28)
    assert stored["labels"].dtype == np.int64 and np.array_equal(stored["labels"], labels.numpy())
    assert 0 <= stored["images"].min() and stored["images"].max() <= 1
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        distill.save_samples(tmp_path / "bad.npz", decoded[:, :, :27], labels)
    assert distill.evaluation_labels(20).tolist() == [digit for digit in range(10) for _ in range(2)]


def _row(fd, accuracy=0.9, precision=0.8, recall=0.5):
    return {"frechet_distance": fd, "accuracy": accuracy, "precision": precision, "recall": recall}


def test_verdicts_follow_the_targets():
    results = {
        "minutes": 50.0, "quick": False,
        "base": {"scores": {"1nfe": _row(900.0), "2nfe": _row(400.0), "4nfe": _row(100.0), "multi50": _row(20.0, 0.95)}},
        "runs": {
            "twinflow": {"scores": {"1nfe": _row(23.0, 0.94, 0.85, 0.6)}},
            "rcgm": {"scores": {"1nfe": _row(30.0, 0.94, 0.90, 0.5)}},
            "twinflow_lora": {"scores": {"1nfe": _row(30.0)}},
            "twinflow_lora_single": {"scores": {"1nfe": _row(45.0)}},
        },
    }
    verdicts = {target: met for target, met, _ in distill.verdicts(results)}
    assert verdicts["the whole run takes at most 60 minutes on 2 CPU cores"] is True
    assert verdicts["TwinFlow 1-NFE Fréchet distance <= 1.2x the base's at 50 NFE"] is True  # 1.15x
    assert verdicts["... moonshot: <= 1.0x"] is False
    assert verdicts["TwinFlow 1-NFE class accuracy at most 2 points below the base's at 50 NFE"] is True
    assert verdicts["TwinFlow 1-NFE better than RCGM 1-NFE on Fréchet distance, precision and recall"] is False  # precision
    assert verdicts["TwinFlow 1-NFE better than the base at 1, 2 and 4 NFE (Fréchet distance)"] is True
    assert verdicts["TwinFlow LoRA (second embedding) 1-NFE Fréchet distance within 1.2x of full-parameter"] is False  # 1.30x
    assert verdicts["single-embedding LoRA (the reference's t - r/2) measured against the second embedding"] is None
    results["quick"], results["minutes"] = True, 30.0
    assert distill.verdicts(results)[0] == ("the whole run takes at most 25 minutes on 2 CPU cores", False, "30.0 min")
    del results["runs"]["rcgm"], results["runs"]["twinflow_lora"]  # a partial run: what is missing is left out
    targets = [target for target, _, _ in distill.verdicts(results)]
    assert not any("RCGM" in target or "within 1.2x" in target for target in targets)


def test_an_ablation_replaces_only_what_it_names():
    import distill_ablations

    recipe = distill_ablations.variant("barron", {"from": "twinflow", "objective": {"loss": "barron"}, "learning_rate": 1e-3})
    source = distill.RECIPES["twinflow"]
    assert recipe.name == "barron" and recipe.learning_rate == 1e-3 and recipe.samplers == source.samplers
    assert recipe.objective == {**source.objective, "loss": "barron"} and source.objective["loss"] == "l2"
    split = distill_ablations.variant("split", {"phases": [[0.4, {"rectify_coefficient": 0.0}], [0.6, {}]]})
    assert [share for share, _ in split.objective] == [0.4, 0.6]
    assert split.objective[0][1] == {**source.objective, "rectify_coefficient": 0.0} and split.objective[1][1] == source.objective
    assert [phase["steps"] for phase in distill.phases(split.objective, 10)] == [4, 6]
    lora = distill_ablations.variant("rank_8", {"from": "twinflow_lora", "lora": {"rank": 8}})
    assert lora.lora == {**distill.RECIPES["twinflow_lora"].lora, "rank": 8} and lora.single_time_embedding is False


def _energy_distance(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """Energy distance ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` of two sets of latents (0 for equal
    distributions; within-set means over distinct pairs). Unlike a nearest-neighbour distance it
    penalises samples collapsed onto the caption's average latent."""
    x, y = samples.flatten(1), reference.flatten(1)

    def within(points: torch.Tensor) -> torch.Tensor:
        return torch.cdist(points, points).sum() / (len(points) * (len(points) - 1))

    return float(2 * torch.cdist(x, y).mean() - within(x) - within(y))


def test_a_few_twinflow_steps_improve_the_bases_one_step_samples(base, tmp_path):
    run = distill.train_run(base, "twinflow", SMOKE, SMOKE.run_steps)  # the benchmark's recipe, 80 steps
    export = distill.export_checkpoint(list_checkpoints(run)[-1], tmp_path / "twinflow")
    cache = CachedLatents(base.cache)
    latents, condition = cache[torch.arange(len(cache))]  # every cached caption, the null-prompt ones too
    draws = 8  # noises per caption
    rows = torch.arange(len(cache)).repeat_interleave(draws)
    noise = torch.randn((len(rows), *latents.shape[1:]), generator=torch.Generator().manual_seed(0))
    condition = {key: value[rows].float() for key, value in condition.items()}
    distances = {}
    for name, folder, spec in (("base 1 step", base.export, "multi:steps=1"), ("base 20 steps", base.export, "multi:steps=20"),
                               ("twinflow 1 step", export, "1nfe")):
        adapter = load_adapter(folder).eval()
        with torch.no_grad():
            samples = sample(adapter, noise, condition, sampler_from_spec(spec)).sample
        distances[name] = _energy_distance(samples, latents.float())
    # the metric sees what many steps buy the base (its one Euler step lands on the caption's average latent) ...
    assert distances["base 20 steps"] < 0.8 * distances["base 1 step"], distances
    # ... and TwinFlow's one step gets most of it (measured: 4.55 -> 2.50, the base's 20 steps 2.49)
    assert distances["twinflow 1 step"] < 0.7 * distances["base 1 step"], distances
