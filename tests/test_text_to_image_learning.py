"""A short text-to-image TwinFlow run learns: measured before and after, through the training loop.

Data: two "captions", each with its own latent image (a horizontal or a vertical ramp, plus a
little noise), cached like real data. A random tiny Z-Image transformer trained for 100 steps
from a random start must turn one-step (1 NFE) samples into the caption's image: the squared
distance to the right image drops by more than half, and every sample is nearer to its own
caption's image than to the other one (random weights: about half are).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("diffusers")

from tiny_text_to_image import CHANNELS, SIZE, TINY, encode_prompts, identity, save_tiny_transformer  # noqa: E402

from twinflow.adapters import load_adapter  # noqa: E402
from twinflow.data import cache_dataset  # noqa: E402
from twinflow.sampler import sample, sampler_config  # noqa: E402
from twinflow.train.config import load_config  # noqa: E402
from twinflow.train.loop import train  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

RAMP = torch.linspace(-1, 1, SIZE)[None, :, None].expand(CHANNELS, SIZE, SIZE)
TARGETS = {"horizontal": RAMP, "vertical": -RAMP.transpose(1, 2)}
CAPTIONS = list(TARGETS)


class TwoImages:
    """16 items, alternating captions, each its caption's image plus noise of std 0.05."""

    description = "two captioned ramps"

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.captions = [CAPTIONS[index % 2] for index in range(16)]
        self.images = torch.stack([
            TARGETS[caption] + 0.05 * torch.randn(CHANNELS, SIZE, SIZE, generator=generator) for caption in self.captions
        ])

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, indices: torch.Tensor):
        return self.images[indices], [self.captions[int(index)] for index in indices]


def one_step_scores(network: torch.nn.Module) -> tuple[float, float]:
    """Mean squared distance of 1-NFE samples to their caption's image, and the fraction of
    samples nearer to it than to the other caption's image (8 samples per caption)."""
    captions = [CAPTIONS[0]] * 8 + [CAPTIONS[1]] * 8
    generator = torch.Generator().manual_seed(123)
    noise = torch.randn(16, CHANNELS, SIZE, SIZE, generator=generator)
    with torch.no_grad():
        images = sample(network, noise, encode_prompts(captions), sampler_config("1nfe"), generator=generator).sample
    own = torch.stack([TARGETS[caption] for caption in captions])
    other = torch.stack([TARGETS[CAPTIONS[1 - CAPTIONS.index(caption)]] for caption in captions])
    distance_own = ((images - own) ** 2).mean(dim=(1, 2, 3))
    distance_other = ((images - other) ** 2).mean(dim=(1, 2, 3))
    return float(distance_own.mean()), float((distance_own < distance_other).float().mean())


# Sana's tiny transformer (linear self-attention, captions through cross-attention only) picks up
# the caption later than Z-Image's single stream: at 100 steps its samples are the mean of the two, at 300 most are right.
STEPS = {"z_image": 100, "sana": 400}


@pytest.mark.parametrize("family", sorted(STEPS))
def test_a_short_twinflow_run_learns_one_step_text_to_image(tmp_path, family):
    transformer = save_tiny_transformer(tmp_path / "transformer", family)
    cache = tmp_path / "cache"
    cache_dataset(TwoImages(), identity, encode_prompts, cache, shard_size=16, batch_size=8, progress=False, null_prompt="")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # emb_2 copy-initialised from a plain pretrained folder
        network = load_adapter(transformer).eval()
    distance_before, right_before = one_step_scores(network)

    config = load_config(TINY, [
        f"model.path={transformer}", f"data.root={cache}", f"phases.0.steps={STEPS[family]}", "training.learning_rate=3e-3",
        "training.batch_size=8", "training.checkpoint_every=0", "training.log_every=50",
        "training.gradient_checkpointing=false",
    ])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(config, tmp_path / "run")
    network.load_state_dict(load_file(str(result.final_checkpoint / "model.safetensors")))
    distance_after, right_after = one_step_scores(network)

    assert distance_after < 0.5 * distance_before, (distance_before, distance_after)
    assert right_before < 0.8 and right_after == 1.0, (right_before, right_after)
