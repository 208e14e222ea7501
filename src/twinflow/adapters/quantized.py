"""Quantized transformers (GGUF, through diffusers' GGUF backend) as TwinFlow backbones.

Small GPUs run the community's GGUF files of the TwinFlow transformers (city96-style Q8_0, Q4_K,
...). diffusers loads them with ``from_single_file(file, config=..., quantization_config=
GGUFQuantizationConfig(compute_dtype=...))``: each quantized ``nn.Linear`` becomes a ``GGUFLinear``
whose weight stays packed and is dequantized per call. The target-time hook needs nothing new:
it wraps the time embedding as on any model. Two things do:

* ``emb_2`` is made *unquantized* (:func:`unquantized_copy`): a copy of a ``GGUFLinear`` would keep
  the packed bytes, and trained float weights could not be loaded into it. The second embedding
  is small (two linears), so it costs nothing to keep it in the compute dtype;
* trained ``emb_2`` weights inside the GGUF file itself (a full TwinFlow transformer converted to
  GGUF keeps ``time_text_embed_2.*`` / ``t_embedder_2.*``, which diffusers reports as unused) are
  read and dequantized by :func:`gguf_extra_weights`.

Needs the ``gguf`` package (``pip install gguf``); nothing here imports it before a GGUF file is used.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["gguf_extra_weights", "is_quantized", "unquantized_copy"]


def _packed(parameter: Tensor) -> bool:
    return hasattr(parameter, "quant_type") and hasattr(parameter, "as_tensor")


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` holds GGUF-packed weights."""
    return any(_packed(parameter) for parameter in module.parameters())


def unquantized_copy(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A deep copy of ``module`` whose packed linears are plain ``nn.Linear`` with the
    dequantized weights (in ``dtype``, default the layer's compute dtype, else float32)."""
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    # Each packed linear is replaced by its plain twin through deepcopy's memo (packed
    # parameters themselves cannot be deep-copied).
    memo: dict[int, nn.Module] = {}
    for child in module.modules():
        weight = getattr(child, "weight", None)
        if not isinstance(child, nn.Linear) or weight is None or not _packed(weight):
            continue
        target = dtype or getattr(child, "compute_dtype", None) or torch.float32
        plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device=weight.device, dtype=target)
        with torch.no_grad():
            plain.weight.copy_(dequantize_gguf_tensor(weight).to(target))
            if child.bias is not None:
                plain.bias.copy_(dequantize_gguf_tensor(child.bias).to(target))
        memo[id(child)] = plain
    return copy.deepcopy(module, memo)


def gguf_extra_weights(path: str | Path, prefix: str) -> dict[str, Tensor]:
    """The tensors named ``prefix.*`` (e.g. ``time_text_embed_2``) in a GGUF file, dequantized to
    float32; only those tensors are copied out of the memory-mapped file."""
    import gguf
    from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_gguf_tensor

    plain_types = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
    tensors = {}
    for tensor in gguf.GGUFReader(str(path)).tensors:
        if not tensor.name.startswith(prefix + "."):
            continue
        data = torch.from_numpy(tensor.data.copy())
        if tensor.tensor_type not in plain_types:
            data = dequantize_gguf_tensor(GGUFParameter(data, quant_type=tensor.tensor_type))
        tensors[tensor.name] = data.float()
    return tensors
