"""Every private torch attribute the LoRA fast paths read, each behind one small function, and the probe that
checks at import that they still behave as the fast paths expect.

Why private attributes at all: the fast paths run for every adapted layer on every token, where nn.Module's
attribute fallback costs about a microsecond a lookup (so module state is read from `_modules` and
`_parameters`), and the fused LoRA node saves no layer input that autograd can remake from factors it keeps
anyway, which means reading what a recorded node saved (`_saved_self`, `_saved_other`, `_input_metadata`).

Checked on torch 2.13.0, the CPU build that scripts/setup.sh installs (scripts/compat.sh varies the other
dependencies and keeps that torch), so on any other release the probe below is the check. When a release
changes one of these, `check_internals` (run once at import) logs one warning naming the torch version and the
failed check, `internals_usable()` turns False, and `LoraLayer` runs its reference path (`adapter_forward`,
`mixed_forward`): slower, never wrong.
tests/test_fast_path_switch.py asserts that the probe passes on the installed torch, so an upgrade that
breaks it fails a test instead of only slowing training down.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

MISSING = object()  # `versioned_note` of a tensor that has none for its current version

# Whether the last `check_internals` passed. A one-element list, read by every LoRA layer call: checking it
# costs one index, and `check_internals` updates it in place for every module that imported it.
USABLE = [False]

_NOTE_KEY = "_deltatune_note"
_TOP_SAVED_TENSORS_HOOKS = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


# ---- nn.Module state, read without nn.Module.__getattr__ ----------------------------------------------------
def children(module: nn.Module) -> dict[str, nn.Module]:
    """The direct submodules of `module` by name (relies on nn.Module keeping them in `_modules`)."""
    return module._modules


def own_parameters(module: nn.Module) -> dict[str, nn.Parameter | None]:
    """The parameters registered on `module` itself by name, None for an absent bias (`_parameters`)."""
    return module._parameters


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether `module` has forward or forward-pre hooks of its own (`_forward_hooks`, `_forward_pre_hooks`);
    a fast path would skip them."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def unhooked_parameters(module: nn.Module) -> dict[str, nn.Parameter | None] | None:
    """`own_parameters(module)`, or None when it has forward hooks: both checks of a base layer in one call."""
    return None if module._forward_hooks or module._forward_pre_hooks else module._parameters


def _autocast_unknown() -> bool:
    raise AttributeError(f"torch {torch.__version__} has no torch._C._is_any_autocast_enabled")


# any_autocast_enabled() -> bool: whether autocast is on for any device, in one call instead of one
# `torch.is_autocast_enabled(device)` per device type. torch's own function, bound without a wrapper.
any_autocast_enabled = getattr(torch._C, "_is_any_autocast_enabled", _autocast_unknown)


# ---- the recorded autograd graph ----------------------------------------------------------------------------
def is_product_node(node: Any) -> bool:
    """Whether `node` recorded an element-wise tensor product (the generated class `MulBackward0`)."""
    return type(node).__name__ == "MulBackward0"


def is_cast_node(node: Any) -> bool:
    """Whether `node` recorded a `Tensor.to` copy (the generated class `ToCopyBackward0`)."""
    return type(node).__name__ == "ToCopyBackward0"


def saved_operands(node: Any) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
    """The two factors a product node keeps for backward (`_saved_self`, `_saved_other`; an entry is None when
    backward does not need it), or None when they cannot be read: released by a backward, or changed in place
    since."""
    try:
        return node._saved_self, node._saved_other
    except (RuntimeError, AttributeError):
        return None


def cast_output(node: Any) -> tuple[torch.dtype, torch.device] | None:
    """The dtype and device a cast node produced (its `_input_metadata[0]`: the metadata of the gradient it
    takes, which is its output's), or None when unreadable."""
    try:
        output = node._input_metadata[0]
        return output.dtype, output.device
    except (RuntimeError, AttributeError, IndexError):
        return None


def saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks (checkpointing, offloading) are active, which then decide what autograd keeps
    (`torch._C._autograd._top_saved_tensors_default_hooks`). True when this torch cannot say."""
    return _TOP_SAVED_TENSORS_HOOKS is None or _TOP_SAVED_TENSORS_HOOKS(False) is not None


# ---- a note kept on a tensor until it changes in place -------------------------------------------------------
def versioned_note(x: torch.Tensor) -> Any:
    """What `set_versioned_note` stored on `x`, or `MISSING` when nothing was or `x` changed in place since
    (relies on the tensor's Python `__dict__` and its in-place version counter `_version`)."""
    version, value = x.__dict__.get(_NOTE_KEY, (None, MISSING))
    return value if version == x._version else MISSING


def set_versioned_note(x: torch.Tensor, value: Any) -> None:
    """Keep `value` on `x` (in its `__dict__`) for as long as `x` is not changed in place."""
    x.__dict__[_NOTE_KEY] = (x._version, value)


# ---- the probe -----------------------------------------------------------------------------------------------
def _module_state_reads() -> bool:
    linear = nn.Linear(2, 2)
    holder = nn.Sequential(linear)
    reads = children(holder)["0"] is linear and own_parameters(linear)["weight"] is linear.weight
    unhooked = unhooked_parameters(linear) is own_parameters(linear) and not has_forward_hooks(linear)
    hook = linear.register_forward_pre_hook(lambda module, args: None)
    hooked = has_forward_hooks(linear) and unhooked_parameters(linear) is None
    hook.remove()
    return reads and own_parameters(linear)["bias"] is linear.bias and unhooked and hooked


def _autocast_reads() -> bool:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = any_autocast_enabled()
    with torch.autocast("cpu", enabled=False):
        return inside and not any_autocast_enabled()


def _graph_reads() -> bool:
    left, right = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    product = left * right
    operands = saved_operands(product.grad_fn) if is_product_node(product.grad_fn) else None
    cast = product.to(torch.float64)
    made = cast_output(cast.grad_fn) if is_cast_node(cast.grad_fn) else None
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        hooks_seen = saved_tensor_hooks_active()
    return (
        operands is not None
        and all(isinstance(t, torch.Tensor) for t in operands)
        and torch.equal(operands[0], left)
        and torch.equal(operands[1], right)
        and made == (torch.float64, cast.device)
        and hooks_seen
    )


def _note_reads() -> bool:
    x = torch.zeros(2)
    fresh = versioned_note(x) is MISSING
    set_versioned_note(x, "kept")
    kept = versioned_note(x) == "kept"
    x.add_(1)  # an in-place change must drop the note
    return fresh and kept and versioned_note(x) is MISSING


_CHECKS = {
    "nn.Module state (_modules, _parameters, forward hooks)": _module_state_reads,
    "autocast state (torch._C._is_any_autocast_enabled)": _autocast_reads,
    "recorded graph (_saved_self, _saved_other, _input_metadata, saved-tensor hooks)": _graph_reads,
    "tensor notes (__dict__, _version)": _note_reads,
}


def failed_check() -> str | None:
    """The first check of `_CHECKS` this torch fails (its name), or None when all pass."""
    # a tiny graph of its own: recorded whatever grad mode the caller is in
    with torch.inference_mode(False), torch.enable_grad():
        for name, check in _CHECKS.items():
            try:
                if not check():
                    return name
            except Exception as error:  # any failure means the same: the fast paths cannot rely on it
                return f"{name}: {type(error).__name__}: {error}"
    return None


def check_internals() -> bool:
    """Probe the private torch attributes above and record whether the fast paths may use them.

    Runs once at import; call it again after changing torch's behaviour (tests do). A failed probe logs one
    warning naming the torch version and the check, and turns the LoRA fast paths off.
    """
    failed = failed_check()
    if failed is not None:
        logger.warning(
            "deltatune: torch %s changed an internal the LoRA fast paths read (%s); LoRA layers use their "
            "reference forward (same results, slower and keeping more memory for backward)",
            torch.__version__,
            failed,
        )
    USABLE[0] = failed is None
    return USABLE[0]


def internals_usable() -> bool:
    """Whether the last `check_internals` passed: the fast paths may read torch's private state."""
    return USABLE[0]


check_internals()
