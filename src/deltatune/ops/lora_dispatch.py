"""Which forward a `LoraLayer` runs: the fast paths of deltatune.ops, or the reference, and the switch.

The fast paths cover the common case: a plain, frozen `nn.Linear` (no hooks, no autocast, input in the
weight's dtype) with one unmerged active adapter (`lora_ops.lora_linear`), or a mixed batch over such a
layer with no dropout in play (`mixed_batch.mixed_lora_linear`). Anything else (Conv1D, embeddings,
bitsandbytes layers, DoRA adapters, lora_bias, a trainable base weight, several active adapters) takes the reference
path, `LoraLayer.adapter_forward` (and `AdapterLayer.mixed_forward` for mixed batches). Inside a `generate` call
(`weights_fixed`) each layer keeps the result of its checks and the tensors it derived (a plan) and reuses them at
every decoding step; with `DELTATUNE_TRITON_LORA=1` (or `lora_ops.use_triton_kernels`) on a CUDA device that plan
runs the fused kernel of `triton_lora` instead.

The switch: `DELTATUNE_FAST_PATHS=0` in the environment (read at import), `set_fast_paths(False)`, or the block
form `with use_fast_paths(False):` make every LoRA layer run its reference path. They also stay off when torch
fails the probe of `torch_internals` (a warning says so).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import NamedTuple

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
from deltatune.ops.torch_internals import (
    USABLE,
    any_autocast_enabled,
    children,
    has_forward_hooks,
    own_parameters,
    unhooked_parameters,
)


def _fast_paths_from_environment() -> bool:
    """False when DELTATUNE_FAST_PATHS is 0, false, off or no (any case); True otherwise and when unset."""
    return os.environ.get("DELTATUNE_FAST_PATHS", "1").strip().lower() not in ("0", "false", "off", "no")


# A flag rather than an environment read per call: this is on every layer's path.
_ENABLED = [_fast_paths_from_environment()]
# Tensors derived from adapter weights (B^T, mixed-batch stacks) are cached only inside `weights_fixed()`,
# which `PeftModel.generate` enters: no optimizer runs during a generate call. Outside it they are rebuilt
# on every call, because a version counter is no proof that a weight is unchanged (fused AdamW updates
# parameters in place without bumping it).
_FIXED = {"depth": 0, "epoch": 0}


def set_fast_paths(enabled: bool) -> None:
    """Turn the LoRA fast paths on or off for the whole process.

    Off, every `LoraLayer` runs its reference forward (`LoraLayer.adapter_forward`, `AdapterLayer.mixed_forward`):
    the same numbers (within float rounding), slower, and keeping each layer's input for backward as peft does.
    `DELTATUNE_FAST_PATHS=0` in the environment sets the same switch at import; `use_fast_paths` is the block form.

    Args:
        enabled: True to let layers take the fast paths where they apply (the default), False to never take them.
    """
    _ENABLED[0] = bool(enabled)


def fast_paths_enabled() -> bool:
    """Whether LoRA layers may take the fast paths: switched on, and this torch passed the internals probe."""
    return _ENABLED[0] and USABLE[0]


def use_fast_paths(enabled: bool) -> contextlib.AbstractContextManager[None]:
    """Within the block, LoRA layers use (True) or skip (False) the fast paths; `set_fast_paths` in block form."""
    return switched(_ENABLED, bool(enabled))


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


class LinearPlan(NamedTuple):
    """A layer's fast forward for one generate call, worked out on its first decoding step and reused after."""

    epoch: int  # the `weights_fixed` block it was made in; any other block rebuilds it
    dtype: torch.dtype  # the input dtype it was made for
    run: Callable[..., torch.Tensor]  # called as run(x, *operands)
    operands: tuple  # (base weight, base bias, A factor, B factor, scaling) in the form `run` reads them


class MixedKey(NamedTuple):
    """What a mixed-batch plan was made for; a call that differs in any of these rebuilds it."""

    epoch: int | None
    row_adapters_id: int  # identity of the layer's `row_adapters` list (set afresh for each batch)
    batch: int
    device: torch.device
    dtype: torch.dtype


class MixedPlan(NamedTuple):
    """A layer's mixed-batch forward for one generate call: each row's factors gathered on the first step."""

    made_for: MixedKey
    run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # called as run(x, base_output)


# Plans live in the layer's instance `__dict__`, next to its other plain attributes: read from it because a
# missing attribute would go through nn.Module.__getattr__ (an exception per call), and written into it
# because nn.Module.__setattr__ checks parameters, buffers and modules first.
_LINEAR_PLAN, _MIXED_PLAN = "_fast_linear_plan", "_fast_mixed_plan"


def stored_plan(layer: nn.Module, mixed: bool = False) -> LinearPlan | MixedPlan | None:
    """The plan `layer` keeps for its single-adapter forward, or with `mixed` for its mixed-batch forward."""
    return vars(layer).get(_MIXED_PLAN if mixed else _LINEAR_PLAN)


def _plain_frozen_linear(base: nn.Module) -> bool:
    return type(base) is nn.Linear and not own_parameters(base)["weight"].requires_grad and not has_forward_hooks(base)


def _dropout_p(dropout: nn.Module) -> float:
    """The drop probability an adapter's dropout module applies now (0 in eval mode or for nn.Identity)."""
    return dropout.p if dropout.training and type(dropout) is nn.Dropout else 0.0


def _pending(layer: nn.Module, present: dict[str, nn.Module]) -> list[str]:
    """Active adapters this layer has (`present`: its adapters by name), not merged into the base weight."""
    merged = layer.merged_adapters
    return [name for name in layer.active_adapters if name in present and name not in merged]


def _plain_factors(adapter: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """A plain adapter's A (r, in), B (out, r) and dropout probability, or None for DoRA or lora_bias (reference
    path)."""
    if "lora_magnitude_vector" in own_parameters(adapter):  # DoRA rescales the base output
        return None
    parts = children(adapter)
    lora_b_params = own_parameters(parts["lora_B"])
    if lora_b_params["bias"] is not None:
        return None
    return own_parameters(parts["lora_A"])["weight"], lora_b_params["weight"], _dropout_p(parts["dropout"])


def fast_lora_forward(layer: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The fused forward of `layer` for input `x`, or None when the reference path must run.

    This runs for every adapted layer on every token, so it reads module state through `torch_internals`
    (nn.Module's attribute fallback costs about a microsecond a lookup) and the layer's plain attributes
    from its `__dict__` (half the cost of `vars(layer)`).
    """
    state = layer.__dict__
    if args or kwargs or state["row_adapters"] is not None or not (_ENABLED[0] and USABLE[0]):
        return None
    plan = state.get(_LINEAR_PLAN)  # inside generate: the first step's checks and tensors, reused
    if plan is not None and plan.epoch == _cache_epoch() and plan.dtype is x.dtype:
        return plan.run(x, *plan.operands)
    modules = children(layer)
    base = modules["base_layer"]
    base_params = unhooked_parameters(base) if type(base) is nn.Linear else None
    if base_params is None:
        return None
    weight, bias = base_params["weight"], base_params["bias"]
    if weight.requires_grad or x.dtype != weight.dtype or any_autocast_enabled():
        return None
    adapters = children(modules["adapters"])
    pending = () if state["disabled"] else _pending(layer, adapters)
    if not pending:  # disabled, or everything merged: exactly the base layer
        return F.linear(x, weight, bias)
    adapter = adapters[pending[0]]
    factors = _plain_factors(adapter) if len(pending) == 1 else None
    if factors is None:
        return None
    lora_a, lora_b, dropout = factors
    recording = torch.is_grad_enabled() and (
        x.requires_grad or lora_a.requires_grad or lora_b.requires_grad or (bias is not None and bias.requires_grad)
    )
    if dropout == 0 and not recording:
        epoch = _cache_epoch()
        if epoch is None:  # a one-off call: strided views of A^T and B^T, nothing kept
            return lora_linear_inference(x, weight, bias, lora_a.T[None], lora_b.T[None], adapter.scaling)
        run, kernel_factors = _inference_kernel(x, weight, lora_a, lora_b)
        plan = LinearPlan(epoch, x.dtype, run, (weight, bias, *kernel_factors, adapter.scaling))
        state[_LINEAR_PLAN] = plan
        return plan.run(x, *plan.operands)
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
    if not (_ENABLED[0] and USABLE[0]):
        return None
    epoch = _cache_epoch()
    key = MixedKey(epoch, id(layer.row_adapters), x.shape[0], x.device, x.dtype)
    plan = layer.__dict__.get(_MIXED_PLAN)
    if epoch is not None and plan is not None and plan.made_for == key:
        return plan.run(x, result)
    names = list(layer.adapters)
    if not names or not _plain_frozen_linear(layer.base_layer):
        return None
    if any(
        _dropout_p(a.dropout) > 0 or "lora_magnitude_vector" in own_parameters(a) or a.lora_B.bias is not None
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
    plan = MixedPlan(key, run)
    layer.__dict__[_MIXED_PLAN] = plan
    return plan.run(x, result)
