"""The small-GPU ladder of ``generate``, on the CPU (issue 17): offload hooks and GGUF weights.

Offload: diffusers' model and group offload hooks, run CPU-to-CPU here (the same hooks move
weights between CPU and GPU), must leave the images exactly as they are: the target-time hook and
``emb_2`` ride along. (Sequential offload fails CPU-to-CPU inside accelerate's hook, on any model
of the pipeline, TwinFlow or not; it is offered, untested here.)

GGUF: a quantized transformer as a TwinFlow backbone.

The tiny Qwen-Image transformer (with trained-looking ``time_text_embed_2``) is written to a GGUF
file as the community's converters write one: diffusers' key names (Qwen-Image's single-file
mapping is the identity), every 2-d weight whose rows are whole Q8_0 blocks (32 values) in Q8_0,
the rest in F32, the second embedding included. diffusers' GGUF backend loads it; the adapter
keeps ``emb_2`` unquantized and must stay close to the unquantized model.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

gguf = pytest.importorskip("gguf")
pytest.importorskip("diffusers")

from twinflow.adapters import load_adapter  # noqa: E402
from twinflow.adapters.quantized import is_quantized  # noqa: E402
from twinflow.generation import TextToImage  # noqa: E402
from twinflow.testing import build_tiny_folder  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

TOLERANCE = 0.02  # max |quantized - float| of F over max |float F| (measured: 0.004 with Q8_0)


def write_gguf(weights: dict[str, torch.Tensor], path, skip: str | None = None) -> None:
    writer = gguf.GGUFWriter(str(path), arch="qwen_image")
    for name, tensor in weights.items():
        if skip and name.startswith(skip):
            continue
        array = tensor.float().numpy()
        if array.ndim == 2 and array.shape[1] % 32 == 0:
            packed = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    folder = build_tiny_folder(root / "qwen", "qwen_image", extra_weights=True)
    weights = {}
    for file in sorted((folder / "transformer").glob("*.safetensors")):
        weights |= load_file(str(file))
    write_gguf(weights, root / "qwen_q8_0.gguf")
    write_gguf(weights, root / "qwen_q8_0_no_emb_2.gguf", skip="time_text_embed_2.")
    return folder, root / "qwen_q8_0.gguf", root / "qwen_q8_0_no_emb_2.gguf"


def _inputs():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=generator)
    return x, {"prompt_embeds": torch.randn(3, 5, 16, generator=generator)}


def test_the_quantized_adapter_stays_close_and_keeps_emb_2_unquantized(files):
    folder, quantized_file, _ = files
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # emb_2 comes from the GGUF file: no copy warning
        quantized = load_adapter(folder, gguf=quantized_file)
    plain = load_adapter(folder)
    assert is_quantized(quantized.transformer) and not is_quantized(quantized.second_embedding)
    assert {parameter.dtype for parameter in quantized.second_embedding.parameters()} == {torch.float32}
    x, condition = _inputs()
    times, targets = torch.tensor([1.0, 0.7, -0.6]), torch.tensor([0.0, 0.3, -0.2])
    with torch.no_grad():
        expected, got = plain(x, times, targets, condition), quantized(x, times, targets, condition)
        at_t = quantized(x, times, times, condition)
    error = float((got - expected).abs().max() / expected.abs().max())
    assert 0 < error < TOLERANCE, error
    assert float((got - at_t).abs().max()) > 10 * float((got - expected).abs().max())  # the target time still acts
    # emb_2 equals the released weights (dequantized Q8_0: within a block's rounding)
    for (name, ours), theirs in zip(quantized.second_embedding.state_dict().items(), plain.second_embedding.state_dict().values()):
        assert torch.allclose(ours, theirs, atol=2e-2 * float(theirs.abs().max()) + 1e-6), name


def test_a_gguf_file_without_emb_2_takes_the_patch_file(files, tmp_path):
    from safetensors.torch import save_file

    from twinflow.adapters.weights import extra_state_dict

    folder, quantized_file, bare_file = files
    plain = load_adapter(folder)
    patch = tmp_path / "patch.safetensors"
    save_file({f"transformer.{name}": value.contiguous() for name, value in extra_state_dict(plain).items()}, str(patch))
    patched = load_adapter(folder, gguf=bare_file, extra_weights=patch)
    for ours, theirs in zip(patched.second_embedding.state_dict().values(), plain.second_embedding.state_dict().values()):
        assert torch.equal(ours, theirs)  # the patch loads exactly; only the transformer is quantized


def test_generate_from_a_gguf_file_is_close_to_the_folder(files, tmp_path):
    folder, quantized_file, _ = files
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        images = {}
        for name, options in (("float", {}), ("gguf", {"gguf": quantized_file})):
            pipe = TextToImage.from_pretrained(folder, device="cpu", **options)
            result = pipe.generate(["a red fox"], preset="2nfe", width=16, height=16, seed=1, progress=False)
            images[name] = np.asarray(result.images[0], dtype=np.int16)
    difference = np.abs(images["float"] - images["gguf"])
    assert difference.max() <= 8 and difference.mean() < 2, (difference.max(), difference.mean())
    with pytest.raises(FileNotFoundError, match="not a .gguf file"):
        load_adapter(folder, gguf=tmp_path / "missing.gguf")


@pytest.mark.parametrize("mode", ["model", "group"])
def test_offload_hooks_leave_the_images_unchanged(mode, files):
    from twinflow.generation.loading import enable_offload, offload_mode

    from twinflow.diffusers_compat import diffusers_version

    has_accelerator = hasattr(torch, "accelerator") and torch.accelerator.current_accelerator() is not None
    if mode == "group" and diffusers_version() < (0, 41) and not has_accelerator:
        pytest.skip("diffusers < 0.41 group offload asks torch.accelerator for a device, which a CPU-only machine lacks")
    folder = files[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = TextToImage.from_pretrained(folder, device="cpu")
        offloaded = TextToImage.from_pretrained(folder, device="cpu")
    enable_offload(offloaded.pipeline, mode, torch.device("cpu"))  # what offload=mode does on a GPU
    images = [np.asarray(pipe.generate(["a red fox"], preset="2nfe", width=16, height=16, seed=3, progress=False).images[0])
              for pipe in (plain, offloaded)]
    assert np.array_equal(images[0], images[1])
    assert offload_mode(True) == "model" and offload_mode(None) is None
    with pytest.raises(ValueError, match="offload must be one of"):
        offload_mode("disk")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        TextToImage.from_pretrained(folder, device="cpu", offload=mode)


def test_the_command_line_generates_from_a_gguf_file_beside_a_folder_without_transformer_weights(files, tmp_path):
    """A base folder whose transformer/ holds only config.json (the user has the GGUF file instead)."""
    import shutil

    from twinflow.cli import main

    folder, quantized_file, _ = files
    light = tmp_path / "light"
    shutil.copytree(folder, light)
    for weights in (light / "transformer").glob("*.safetensors"):
        weights.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main([str(item) for item in ("generate", "--model", light, "--gguf", quantized_file, "--prompt", "a red fox",
                                            "--size", "16x16", "--preset", "1nfe", "--device", "cpu", "--out", tmp_path / "out")])
    assert code == 0 and (tmp_path / "out" / "0_0.png").is_file()
