"""When `LoraLayer` takes a fast path, and the switch that turns the fast paths off (for comparisons).

The fast paths cover the common case: a plain, frozen `nn.Linear` (no hooks, no autocast, input in the
weight's dtype) with one unmerged active adapter (`lora_ops.lora_linear`), or a mixed batch over such a
layer with no dropout in play (`mixed_batch.mixed_lora_linear`). Anything else (Conv1D, embeddings,
bitsandbytes layers, DoRA adapters, lora_bias, a trainable base weight, several active adapters) takes the reference
path, `LoraLayer.adapter_forward`. Inside a `generate` call (`weights_fixed`) each layer keeps the result of its
checks and the tensors it derived (a plan) and reuses them at every decoding step; with
`DELTATUNE_TRITON_LORA=1` (or `lora_ops.use_triton_kernels`) on a CUDA device that plan runs the fused kernel of
`triton_lora` instead.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.ops.lora_ops import lora_linear, lora_linear_inference, switched, triton_kernels_for
from deltatune.ops.mixed_batch import (
    apply_row_factors,
    gather_row_factors,
    mixed_lora_linear,
    row_index,
    stack_lora_weights,
)

_ENABLED = [True]
# Tensors derived from adapter weights (B^T, mixed-batch stacks) are cached only inside `weights_fixed()`,
# which `PeftModel.generate` enters: no optimizer runs during a generate call. Outside it they are rebuilt
# on every call, because a version counter is no proof that a weight is unchanged (fused AdamW updates
# parameters in place without bumping it).
_FIXED = {"depth": 0, "epoch": 0}


@contextlib.contextmanager
def weights_fixed() -> Iterator[None]:
    """Promise that no adapter weight changes inside the block, so layers may cache what they derive from them."""
    if _FIXED["depth"] == 0:
        _FIXED["epoch"] += 1  # a new block: whatever was cached before may be stale
    _FIXED["depth"] += 1
    try:
        yield
    finally:
        _FIXED["depth"] -= 1


def _cache_epoch() -> int | None:
    """The current fixed-weights block, or None when nothing may be cached: outside a block, or while autograd
    records (a cached plan would skip the recording checks)."""
    return _FIXED["epoch"] if _FIXED["depth"] and not torch.is_grad_enabled() else None


def use_fast_paths(enabled: bool) -> contextlib.AbstractContextManager[None]:
    """Within the block, LoRA layers use (True) or skip (False) the fast paths; for tests and benchmarks."""
    return switched(_ENABLED, enabled)


def _plain_frozen_linear(base: nn.Module) -> bool:
    return (
        type(base) is nn.Linear
        and not base.weight.requires_grad
        and not base._forward_hooks
        and not base._forward_pre_hooks
    )


def _dropout_p(adapter: nn.Module) -> float:
    dropout = adapter._modules["dropout"]
    return dropout.p if dropout.training and type(dropout) is nn.Dropout else 0.0


def _pending(layer_state: dict) -> list[str]:
    """Active adapters this layer has, not merged into the base weight."""
    active, merged = layer_state["active_adapters"], layer_state["merged_adapters"]
    present = layer_state["_modules"]["adapters"]._modules
    return [name for name in active if name in present and name not in merged]


def fast_lora_forward(layer: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The fused forward of `layer` for input `x`, or None when the reference path must run.

    This runs for every adapted layer on every token, so it reads module state straight from `__dict__`
    and `_modules` (nn.Module's attribute fallback costs about a microsecond a lookup).
    """
    state = layer.__dict__
    if args or kwargs or state["row_adapters"] is not None or not _ENABLED[0]:
        return None
    plan = state.get("_plan")  # inside generate: the first step's checks and tensors, reused
    if plan is not None and plan[0] == _cache_epoch() and plan[1] is x.dtype:
        return plan[2](x, *plan[3])
    base = layer._modules["base_layer"]
    if type(base) is not nn.Linear or base._forward_hooks or base._forward_pre_hooks:
        return None
    weight, bias = base._parameters["weight"], base._parameters["bias"]
    if weight.requires_grad or x.dtype != weight.dtype or torch._C._is_any_autocast_enabled():
        return None
    pending = () if state["disabled"] else _pending(state)
    if not pending:  # disabled, or everything merged: exactly the base layer
        return F.linear(x, weight, bias)
    if len(pending) != 1:
        return None
    adapter = layer._modules["adapters"]._modules[pending[0]]
    if "lora_magnitude_vector" in adapter._parameters:  # DoRA rescales the base output: reference path
        return None
    lora_a = adapter._modules["lora_A"]._parameters["weight"]
    lora_b_params = adapter._modules["lora_B"]._parameters
    if lora_b_params["bias"] is not None:  # lora_bias: reference path
        return None
    lora_b = lora_b_params["weight"]
    dropout = _dropout_p(adapter)
    recording = torch.is_grad_enabled() and (
        x.requires_grad or lora_a.requires_grad or lora_b.requires_grad or (bias is not None and bias.requires_grad)
    )
    if dropout == 0 and not recording:
        epoch = _cache_epoch()
        if epoch is None:  # a one-off call: strided views of A^T and B^T, nothing kept
            return lora_linear_inference(x, weight, bias, lora_a.T[None], lora_b.T[None], adapter.scaling)
        run, factors = _inference_kernel(x, weight, lora_a, lora_b)
        state["_plan"] = (epoch, x.dtype, run, (weight, bias, *factors, adapter.scaling))
        return run(x, weight, bias, *factors, adapter.scaling)
    return lora_linear(x, weight, bias, lora_a, lora_b, adapter.scaling, dropout)


def _inference_kernel(
    x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor
) -> tuple[Callable, tuple]:
    """The per-token LoRA function for a generate call and the factors it reads, derived once for the call."""
    kernels = triton_kernels_for(x, weight)
    if kernels is not None:
        return kernels.lora_linear_triton, (lora_a.detach(), lora_b.detach())
    # B^T made contiguous once for the whole generate call (A^T reads fastest as a view of A)
    return lora_linear_inference, (lora_a.detach().T[None], lora_b.detach().t().contiguous()[None])


def _stacks(layer: nn.Module, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked A (n + 1, r, in) and scaled B^T (n + 1, r, out) of `names` (see `stack_lora_weights`)."""
    adapters = [layer.adapters[n] for n in names]
    return stack_lora_weights([(a.lora_A.weight, a.lora_B.weight, a.scaling) for a in adapters])


def fast_mixed_forward(layer: nn.Module, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor | None:
    """Every row with its own adapter in two batched matmuls, or None when the reference loop must run.

    Inside `weights_fixed()` (a generate call) the checks and each row's factors are worked out on the first
    step and kept as a plan, so later decoding steps run only the two batched matmuls. The plan holds
    batch x r x (in + out) numbers per layer: no more than the stacks when the batch is at most the number of
    adapters + 1; larger batches keep the stacks and gather at every step instead.
    """
    if not _ENABLED[0]:
        return None
    epoch = _cache_epoch()
    key = (epoch, id(layer.row_adapters), x.shape[0], x.device, x.dtype)
    plan = layer.__dict__.get("_mixed_plan")
    if epoch is not None and plan is not None and plan[0] == key:
        return plan[1](x, result)
    names = list(layer.adapters)
    if not names or not _plain_frozen_linear(layer.base_layer):
        return None
    if any(
        _dropout_p(a) > 0 or "lora_magnitude_vector" in a._parameters or a.lora_B.bias is not None
        for a in map(layer.adapters.__getitem__, names)
    ) or torch.is_autocast_enabled(x.device.type):
        # dropout, DoRA or lora_bias: reference path
        return None
    rows, (a_stack, bt_stack) = row_index(layer.row_adapters, names, x.shape[0], x.device), _stacks(layer, names)
    if epoch is None:
        return mixed_lora_linear(x, result, rows, a_stack, bt_stack)
    if x.shape[0] <= a_stack.shape[0]:
        a_rows_t, bt_rows = gather_row_factors(rows, a_stack, bt_stack)
        run = functools.partial(apply_row_factors, a_rows_t=a_rows_t, bt_rows=bt_rows)
    else:
        run = functools.partial(mixed_lora_linear, rows=rows, a_stack=a_stack, bt_stack=bt_stack)
    layer.__dict__["_mixed_plan"] = (key, run)
    return run(x, result)
