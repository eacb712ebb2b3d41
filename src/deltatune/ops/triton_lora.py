"""Triton kernel for unmerged LoRA inference: ``x W^T + b + s * (x A^T) B^T`` in one launch.

`lora_ops.lora_linear_inference` (the reference) launches three kernels per adapted layer and decoding step
(base GEMM, A x, the rank-r update added into the output); on a GPU a one-token step is bound by launches,
so those two extra launches are most of what LoRA costs there. Here each program computes an (M, N) tile of
the base product and, in the same pass over the input, its rows' rank-r product A x; the epilogue adds
s * (A x) B^T before the single store. Rounding follows the reference: the base output is rounded to the
input dtype before the update is added, and A x is rounded to the adapter dtype.

Opt-in (`DELTATUNE_TRITON_LORA=1`), because its speed has not been measured on a GPU yet: tests check it
against the reference on the CPU through Triton's interpreter (`TRITON_INTERPRET=1`, the same kernel code
run with numpy), and `benchmarks/vs_peft.py --triton-lora` times it when a device is lent.
"""

from __future__ import annotations

import os

import torch

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

_MIN_DOT = 16  # tl.dot needs every dimension to be at least 16


def enabled_for(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when the user opted in and the kernel can run on `x` and a row-major `weight` (CUDA, or the CPU
    under the interpreter)."""
    if triton is None or os.environ.get("DELTATUNE_TRITON_LORA") != "1" or weight.stride(-1) != 1:
        return False
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return x.device.type == "cuda" or (interpreted and x.device.type == "cpu")


def padded_factors(lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A (R, in) and B^T (R, out), both contiguous, with zero rows up to R = a power of two >= 16.

    The zero rows add nothing to A x or to (A x) B^T; they let the rank be a tl.dot dimension.
    """
    r = lora_a.shape[0]
    rank = max(_MIN_DOT, triton.next_power_of_2(r))
    a_pad = lora_a.new_zeros(rank, lora_a.shape[1])
    bt_pad = lora_b.new_zeros(rank, lora_b.shape[0])
    a_pad[:r] = lora_a.detach()
    bt_pad[:r] = lora_b.detach().T
    return a_pad, bt_pad


if triton is not None:

    @triton.jit
    def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """acc + a @ b in fp32. UPCAST (the interpreter only: its numpy products misread bf16) multiplies in
        fp32, which gives what a bf16 tensor-core product gives: bf16 x bf16 is exact in fp32."""
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(a, b, acc, input_precision=PRECISION)

    @triton.jit
    def _lora_linear_kernel(x_ptr, w_ptr, bias_ptr, a_ptr, bt_ptr, out_ptr, M, N, K: tl.constexpr, scaling,
                            stride_xm, stride_wn, stride_om, HAS_BIAS: tl.constexpr, R: tl.constexpr,
                            BASE_PRECISION: tl.constexpr, LOW_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
        rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BM,)
        cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # (BN,)
        ranks = tl.arange(0, R)
        row_ok, col_ok = rows < M, cols < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # x W^T
        low = tl.zeros((BLOCK_M, R), dtype=tl.float32)  # x A^T, every N-tile computes its own (R is small)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)  # (BM, BK)
            w_t = tl.load(w_ptr + cols[None, :] * stride_wn + ks[:, None], mask=col_ok[None, :] & k_ok[:, None],
                          other=0.0)  # (BK, BN)
            acc = _dot(x, w_t, acc, BASE_PRECISION, UPCAST)
            a_t = tl.load(a_ptr + ranks[None, :] * K + ks[:, None], mask=k_ok[:, None], other=0.0)  # (BK, R)
            low = _dot(x.to(a_t.dtype), a_t, low, LOW_PRECISION, UPCAST)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        base = acc.to(out_ptr.dtype.element_ty).to(tl.float32)  # rounded like F.linear's output
        bt = tl.load(bt_ptr + ranks[:, None] * N + cols[None, :], mask=col_ok[None, :], other=0.0)  # (R, BN)
        update = _dot(low.to(bt.dtype), bt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), LOW_PRECISION, UPCAST)  # A x rounded as bmm's
        result = base + scaling * update  # one rounding, as baddbmm_ / add_ round
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], result.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


def _precision(dtype: torch.dtype) -> str | None:
    """fp32 products in full precision (as the reference computes them, not tf32); Triton's default for
    half-precision ones."""
    return "ieee" if dtype == torch.float32 else None


def lora_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a_pad: torch.Tensor,
                       bt_pad: torch.Tensor, scaling: float) -> torch.Tensor:  # fmt: skip
    """`lora_linear_inference` as one kernel; `a_pad`, `bt_pad` from `padded_factors`.

    Returns (..., out) in the dtype of `x`, like the reference.
    """
    n_in, n_out = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, n_in)  # (M, in)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if weight.stride(-1) != 1 or not a_pad.is_contiguous() or not bt_pad.is_contiguous():
        raise ValueError("lora_linear_triton needs row-major weight, A and B^T; use padded_factors for A and B^T")
    m = x2.shape[0]
    out = torch.empty((m, n_out), dtype=x.dtype, device=x.device)  # (M, out)
    block_m = 16 if m <= 16 else 64  # one-token steps: one row tile, the rest masked off
    block_n, block_k = 64, 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n_out, block_n))
    _lora_linear_kernel[grid](x2, weight, bias if bias is not None else weight, a_pad, bt_pad, out, m, n_out,
                              n_in, float(scaling), x2.stride(0), weight.stride(0), out.stride(0),
                              HAS_BIAS=bias is not None, R=a_pad.shape[0], BASE_PRECISION=_precision(x.dtype),
                              LOW_PRECISION=_precision(a_pad.dtype), UPCAST=x.device.type == "cpu", BLOCK_M=block_m, BLOCK_N=block_n,
                              BLOCK_K=block_k)  # fmt: skip
    return out.view(*x.shape[:-1], n_out)
