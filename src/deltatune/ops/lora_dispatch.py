"""When `LoraLayer` takes a fast path, and the switch that turns the fast paths off (for comparisons).

The fast paths cover the common case: a plain, frozen `nn.Linear` (no hooks, no autocast, input in the
weight's dtype) with one unmerged active adapter (`lora_ops.lora_linear`), or a mixed batch over such a
layer with no dropout in play (`mixed_batch.mixed_lora_linear`). Anything else (Conv1D, embeddings,
bitsandbytes layers, a trainable base weight, several active adapters) takes the reference path,
`LoraLayer.adapter_forward`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from deltatune.ops.lora_ops import lora_linear
from deltatune.ops.mixed_batch import mixed_lora_linear, row_index, stack_lora_weights

_ENABLED = [True]


@contextlib.contextmanager
def use_fast_paths(enabled: bool) -> Iterator[None]:
    """Within the block, LoRA layers use (True) or skip (False) the fast paths; for tests and benchmarks."""
    previous, _ENABLED[0] = _ENABLED[0], enabled
    try:
        yield
    finally:
        _ENABLED[0] = previous


def _plain_frozen_linear(base: nn.Module) -> bool:
    return (type(base) is nn.Linear and not base.weight.requires_grad
            and not base._forward_hooks and not base._forward_pre_hooks)  # fmt: skip


def _dropout_p(adapter: nn.Module) -> float:
    dropout = adapter.dropout
    return dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0


def fast_lora_forward(layer: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The fused forward of `layer` for input `x`, or None when the reference path must run."""
    if not _ENABLED[0] or args or kwargs or layer.disabled or layer.row_adapters is not None:
        return None
    base = layer.base_layer
    if not _plain_frozen_linear(base) or x.dtype != base.weight.dtype or torch.is_autocast_enabled(x.device.type):
        return None
    pending = [name for name in layer.active_adapters if name not in layer.merged_adapters]
    if len(pending) != 1:
        return None
    adapter = layer.adapters[pending[0]]
    return lora_linear(x, base.weight, base.bias, adapter.lora_A.weight, adapter.lora_B.weight, adapter.scaling,
                       _dropout_p(adapter))  # fmt: skip


def _stacks(layer: nn.Module, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked A / scaled B of `names`; cached while no gradient is recorded and no weight has changed."""
    params = [p for n in names for p in (layer.adapters[n].lora_A.weight, layer.adapters[n].lora_B.weight)]
    recording = torch.is_grad_enabled() and any(p.requires_grad for p in params)
    key = (tuple(names), tuple((id(p), p._version) for p in params), tuple(layer.adapters[n].scaling for n in names))
    cached = layer.__dict__.get("_mixed_stacks")
    if not recording and cached is not None and cached[0] == key:
        return cached[1]
    stacks = stack_lora_weights([(layer.adapters[n].lora_A.weight, layer.adapters[n].lora_B.weight,
                                  layer.adapters[n].scaling) for n in names])  # fmt: skip
    layer.__dict__["_mixed_stacks"] = None if recording else (key, stacks)
    return stacks


def _rows(layer: nn.Module, names: list[str], batch: int, device: torch.device) -> torch.Tensor:
    key = (tuple(layer.row_adapters), tuple(names), batch, device)
    cached = layer.__dict__.get("_mixed_rows")
    if cached is None or cached[0] != key:
        cached = (key, row_index(layer.row_adapters, names, batch, device))
        layer.__dict__["_mixed_rows"] = cached
    return cached[1]


def fast_mixed_forward(layer: nn.Module, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor | None:
    """Every row with its own adapter in two batched matmuls, or None when the reference loop must run."""
    names = list(layer.adapters)
    if not _ENABLED[0] or not names or not _plain_frozen_linear(layer.base_layer):
        return None
    if any(_dropout_p(layer.adapters[n]) > 0 for n in names) or torch.is_autocast_enabled(x.device.type):
        return None
    a_stack, b_stack = _stacks(layer, names)
    return mixed_lora_linear(x, result, _rows(layer, names, x.shape[0], x.device), a_stack, b_stack)
