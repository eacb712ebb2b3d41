"""What kind of layer a module is, how wide it is, and which dtype an adapter beside it gets.

Every layer-changing method asks these questions of the module it wraps; the answers live here once so that a
new method does not repeat them (and cannot answer them differently).
"""

from __future__ import annotations

import torch
from torch import nn

QUANTIZED_LINEAR = ("Linear4bit", "Linear8bitLt")  # bitsandbytes' classes, named so bitsandbytes stays optional
FULL_PRECISION = (torch.float32, torch.float64)
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' `Conv1D` (GPT-2 and kin): a linear layer that stores W as (in, out).

    Matched by class name, so that transformers is not imported for the check (as for bitsandbytes' layers).
    """
    return type(module).__name__ == "Conv1D"


def is_quantized_linear(module: nn.Module) -> bool:
    """True for bitsandbytes' 4-bit and 8-bit linear layers."""
    return type(module).__name__ in QUANTIZED_LINEAR


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear, transformers' Conv1D, and bitsandbytes' 4/8-bit linear layers."""
    return isinstance(module, nn.Linear) or is_conv1d(module) or is_quantized_linear(module)


def is_conv(module: nn.Module) -> bool:
    """True for nn.Conv1d / Conv2d / Conv3d (not transformers' Conv1D, which is a linear layer)."""
    return isinstance(module, CONV_TYPES)


def layer_dims(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a layer, or None when it has no input and output width deltatune knows how to read.

    Linear and bitsandbytes layers: features; Conv1D: its (in, out) weight; nn.Embedding: (vocab, dim);
    nn.Conv1d/2d/3d: channels. nn.MultiheadAttention is no single layer (LoRA adapts its packed in_proj).
    """
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    if is_conv(module):
        return module.in_channels, module.out_channels
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.in_features, module.out_features
    return None


def _reference_tensor(base_layer: nn.Module) -> torch.Tensor | None:
    """The tensor whose dtype stands for a layer: its weight (MultiheadAttention: in_proj), else its first."""
    for name in ("weight", "in_proj_weight"):
        tensor = getattr(base_layer, name, None)
        if isinstance(tensor, torch.Tensor):
            return tensor
    return next(base_layer.parameters(), None)


def adapter_dtype(base_layer: nn.Module | torch.Tensor) -> torch.dtype:
    """The dtype of an adapter beside `base_layer` (a layer, or the weight it stands for).

    The base's own dtype when it is fp32 / fp64; fp32 over a half-precision or 4/8-bit base (as peft's
    `autocast_adapter_dtype`): small updates vanish in bf16, and packed integer codes are no dtype to train in.
    """
    tensor = base_layer if isinstance(base_layer, torch.Tensor) else _reference_tensor(base_layer)
    if tensor is None or tensor.dtype not in FULL_PRECISION:
        return torch.float32
    return tensor.dtype
