"""Triton kernel for the lean loss on CUDA: a chunk of logits becomes its cross-entropy gradient in place.

One program per row reads the row twice (an online max / sum-exp pass, then a write pass), where the
PyTorch reference (`cross_entropy.ce_chunk_torch`) makes about six passes (logsumexp, gather, subtract,
exp, scatter, scale). Used only when Triton imports and the tensor is on a CUDA device; tests/test_ops.py
compares it with the reference on the device machine.
"""

from __future__ import annotations

import functools

import torch

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


@functools.cache
def available() -> bool:
    """True when the Triton kernel can run (Triton imported and a CUDA device present)."""
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _ce_grad_kernel(
        logits_ptr,
        labels_ptr,
        loss_ptr,
        scale_ptr,
        stride,
        n_cols: tl.constexpr,
        ignore_index: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        ptr = logits_ptr + row * stride
        label = tl.load(labels_ptr + row)
        scale = tl.load(scale_ptr)
        valid = label != ignore_index
        # pass 1: running max m and sum of exp(x - m) over the row
        m = -float("inf")
        total = 0.0
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(ptr + cols, mask=cols < n_cols, other=-float("inf"))
            new_m = tl.maximum(m, tl.max(x, axis=0))
            total = total * tl.exp(m - new_m) + tl.sum(tl.exp(x - new_m), axis=0)
            m = new_m
        lse = m + tl.log(total)
        target = tl.where(valid, label, 0)
        target_logit = tl.load(ptr + target)
        tl.store(loss_ptr + row, tl.where(valid, lse - target_logit, 0.0))
        # pass 2: gradient scale * (softmax - one-hot), zero for an ignored row
        row_scale = tl.where(valid, scale, 0.0)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(ptr + cols, mask=cols < n_cols, other=0.0)
            grad = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
            tl.store(ptr + cols, grad * row_scale, mask=cols < n_cols)


def ce_chunk_triton(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, scale: torch.Tensor) -> torch.Tensor:
    """Same contract as `cross_entropy.ce_chunk_torch`: returns the summed loss, rewrites `logits` in place."""
    if logits.dtype != torch.float32 or logits.stride(-1) != 1:
        raise ValueError(
            f"ce_chunk_triton needs contiguous fp32 logits; got {logits.dtype} with strides {logits.stride()}"
        )
    rows, cols = logits.shape
    losses = torch.empty(rows, dtype=torch.float32, device=logits.device)  # (c,)
    scale = scale.reshape(1).to(device=logits.device, dtype=torch.float32)
    _ce_grad_kernel[(rows,)](
        logits, labels.contiguous(), losses, scale, logits.stride(0), cols, ignore_index, BLOCK=4096, num_warps=8
    )
    return losses.sum()
