"""Fused LoRA linear layer: ``y = x W^T + b + s * (drop(x) A^T) B^T`` as one autograd node.

`LoraLayer.adapter_forward` (nn.Linear modules composed, peft's way) is the reference; this is the fast
path `LoraLayer.forward` takes for a plain, frozen nn.Linear with one active adapter. Why it is faster and
leaner:

- forward adds the low-rank product into the base output in place (``addmm_``): no (N, out) temporaries
  for ``* scaling`` and ``+``; backward writes the low-rank input-gradient into the base one the same way;
- it saves the layer input itself and never a copy. q/k/v (and gate/up) read one tensor, so autograd
  keeps one copy for all of them. Where the graph can remake the input from factors it keeps anyway (the
  MLP's ``act(gate) * up`` before down_proj, an RMSNorm's output before q/k/v and gate/up), it keeps
  no input at all and multiplies the factors again in backward (`recorded_product`; inputs of 256 KiB and
  more, `REMAKE_MIN_BYTES`: looking for the recipe costs more than a smaller input weighs). With dropout it
  saves a 1-byte mask per layer and rebuilds the dropped input in backward (peft keeps a dropped fp32
  copy per layer); with a half-precision base it saves the half-precision input and upcasts it again in
  backward instead of keeping an fp32 copy per layer;
- the rank-r product A x is the only other activation saved (N x r).

Dropout masks come from the global torch RNG (`torch.manual_seed` reproduces them) but are drawn in a
different order than `nn.Dropout` would, so a training run with dropout is not bit-identical to the
reference path; its distribution is the same (independent masks per layer, kept values scaled by the
inverse keep probability; on CPU that probability is p rounded to 1/65536, see `dropout_mask`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from deltatune.ops.torch_internals import (
    MISSING,
    cast_output,
    internals_usable,
    is_cast_node,
    is_product_node,
    saved_operands,
    saved_tensor_hooks_active,
    set_versioned_note,
    versioned_note,
)

_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)  # torch >= 2.3


def dropout_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """A keep-mask shaped like `x` (True = keep, one byte per element) and its exact keep probability.

    On CPU, `bernoulli_` draws one 32-bit number per element (about 6 ns each, the largest cost of LoRA
    dropout on CPU). Here each 64-bit draw serves four elements as 16-bit lanes, compared with a threshold:
    about 3.5x faster. The drop probability becomes round(p * 65536) / 65536 (within 1 / 131072 of p), and
    the keep probability returned is that exact value, so scaling by its inverse keeps the layer unbiased.
    Under torch.compile it is `bernoulli_` too (dynamo cannot trace `random_`: a graph break per layer).
    """
    drops = round(p * _LANES)
    if x.device.type != "cpu" or not 0 < drops < _LANES or _is_compiling():
        return torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - p), 1.0 - p
    n = x.numel()
    lanes = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None).view(torch.int16)[:n]
    keep = torch.empty(x.shape, dtype=torch.uint8)  # compared into bytes (5x faster than a bool result), read as bool
    return torch.ge(lanes.view(x.shape), drops - _LANES // 2, out=keep).view(torch.bool), 1.0 - drops / _LANES


_LANES = 2**16  # values of a 16-bit lane


def _mask_operand(mask: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """The keep-mask as a multiplier of (N, in) values in `dtype`.

    On CPU a fresh 0 / 1 tensor of that dtype, made through uint8: bool -> float and float * bool run element
    by element there, uint8 -> float and float * float vectorised (about 4x faster in all). GPU kernels cast
    as they read, so there it is the bool mask itself (no extra launch).
    """
    if mask.device.type != "cpu":
        return mask.reshape(shape)
    mask_bytes = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    return mask_bytes.reshape(shape).to(dtype, copy=True)


def _masked(x_low: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x_low * keep; on CPU written into keep, which `_mask_operand` made as a fresh copy there."""
    return keep.mul_(x_low) if keep.device.type == "cpu" else x_low * keep


def _low_rank_input(x2: torch.Tensor, keep: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """x in the adapter's dtype (cast first, as the reference does), times the `_mask_operand` `keep` when
    there is dropout; 1/(1-p) rides in the scaling."""
    x_low = x2.to(dtype)  # (N, in); no copy when the dtypes agree
    return _masked(x_low, keep) if keep is not None else x_low


# Opt-in Triton kernels (deltatune.ops.triton_lora): DELTATUNE_TRITON_LORA=1 in the environment at import, or
# `use_triton_kernels(True)`. A flag rather than an environment read per call: this is on every layer's path.
_TRITON_KERNELS = [os.environ.get("DELTATUNE_TRITON_LORA") == "1"]


@contextlib.contextmanager
def switched(flag: list[bool], enabled: bool) -> Iterator[None]:
    """Set the one-element `flag` to `enabled` within the block, then back."""
    previous, flag[0] = flag[0], enabled
    try:
        yield
    finally:
        flag[0] = previous


def use_triton_kernels(enabled: bool) -> contextlib.AbstractContextManager[None]:
    """Within the block, LoRA layers on CUDA use (True) or skip (False) the Triton kernels of `triton_lora`."""
    return switched(_TRITON_KERNELS, enabled)


def triton_kernels_for(x: torch.Tensor, weight: torch.Tensor):
    """`deltatune.ops.triton_lora` when opted in and it runs on `x` and `weight`, else None."""
    if not _TRITON_KERNELS[0]:
        return None
    from deltatune.ops import triton_lora  # imported only then: Triton is slow to import

    return triton_lora if triton_lora.enabled_for(x, weight) else None


def _forward_math(x, weight, bias, lora_a, lora_b, scaling, mask):
    """(out (N, out), A x (N, r)) with the low-rank product added into the base output in place."""
    kernels = triton_kernels_for(x, weight)
    if kernels is not None:
        return kernels.lora_forward(x, weight, bias, lora_a, lora_b, scaling, mask, keep_low=True)
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    out = F.linear(x2, weight, bias)  # (N, out)
    keep = _mask_operand(mask, x2.shape, lora_a.dtype) if mask is not None else None
    after_a = F.linear(_low_rank_input(x2, keep, lora_a.dtype), lora_a)  # (N, r)
    if out.dtype == lora_b.dtype:
        out.addmm_(after_a, lora_b.T, alpha=scaling)
    else:  # half-precision base, fp32 adapter: one in-place add, promoted to fp32 and rounded once
        out.add_(F.linear(after_a, lora_b), alpha=scaling)
    return out, after_a


def recorded_product(x: torch.Tensor, depth: int = 3):
    """How to remake `x` from tensors autograd already keeps, or None.

    A LoRA layer's input is often an element-wise product whose autograd node saves both factors anyway: the
    MLP's ``act(gate) * up`` in front of down_proj, an RMSNorm's ``weight * (h * rsqrt(var)).to(dtype)`` in
    front of q/k/v and gate/up. Keeping those factors costs nothing, keeping `x` costs a tensor per layer;
    backward then repeats the products (and casts), which gives `x` bit for bit. Returns a recipe for
    `replay_product` (a tensor, a `Product` or a `Cast`); None when `x` was not made that way or when a factor
    is not kept. `remade_input` asks only when no saved-tensor hooks are active.
    """
    recipe = _node_recipe(x.grad_fn, depth)
    return recipe if recipe is not None and _recipe_dtype(recipe) == x.dtype else None


class Product(NamedTuple):
    left: Any
    right: Any


class Cast(NamedTuple):
    dtype: torch.dtype
    inner: Any


def _node_recipe(node, depth: int):
    if depth == 0:
        return None
    if is_cast_node(node):  # a dtype cast on the same device
        output = cast_output(node)
        inner = _node_recipe(node.next_functions[0][0], depth - 1) if output is not None else None
        fits = inner is not None and output[1] == _recipe_leaves(inner)[0].device
        return Cast(output[0], inner) if fits else None
    saved = saved_operands(node) if is_product_node(node) else None  # the operands, when this node keeps them
    if saved is None:
        return None
    parts = [
        operand if operand is not None else _node_recipe(producer, depth - 1)
        for operand, (producer, _) in zip(saved, node.next_functions, strict=False)
    ]
    return None if any(part is None for part in parts) else Product(*parts)


def _recipe_dtype(recipe) -> torch.dtype:
    """The dtype of what the recipe makes (its shape is x's by construction: x is the recorded product)."""
    if isinstance(recipe, torch.Tensor):
        return recipe.dtype
    if isinstance(recipe, Cast):
        return recipe.dtype
    return torch.promote_types(_recipe_dtype(recipe.left), _recipe_dtype(recipe.right))


def _recipe_leaves(recipe) -> list[torch.Tensor]:
    if isinstance(recipe, torch.Tensor):
        return [recipe]
    if isinstance(recipe, Cast):
        return _recipe_leaves(recipe.inner)
    return _recipe_leaves(recipe.left) + _recipe_leaves(recipe.right)


def _recipe_shape(recipe):
    """The recipe with each tensor replaced by None (the tensors go through save_for_backward)."""
    if isinstance(recipe, torch.Tensor):
        return None
    if isinstance(recipe, Cast):
        return Cast(recipe.dtype, _recipe_shape(recipe.inner))
    return Product(_recipe_shape(recipe.left), _recipe_shape(recipe.right))


def replay_product(shape, leaves) -> torch.Tensor:
    """What a recipe's shape describes, its tensors taken in order from the iterator `leaves`."""
    if shape is None:
        return next(leaves)
    if isinstance(shape, Cast):
        return replay_product(shape.inner, leaves).to(shape.dtype)
    return replay_product(shape.left, leaves) * replay_product(shape.right, leaves)


class RemadeInput:
    """How to remake one layer input in backward, shared by the layers that read it (q/k/v, gate/up).

    Built once per input tensor and version (kept as a `versioned_note` on it: the recipe is looked for once,
    not per layer; an in-place change of the tensor between readers gets a new one).
    The leaves are the tensors the recipe multiplies: each layer saves them for backward, and this object
    forgets them once backward starts. The remade value lives from the first reader's backward to the last's.
    """

    def __init__(self, recipe) -> None:
        self.shape, self.leaves = _recipe_shape(recipe), _recipe_leaves(recipe)
        self.value: torch.Tensor | None = None
        self.readers = 0

    def take(self, leaves: list[torch.Tensor]) -> torch.Tensor:
        self.leaves = []
        value = self.value if self.value is not None else replay_product(self.shape, iter(leaves))
        self.readers -= 1
        self.value = value if self.readers > 0 else None
        return value


REMAKE_MIN_BYTES = 2**18  # smaller inputs are kept: finding a recipe (~30 us) costs more than they weigh


def remade_input(x: torch.Tensor) -> RemadeInput | None:
    """The shared `RemadeInput` of `x`, or None when `x` must be kept (see `recorded_product`).

    Kept also while saved-tensor hooks are active (checkpointing or offloading decide there what is kept) and
    under torch.compile (no recorded graph to read; AOT autograd decides itself what to save), and when this
    torch failed the probe of `torch_internals`.
    """
    if x.numel() * x.element_size() < REMAKE_MIN_BYTES or _is_compiling():
        return None
    if saved_tensor_hooks_active() or not internals_usable():
        return None
    remade = versioned_note(x)
    if remade is MISSING:  # first reader, or x was changed in place since: another product made it
        recipe = recorded_product(x)
        remade = RemadeInput(recipe) if recipe is not None else None
        set_versioned_note(x, remade)
    return remade


def _input_grad(g, weight, lora_a, g_after_a, scaling, keep):
    """(N, in): g W + s * (g B) A [* keep], the low-rank part added into the base input-gradient in place."""
    grad_x = g @ weight  # (N, in): the base layer's input-gradient
    if keep is None and grad_x.dtype == lora_a.dtype:
        return grad_x.addmm_(g_after_a, lora_a, alpha=scaling)
    low = g_after_a @ lora_a  # (N, in) in the adapter dtype
    if keep is not None:
        return grad_x.addcmul_(low, keep, value=scaling)  # masked and added in one pass
    return grad_x.add_(low, alpha=scaling)  # promoted in place: no cast kernel


class _LoraLinear(torch.autograd.Function):
    """Autograd node of `lora_linear`; the base weight is frozen (no gradient for it).

    Backward is five matmuls and, in the plain case, nothing else: the scaling rides in each product's
    alpha (``addmm`` with beta=0 ignores its first argument, which only lends the output shape).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, mask):
        out, after_a = _forward_math(x, weight, bias, lora_a, lora_b, scaling, mask)
        # x is kept for A's gradient: as the caller's tensor (no copy), or not at all when the graph already
        # keeps the factors of the product that made it (then backward multiplies them again)
        remade = remade_input(x) if lora_a.requires_grad else None
        leaves = remade.leaves if remade is not None else ()
        ctx.save_for_backward(None if remade is not None else x, weight, lora_a, lora_b, after_a, mask, *leaves)
        if remade is not None:
            remade.readers += 1
        ctx.remade, ctx.x_shape, ctx.scaling = remade, x.shape, scaling
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight, lora_a, lora_b, after_a, mask, *leaves = ctx.saved_tensors
        if x is None and ctx.needs_input_grad[3]:
            x = ctx.remade.take(leaves)
        need_x, _, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        s = ctx.scaling
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        g_low = g.to(lora_b.dtype)  # (N, out) in the adapter dtype; no copy when they agree
        n_in = ctx.x_shape[-1]
        keep = None if mask is None else _mask_operand(mask, (g.shape[0], n_in), lora_a.dtype)  # (N, in)
        kernels = triton_kernels_for(g, weight) if need_x else None
        grad_x = grad_a = grad_bias = None
        if kernels is not None:  # grad_x and g B in one kernel
            grad_x, g_after_a = kernels.lora_input_grad(g, weight, lora_a, lora_b, s, mask)
        else:
            g_after_a = g_low @ lora_b  # (N, r), unscaled
            grad_x = _input_grad(g, weight, lora_a, g_after_a, s, keep) if need_x else None
        # (out, r) computed as ((A x)^T g)^T: the skinny operand first is about twice as fast on CPU BLAS
        grad_b = torch.addmm(lora_b.T, after_a.T, g_low, beta=0, alpha=s).T if need_b else None
        if need_a:  # after grad_x: on the CPU `_masked` writes the dropped input into `keep`
            x_low = _low_rank_input(x.reshape(-1, n_in), keep, lora_a.dtype)  # (N, in): the dropped input
            grad_a = torch.addmm(lora_a, g_after_a.T, x_low, beta=0, alpha=s)  # (r, in)
        if need_bias:
            grad_bias = g.sum(0)
        grad_x = grad_x.view(ctx.x_shape) if grad_x is not None else None
        return grad_x, None, grad_bias, grad_a, grad_b, None, None


def lora_linear_inference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a_t: torch.Tensor,
    lora_b_t: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """`lora_linear` with nothing recorded and no dropout: the per-token path of `generate`.

    Args:
        lora_a_t: A^T as (1, in, r), fastest as a view of A (r, in).
        lora_b_t: B^T as (1, r, out), fastest contiguous (a 1-row product with a strided B^T is two to three
            times slower on CPU BLAS).

    At one token per step every launch and every dispatch counts. The low-rank path runs as batched matmuls
    on a (1, tokens, features) view: `bmm` and an in-place `baddbmm_` dispatch straight to the kernel, where
    `F.linear` + `addmm_` on a 3-D input first reshape it (about 3 us instead of 7 per layer on CPU).
    """
    out = F.linear(x, weight, bias)  # (..., out), fresh and contiguous
    x3, out3 = x, out
    if x.dim() != 3 or x.shape[0] != 1:  # every token as one batch-1 product
        x3, out3 = x.reshape(1, -1, x.shape[-1]), out.view(1, -1, out.shape[-1])
    after_a = torch.bmm(x3 if x3.dtype == lora_a_t.dtype else x3.to(lora_a_t.dtype), lora_a_t)  # (1, N, r)
    if out3.dtype == lora_b_t.dtype:
        out3.baddbmm_(after_a, lora_b_t, alpha=scaling)  # into `out`, whose view it is
    else:  # half-precision base, fp32 adapter: promoted in place, rounded once
        out3.add_(torch.bmm(after_a, lora_b_t), alpha=scaling)
    return out


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout: float = 0.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x W^T + b + scaling * (dropout(x) A^T) B^T`` with a frozen W, fused and memory-lean.

    Args:
        x: input (..., in), in the dtype of `weight`.
        weight: frozen base weight (out, in); it gets no gradient.
        bias: base bias (out,) or None; it gets a gradient if it requires one.
        lora_a: (r, in). lora_b: (out, r). Both may be in a wider dtype than `weight` (fp32 over bf16).
        scaling: alpha / r (or alpha / sqrt(r)).
        dropout: probability of dropping an input element on the low-rank path (0 in eval mode).
        mask: an explicit keep-mask shaped like `x` (for tests); drawn from the torch RNG when None.

    Returns:
        (..., out) in the dtype of `x`.
    """
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "lora_linear keeps the base weight frozen; it got a weight that requires grad "
            "(freeze it, or use LoraLayer.adapter_forward, which trains through the base layer)"
        )
    if dropout > 0:  # kept values are scaled by 1 / (keep probability): fold that into the scaling
        mask, keep = dropout_mask(x, dropout) if mask is None else (mask, 1.0 - dropout)
        scaling = scaling / keep
    if torch.is_grad_enabled() and (
        x.requires_grad or lora_a.requires_grad or lora_b.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return _LoraLinear.apply(x, weight, bias, lora_a, lora_b, scaling, mask)
    out, _ = _forward_math(x, weight, bias, lora_a, lora_b, scaling, mask)
    return out.view(*x.shape[:-1], out.shape[-1])
