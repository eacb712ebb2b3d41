"""LoRA on convolutions: nn.Conv1d, nn.Conv2d and nn.Conv3d (peft's `lora.Conv1d/2d/3d`, same factors and numbers).

A frozen kernel W (out x in/groups x k...) is adapted by two convolutions run one after the other::

    h = conv(x; W) + (alpha / r) * B(A(x))
    A: the base's conv type, in -> r, with the base's kernel size, stride and padding (no bias)
    B: a 1x1 conv, r -> out, with the base's groups (bias only with lora_bias), B starts at zero

Since B is 1x1, B(A(x)) is one convolution with the kernel B∘A (out x in x k...), which is what merging adds to W
(`delta_weight`, peft's `get_delta_weight`: a matmul for a 1x1 kernel, else A's kernel convolved with B).

With `groups` > 1, B splits the r channels into groups: r must be a multiple of groups, and the update does not
have the block structure of a grouped kernel, so it cannot be merged (peft refuses too, huggingface/peft#2403).
`LoraLayer` (lora.py) calls these functions for a layer of kind "conv"; DoRA on a conv is in dora.py.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

# the functional form of each conv type, by the number of dimensions of its kernel (out, in, k...)
_CONV_FNS = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def conv_fn(weight: torch.Tensor):
    """F.conv1d / conv2d / conv3d, the one that runs a kernel shaped like `weight`."""
    return _CONV_FNS[weight.dim()]


def check_conv_rank(base: nn.Module, r: int) -> None:
    """peft's rule: B splits the r channels into the base's groups, so r must be a multiple of groups."""
    if r % base.groups != 0:
        raise ValueError(
            f"Targeting a {type(base).__name__} with groups={base.groups} and rank {r}. "
            "Currently, support is limited to conv layers where the rank is divisible by groups. "
            "Either choose a different rank or do not target this specific layer."
        )


def warn_grouped(base: nn.Module) -> None:
    """Warn once per layer, when it is wrapped, that a grouped conv's adapter cannot be merged (as peft)."""
    if base.groups > 1:
        logger.warning(
            "LoRA adapter added to ConvNd layer with groups > 1. Merging is not supported: %s(groups=%d) works "
            "unmerged only",
            type(base).__name__,
            base.groups,
        )


def check_mergeable(base: nn.Module) -> None:
    """Refuse to merge into a grouped conv, before anything changes (peft raises the same error)."""
    if base.groups > 1:
        raise NotImplementedError(
            f"Merging is not supported for _ConvNd layers with groups > 1! This {type(base).__name__} has "
            f"groups={base.groups}; keep the adapter unmerged (PeftModel works the same without merging)"
        )


def conv_factors(base: nn.Module, r: int, lora_bias: bool, dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    """(A, B) for `base`, built as peft builds them (same modules, same order), so one seed draws the same values."""
    conv = type(base)
    ones = (1,) * (base.weight.dim() - 2)
    lora_a = conv(base.in_channels, r, base.kernel_size, base.stride, base.padding, bias=False, dtype=dtype)
    lora_b = conv(r, base.out_channels, ones, ones, groups=base.groups, bias=lora_bias, dtype=dtype)
    return lora_a, lora_b


def conv_delta_weight(lora_a: nn.Module, lora_b: nn.Module, scaling: float) -> torch.Tensor:
    """scaling * B∘A as a kernel (out x in x k...), in the base's layout; peft's `get_delta_weight` for convs."""
    weight_a, weight_b = lora_a.weight, lora_b.weight  # (r, in, k...), (out, r/groups, 1...)
    if weight_a.shape[2:4] == (1, 1):  # a 1x1 kernel (peft's test, kohya_ss's trick): a plain matmul
        b2d, a2d = weight_b.squeeze(3).squeeze(2), weight_a.squeeze(3).squeeze(2)  # (out, r), (r, in)
        return (b2d @ a2d).unsqueeze(2).unsqueeze(3) * scaling
    # A's kernel as a batch of `in` images with r channels, convolved with the 1x1 kernel B: (in, out, k...)
    delta = conv_fn(weight_a)(weight_a.transpose(0, 1), weight_b)
    return (delta if lora_b.groups > 1 else delta.transpose(0, 1)) * scaling


def dora_direction(lora_a: nn.Module, lora_b: nn.Module, shape: torch.Size) -> torch.Tensor:
    """B∘A reshaped to the base kernel's `shape`, unscaled: what peft's DoRA conv layer takes the norm of.

    For groups = 1 it equals `conv_delta_weight` / scaling; with groups > 1 it is peft's product of B viewed as
    (out/groups x r) and A as (r x in*k), reshaped: DoRA's norm there (and so peft's numbers) is defined by it.
    """
    r = lora_a.weight.shape[0]
    return torch.mm(lora_b.weight.view(-1, r), lora_a.weight.view(r, -1)).reshape(shape)
