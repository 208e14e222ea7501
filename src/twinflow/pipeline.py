"""Load a trained checkpoint and sample from it: ``twinflow.load(...)`` then ``.sample(...)``."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from twinflow.checks import is_integer
from twinflow.devices import resolve_device
from twinflow.models import build_model
from twinflow.path import Path as ProbabilityPath
from twinflow.path import get_path
from twinflow.sampler import SamplerConfig, resolve_sampler, sample


@dataclass
class Samples:
    """Generated images and the labels they were asked for."""

    images: Tensor  # float32 (N, C, H, W) in [0, 1]
    labels: Tensor  # int64 (N,)
    network_calls: int  # network evaluations per image
    seconds: float  # wall time of the sampling


class ClassConditionalGenerator:
    """A class-conditional TwinFlow model ready to sample.

    The null class (index ``num_classes``) serves as the unconditional input for optional
    classifier-free guidance at sampling time.
    """

    def __init__(
        self,
        network: nn.Module,
        num_classes: int,
        image_shape: tuple[int, int, int],
        class_names: list[str] | None = None,
        path: ProbabilityPath | None = None,
        device: torch.device | str = "cpu",
        precision: str = "fp32",
    ):
        self.network = network.eval()
        self.num_classes = num_classes
        self.image_shape = tuple(image_shape)
        self.class_names = class_names or [str(index) for index in range(num_classes)]
        self.path = path if path is not None else get_path("linear")
        self.device = torch.device(device)
        self.precision = precision

    def _call(self, x: Tensor, t: Tensor, r: Tensor, labels: Tensor) -> Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            return self.network(x, t, r, labels).float()

    @torch.no_grad()
    def sample(
        self,
        labels: Tensor | list[int] | None = None,
        per_class: int | None = None,
        preset: str | SamplerConfig = "1nfe",
        seed: int = 0,
        batch_size: int = 500,
        progress: bool = False,
        **overrides,
    ) -> Samples:
        """Generate images for ``labels`` (or ``per_class`` images of every class, class-major).

        ``preset`` is a sampler preset name (``1nfe``, ``2nfe``, ``4nfe``, ``any``, ``multi``), a
        spec (``multi:steps=50``) or a :class:`~twinflow.sampler.SamplerConfig`; keyword overrides change single fields
        (``steps=8``, ``guidance_scale=1.5``). ``seed`` fixes the noise: the same call gives the
        same images.
        """
        if not _is_count(batch_size, 1):
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if labels is None:
            if per_class is None:
                raise ValueError("give labels or per_class")
            if not _is_count(per_class, 0):
                raise ValueError(f"per_class must be an integer >= 0, got {per_class!r}")
            labels = torch.arange(self.num_classes).repeat_interleave(per_class)
        labels = torch.as_tensor(labels, dtype=torch.long).flatten()
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes - 1}], got [{int(labels.min())}, {int(labels.max())}]")
        config = resolve_sampler(preset, **overrides)
        generator = torch.Generator().manual_seed(seed)
        images, calls = [], 0
        start = time.perf_counter()
        for chunk in tqdm(labels.split(batch_size), disable=not progress, desc="sampling", unit="batch"):
            noise = torch.randn(chunk.shape[0], *self.image_shape, generator=generator).to(self.device)
            chunk = chunk.to(self.device)
            result = sample(
                self._call, noise, chunk, config,
                null_cond=torch.full_like(chunk, self.num_classes), path=self.path, generator=generator,
            )
            images.append(((result.sample.float().clamp(-1, 1) + 1) / 2).cpu())
            calls = result.network_calls
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        empty = torch.zeros(0, *self.image_shape)
        return Samples(images=torch.cat(images) if images else empty, labels=labels, network_calls=calls, seconds=seconds)


def _is_count(value: object, minimum: int) -> bool:
    return is_integer(value) and value >= minimum


def load(
    checkpoint: str | Path,
    device: str | torch.device | None = "auto",
    use_ema: bool = False,
    precision: str = "fp32",
) -> ClassConditionalGenerator:
    """Load a checkpoint folder (or a run folder: its newest checkpoint) for sampling.

    ``use_ema`` picks the EMA teacher's weights when the checkpoint has them.
    """
    from twinflow.train.checkpoint import load_checkpoint, read_state  # deferred: train imports this module

    device = resolve_device(device)
    folder, state = read_state(checkpoint)  # the architecture first: a transformer is not read for nothing
    architecture = state.get("architecture")
    if not isinstance(architecture, dict) or not isinstance(architecture.get("config"), dict):
        raise ValueError(f"checkpoint {folder} has no 'architecture' entry in its state.json")
    if "num_classes" not in architecture["config"]:
        raise ValueError(
            f"checkpoint {folder} is a text-to-image checkpoint (model {architecture.get('name')!r}, family "
            f"{architecture.get('family')!r}); `twinflow sample` and twinflow.load sample class-conditional "
            f"models. Write it as a diffusers folder with `twinflow export --checkpoint {folder} --out DIR`, "
            "then `twinflow generate --model DIR --prompt ...` (or TextToImage.from_pretrained(DIR))"
        )
    stored = load_checkpoint(folder, map_location="cpu", full=False)
    network = build_model(architecture["name"], **architecture["config"])
    weights = stored.ema if use_ema and stored.ema is not None else stored.model
    if use_ema and stored.ema is None:
        print(f"note: {checkpoint} has no EMA weights (EMA decay 0); using the model weights")
    missing, unexpected = network.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {checkpoint} does not fit its architecture: missing {missing}, unexpected {unexpected}")
    dataset = stored.state.get("dataset", {})
    config = architecture["config"]
    return ClassConditionalGenerator(
        network.to(device),
        num_classes=config["num_classes"],
        image_shape=(config["image_channels"], config["image_size"], config["image_size"]),
        class_names=dataset.get("class_names"),
        path=get_path(stored.state.get("path", "linear")),
        device=device,
        precision=precision,
    )
