"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., 2024, arXiv:2402.09353).

DoRA splits the adapted weight into a magnitude and a direction, and lets LoRA adapt the direction only::

    W' = m * (W + s B A) / ||W + s B A||_c          m: one trainable scalar per output feature

`||.||_c` is the norm of each output feature's row (for an embedding: of each embedding dimension's column),
and m starts at ||W + s B A||_c, so the adapted model starts equal to the base. As section 4.3 of the paper
suggests, the norm is treated as a constant in backpropagation (detached): it follows the update, but sends no
gradient. With g = m / ||W + s B A||_c (detached), a linear layer's output is computed from the base output
`y = W x + b` instead of from W' (as peft does, so no second matmul with W)::

    h = y + (g - 1) * (y - b) + g * s * B (A x)

With dropout in training, `y - b` is recomputed as W dropout(x), since the low-rank path sees dropout(x) and the
direction must scale the same input. An embedding multiplies the base lookup: h = g * E[x] + g * s * (A[x] B).
A convolution (nn.Conv1d/2d/3d, as peft's `DoraConv2dLayer`) does the same per output channel: the norm is taken
over each channel's kernel slice (in/groups x k...), and m is stored shaped (1, out, 1, ...) as in peft's files.

Merging writes W' into the base weight (W <- g * (W + s B A), with the norm taken on the unmerged W); unmerging
divides by the same g, kept from the merge. The trainable vector is saved as `<module>.lora_magnitude_vector`
(peft's key). This file holds the DoRA arithmetic; `LoraLayer` (methods/lora/lora.py) calls it for adapters that
have a magnitude vector.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.core.layers import embedding_lookup
from deltatune.methods.lora import conv as lora_conv
from deltatune.quantization import readable_weight


def is_dora(adapter: nn.Module) -> bool:
    """True for a LoRA adapter that carries a DoRA magnitude vector."""
    return "lora_magnitude_vector" in adapter._parameters


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The wrapped layer's weight in its own layout, dequantised for a bitsandbytes base (QDoRA)."""
    return readable_weight(layer.base_layer)


def _rows(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """`weight` (stored layout) with one row per magnitude entry: Conv1D and embeddings store it transposed, a
    conv kernel (out, in, k...) is flattened to (out, in * k...)."""
    if layer.kind == "conv":
        return weight.flatten(1)
    return weight if layer.kind == "linear" else weight.T


def _factor_view(layer: nn.Module, factor: torch.Tensor) -> torch.Tensor:
    """The per-feature factor (features,) shaped to scale the stored weight's rows or columns."""
    if layer.kind == "conv":  # (out, 1, 1, ...) for a kernel (out, in, k...)
        return factor.view(-1, *[1] * (layer.base_layer.weight.dim() - 1))
    return factor.view(-1, 1) if layer.kind == "linear" else factor.view(1, -1)


def layout_delta(layer: nn.Module, adapter: nn.Module) -> torch.Tensor:
    """The plain LoRA update s B A of `adapter` in the stored layout of the base weight."""
    if layer.kind == "conv":  # peft's DoRA conv takes the norm of B∘A built this way (see `dora_direction`)
        shape = layer.base_layer.weight.shape
        return lora_conv.dora_direction(adapter.lora_A, adapter.lora_B, shape) * adapter.scaling
    delta = adapter.delta_weight()  # (out, in); embeddings: (vocab, dim), already their stored layout
    return delta.T if layer.kind == "conv1d" else delta


def weight_norm(layer: nn.Module, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """||W + s B A||_c, (features,), for the base weight and the scaled update, both in the stored layout."""
    with torch.no_grad():  # a constant in backpropagation (paper, section 4.3)
        return torch.linalg.norm(_rows(layer, weight + delta), dim=1)


def init_magnitude(layer: nn.Module, name: str) -> None:
    """Give adapter `name` its magnitude vector m = ||W + s B A||_c, so the model starts equal to the base."""
    adapter = layer.adapters[name]
    delta = layout_delta(layer, adapter)
    dtype = delta.dtype
    weight = base_weight(layer).to(dtype)
    norm = weight_norm(layer, weight, delta.to(weight.device))  # (features,)
    if layer.kind == "conv":  # peft's shape for a conv's magnitude, which its files hold: (1, out, 1, ...)
        norm = norm.view(1, -1, *[1] * (weight.dim() - 2))
    adapter.lora_magnitude_vector = nn.Parameter(norm.to(dtype))


def magnitude(adapter: nn.Module) -> torch.Tensor:
    """m as (features,), whatever shape it is stored in."""
    return adapter.lora_magnitude_vector.view(-1)


def _scale(layer: nn.Module, adapter: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """g = m / ||W + s B A||_c, (features,), with the norm detached."""
    with torch.no_grad():
        delta = layout_delta(layer, adapter).to(weight.dtype)
    return magnitude(adapter) / weight_norm(layer, weight, delta)


def linear_forward(layer: nn.Module, adapter: nn.Module, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """`result` (the base output, bias included) updated by DoRA adapter `adapter` on a Linear / Conv1D layer."""
    x = x.to(adapter.lora_A.weight.dtype)
    weight = base_weight(layer).to(x.dtype)
    scale = _scale(layer, adapter, weight).view(1, -1)  # (1, out)
    dropout_in_play = layer.training and not isinstance(adapter.dropout, nn.Identity)
    if dropout_in_play:  # the direction must scale the input the low-rank path sees: W dropout(x)
        x = adapter.dropout(x)
        base_out = F.linear(x, _rows(layer, weight))  # (B, T, out), no bias
    else:
        bias = layer.base_layer.bias
        base_out = result - bias if bias is not None else result  # (B, T, out)
    low_rank = adapter.lora_B(adapter.lora_A(x))  # (B, T, out)
    update = (scale - 1) * base_out + scale * low_rank * adapter.scaling
    return (result + update).to(result.dtype)


def conv_forward(layer: nn.Module, adapter: nn.Module, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """`result` (the base output, bias included) updated by DoRA adapter `adapter` on a nn.Conv1d/2d/3d."""
    base = layer.base_layer
    x = x.to(adapter.lora_A.weight.dtype)
    channels = (1, -1, *[1] * (result.dim() - 2))  # a per-channel vector against (B, out, spatial...)
    scale = _scale(layer, adapter, base.weight.to(x.dtype)).view(channels)
    if layer.training and not isinstance(adapter.dropout, nn.Identity):  # W dropout(x), as in `linear_forward`
        x = adapter.dropout(x)
        conv = lora_conv.conv_fn(base.weight)
        base_out = conv(x, base.weight.to(x.dtype), None, base.stride, base.padding, base.dilation, base.groups)
    else:
        base_out = result - base.bias.view(channels) if base.bias is not None else result  # (B, out, spatial...)
    low_rank = adapter.lora_B(adapter.lora_A(x))  # (B, out, spatial...)
    update = (scale - 1) * base_out + scale * low_rank * adapter.scaling
    return (result + update).to(result.dtype)


def embedding_forward(
    layer: nn.Module, adapter: nn.Module, x: torch.Tensor, result: torch.Tensor, embed_scale: torch.Tensor | float
) -> torch.Tensor:
    """`result` (the base lookup) updated by DoRA adapter `adapter` on an embedding (no dropout, as peft)."""
    base = layer.base_layer
    weight = base.weight.to(adapter.lora_embedding_A.dtype)
    scale = _scale(layer, adapter, weight)  # (dim,)
    after_a = embedding_lookup(base, x, adapter.lora_embedding_A.T)  # (B, T, r)
    update = scale * (after_a @ adapter.lora_embedding_B.T) * adapter.scaling  # (B, T, dim)
    return (scale * result + update * embed_scale).to(result.dtype)


def unmerged_weight(layer: nn.Module) -> torch.Tensor:
    """The base weight (stored layout, adapter dtype) with every merged adapter taken out, on a copy."""
    weight = base_weight(layer).detach().clone()
    for name in reversed(layer.merged_adapters):
        weight = weight + layer.unmerge_delta(name, weight)
    return weight


def merge_delta(layer: nn.Module, name: str) -> torch.Tensor:
    """What to add to the current weight to merge DoRA adapter `name`: g * (W + s B A) - W (peft's merge).

    The norm is taken on the unmerged base weight, as forward sees it; g is kept on the adapter for unmerge.
    """
    adapter = layer.adapters[name]
    with torch.no_grad():
        delta = layout_delta(layer, adapter)  # (stored layout)
        current = base_weight(layer).detach().to(delta.dtype)
        norm = weight_norm(layer, unmerged_weight(layer).to(delta.dtype), delta)
        factor = _factor_view(layer, magnitude(adapter) / norm)
        adapter.merged_norm = norm  # a plain attribute: not a parameter, not saved
        return factor * (current + delta) - current


def unmerge_delta(layer: nn.Module, name: str, current: torch.Tensor) -> torch.Tensor:
    """What to add to `current` (stored layout) to unmerge DoRA adapter `name`: W / g - s B A - W."""
    adapter = layer.adapters[name]
    with torch.no_grad():
        delta = layout_delta(layer, adapter)
        current = current.to(delta.dtype)  # worked in the adapter's precision, rounded once when added (as peft)
        factor = _factor_view(layer, magnitude(adapter) / adapter.merged_norm)
        return current / factor - delta - current


def refuse_mixed_batch(layer: nn.Module, row_adapters) -> None:
    """peft refuses `adapter_names=` with a DoRA adapter in the batch; so does deltatune (same rule)."""
    for name in dict.fromkeys(row_adapters):
        if name in layer.adapters and is_dora(layer.adapters[name]):
            raise ValueError(
                f"Cannot pass `adapter_names` when DoRA is enabled: adapter_names includes the DoRA adapter {name!r} "
                "(use_dora=True), as in peft: DoRA rescales "
                "the base output per adapter, which a mixed batch does not do; run its rows separately after "
                f"set_adapter({name!r})"
            )
