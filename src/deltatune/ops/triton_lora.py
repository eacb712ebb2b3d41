"""Triton kernels for the LoRA linear layer on CUDA, opt-in (`DELTATUNE_TRITON_LORA=1`, `use_triton_kernels`).

The PyTorch path (`lora_ops`) launches three kernels for a LoRA layer's forward (base GEMM, A x, the rank-r
update added into the output) and three for its input-gradient (g W, g B, the update); on a GPU a small
step is bound by launches, so the extra ones are most of what LoRA costs there. Here each is one kernel:

- forward: ``out = x W^T + b + s * (drop(x) A^T) B^T``. Each program computes an (M, N) tile of the base
  product and, in the same pass over x, its rows' rank-r product A x (cheap: r is small), then adds the
  update before the single store; programs of the first N tile also write A x, which backward needs;
- input-gradient: ``grad_x = g W + s * ((g B) A) [* keep]``, the same way, writing g B for A's gradient.

A and B are read where they are (no padded copies: the optimizer changes them every step); the rank is
padded to R >= 16 inside the kernel with masked lanes, because tl.dot needs every dimension >= 16. Rounding
follows the reference: the base product is rounded to the input dtype before the update is added, and the
rank-r products are rounded to the adapter dtype.

Opt-in because their speed has not been measured on a GPU yet. tests/test_triton_lora.py checks them
against the PyTorch path through Triton's interpreter (`TRITON_INTERPRET=1`: the same kernel code run with
numpy on the CPU) and builds them for sm_90 with Triton's own ptxas; `benchmarks/gpu_check.sh` runs them
on a device when one is lent.
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
_BLOCK_N, _BLOCK_K = 64, 64


def enabled_for(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when the kernels can run on `x` and a row-major `weight` (CUDA, or the CPU under the interpreter);
    whether the user opted in is `lora_ops.triton_kernels_for`'s question."""
    if triton is None or weight.stride(-1) != 1:
        return False
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return x.device.type == "cuda" or (interpreted and x.device.type == "cpu")


if triton is not None:

    @triton.jit
    def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """acc + a @ b in fp32. UPCAST (the interpreter only: its numpy products misread bf16) multiplies in
        fp32, which gives what a bf16 tensor-core product gives: bf16 x bf16 is exact in fp32."""
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(a, b, acc, input_precision=PRECISION)

    @triton.jit
    def _lora_forward_kernel(
        x_ptr,
        w_ptr,
        bias_ptr,
        a_ptr,
        b_ptr,
        keep_ptr,
        out_ptr,
        low_ptr,
        M,
        N,
        RANK,
        scaling,
        stride_xm,
        stride_wn,
        stride_ar,
        stride_bn,
        stride_br,
        stride_km,
        K: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_MASK: tl.constexpr,
        STORE_LOW: tl.constexpr,
        R: tl.constexpr,
        BASE_PRECISION: tl.constexpr,
        LOW_PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """out (M, N) = x W^T + b + s * (x A^T) B^T; low (M, RANK) = x A^T, rounded to the adapter dtype."""
        rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BM,)
        cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # (BN,)
        ranks = tl.arange(0, R)  # (R,), lanes >= RANK read as zero
        row_ok, col_ok, rank_ok = rows < M, cols < N, ranks < RANK
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # x W^T
        low = tl.zeros((BLOCK_M, R), dtype=tl.float32)  # x A^T: every N tile computes its own
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            x_ok = row_ok[:, None] & (ks < K)[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=x_ok, other=0.0)  # (BM, BK)
            w_t = tl.load(
                w_ptr + cols[None, :] * stride_wn + ks[:, None], mask=col_ok[None, :] & (ks < K)[:, None], other=0.0
            )  # (BK, BN)
            acc = _dot(x, w_t, acc, BASE_PRECISION, UPCAST)
            a_t = tl.load(
                a_ptr + ranks[None, :] * stride_ar + ks[:, None], mask=rank_ok[None, :] & (ks < K)[:, None], other=0.0
            )  # (BK, R)
            x_low = x.to(a_t.dtype)
            if HAS_MASK:  # dropout on the low-rank path; 1 / keep-probability rides in `scaling`
                keep = tl.load(keep_ptr + rows[:, None] * stride_km + ks[None, :], mask=x_ok, other=0)
                x_low = x_low * keep.to(a_t.dtype)
            low = _dot(x_low, a_t, low, LOW_PRECISION, UPCAST)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        base = acc.to(out_ptr.dtype.element_ty).to(tl.float32)  # rounded like F.linear's output
        b_t = tl.load(
            b_ptr + cols[None, :] * stride_bn + ranks[:, None] * stride_br,
            mask=rank_ok[:, None] & col_ok[None, :],
            other=0.0,
        )  # (R, BN)
        low = low.to(b_t.dtype)  # A x as the reference keeps it
        update = _dot(low, b_t, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), LOW_PRECISION, UPCAST)
        result = base + scaling * update  # one rounding, as addmm_ / add_ round
        tl.store(
            out_ptr + rows[:, None] * N + cols[None, :],
            result.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & col_ok[None, :],
        )
        if STORE_LOW:
            if tl.program_id(1) == 0:
                tl.store(low_ptr + rows[:, None] * RANK + ranks[None, :], low, mask=row_ok[:, None] & rank_ok[None, :])

    @triton.jit
    def _lora_input_grad_kernel(
        g_ptr,
        w_ptr,
        a_ptr,
        b_ptr,
        keep_ptr,
        out_ptr,
        gb_ptr,
        M,
        N,
        RANK,
        scaling,
        stride_gm,
        stride_wk,
        stride_ar,
        stride_bk,
        stride_br,
        stride_km,
        K: tl.constexpr,
        HAS_MASK: tl.constexpr,
        R: tl.constexpr,
        BASE_PRECISION: tl.constexpr,
        LOW_PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """out (M, N=in) = g W + s * ((g B) A) [* keep]; gb (M, RANK) = g B, rounded to the adapter dtype.
        g is (M, K=out), W (K, N), A (RANK, N), B (K, RANK)."""
        rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BM,)
        cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # (BN,) input features
        ranks = tl.arange(0, R)
        row_ok, col_ok, rank_ok = rows < M, cols < N, ranks < RANK
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # g W
        gb = tl.zeros((BLOCK_M, R), dtype=tl.float32)  # g B
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            g = tl.load(
                g_ptr + rows[:, None] * stride_gm + ks[None, :], mask=row_ok[:, None] & (ks < K)[None, :], other=0.0
            )  # (BM, BK)
            w = tl.load(
                w_ptr + ks[:, None] * stride_wk + cols[None, :], mask=(ks < K)[:, None] & col_ok[None, :], other=0.0
            )  # (BK, BN)
            acc = _dot(g, w, acc, BASE_PRECISION, UPCAST)
            b = tl.load(
                b_ptr + ks[:, None] * stride_bk + ranks[None, :] * stride_br,
                mask=(ks < K)[:, None] & rank_ok[None, :],
                other=0.0,
            )  # (BK, R)
            gb = _dot(g.to(b.dtype), b, gb, LOW_PRECISION, UPCAST)
        base = acc.to(out_ptr.dtype.element_ty).to(tl.float32)  # rounded like g @ W
        a = tl.load(
            a_ptr + ranks[:, None] * stride_ar + cols[None, :], mask=rank_ok[:, None] & col_ok[None, :], other=0.0
        )  # (R, BN)
        gb = gb.to(a.dtype)
        update = _dot(gb, a, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), LOW_PRECISION, UPCAST)
        out_ok = row_ok[:, None] & col_ok[None, :]
        if HAS_MASK:  # the reference rounds (g B) A to the adapter dtype, then multiplies by the mask
            keep = tl.load(keep_ptr + rows[:, None] * stride_km + cols[None, :], mask=out_ok, other=0)
            update = update.to(a.dtype).to(tl.float32) * keep.to(tl.float32)
        result = base + scaling * update
        tl.store(out_ptr + rows[:, None] * N + cols[None, :], result.to(out_ptr.dtype.element_ty), mask=out_ok)
        if tl.program_id(1) == 0:
            tl.store(gb_ptr + rows[:, None] * RANK + ranks[None, :], gb, mask=row_ok[:, None] & rank_ok[None, :])


def _precision(dtype: torch.dtype) -> str | None:
    """fp32 products in full precision (as the reference computes them, not tf32); Triton's default for
    half-precision ones."""
    return "ieee" if dtype == torch.float32 else None


def _rows(t: torch.Tensor) -> torch.Tensor:
    """`t` as (rows, features) with unit stride along the features."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _unit_stride(lora_a: torch.Tensor) -> torch.Tensor:
    """A read by rows: a copy only when it is a transposed view (nn.Linear weights never are)."""
    return lora_a if lora_a.stride(-1) == 1 else lora_a.contiguous()


def _launch_shape(m: int, n: int, lora_a: torch.Tensor) -> dict:
    """Grid and tile sizes: one row tile for a decoding step (rows past M masked off), 64-row tiles else."""
    block_m = 16 if m <= 16 else 64
    rank = max(_MIN_DOT, triton.next_power_of_2(lora_a.shape[0]))
    return dict(
        grid=(triton.cdiv(m, block_m), triton.cdiv(n, _BLOCK_N)),
        R=rank,
        BLOCK_M=block_m,
        BLOCK_N=_BLOCK_N,
        BLOCK_K=_BLOCK_K,
    )


def _mask_bytes(mask: torch.Tensor | None, shape: tuple[int, int], fallback: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The keep-mask as (rows, features) bytes and its row stride, or a stand-in pointer when there is none."""
    if mask is None:
        return fallback, 0
    keep = _rows(mask.reshape(shape)).view(torch.uint8)
    return keep, keep.stride(0)


def lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    mask: torch.Tensor | None = None,
    keep_low: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`lora_ops._forward_math` as one kernel: (out (N, out), A x (N, r) when `keep_low`, else None).

    `mask` is the bool keep-mask shaped like `x` (dropout on the low-rank path), `scaling` already divided
    by the keep probability, as `lora_ops.lora_linear` passes them.
    """
    x2, lora_a = _rows(x), _unit_stride(lora_a)  # (N, in), (r, in)
    m, n_out, rank = x2.shape[0], weight.shape[0], lora_a.shape[0]
    out = torch.empty((m, n_out), dtype=x.dtype, device=x.device)  # (N, out)
    low = torch.empty((m, rank), dtype=lora_a.dtype, device=x.device) if keep_low else out  # (N, r)
    keep, keep_stride = _mask_bytes(mask, x2.shape, x2)
    launch = _launch_shape(m, n_out, lora_a)
    _lora_forward_kernel[launch.pop("grid")](
        x2,
        weight,
        bias if bias is not None else weight,
        lora_a,
        lora_b,
        keep,
        out,
        low,
        m,
        n_out,
        rank,
        float(scaling),
        x2.stride(0),
        weight.stride(0),
        lora_a.stride(0),
        lora_b.stride(0),
        lora_b.stride(1),
        keep_stride,
        K=x2.shape[1],
        HAS_BIAS=bias is not None,
        HAS_MASK=mask is not None,
        STORE_LOW=keep_low,
        BASE_PRECISION=_precision(x.dtype),
        LOW_PRECISION=_precision(lora_a.dtype),
        UPCAST=x.device.type == "cpu",
        **launch,
    )
    return out, (low if keep_low else None)


def lora_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """`lora_ops.lora_linear_inference` as one kernel (the per-token path of generate); (..., out)."""
    out, _ = lora_forward(x, weight, bias, lora_a, lora_b, scaling)
    return out.view(*x.shape[:-1], weight.shape[0])


def lora_input_grad(
    grad_out: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x (N, in), g B (N, r)): the input-gradient of `lora_linear` and the rank-r product A's gradient
    needs, in one kernel; `grad_out` is (N, out) in the input dtype."""
    g, lora_a = _rows(grad_out), _unit_stride(lora_a)  # (N, out), (r, in)
    m, n_in, rank = g.shape[0], weight.shape[1], lora_a.shape[0]
    grad_x = torch.empty((m, n_in), dtype=g.dtype, device=g.device)  # (N, in)
    gb = torch.empty((m, rank), dtype=lora_b.dtype, device=g.device)  # (N, r)
    keep, keep_stride = _mask_bytes(mask, (m, n_in), g)
    launch = _launch_shape(m, n_in, lora_a)
    _lora_input_grad_kernel[launch.pop("grid")](
        g,
        weight,
        lora_a,
        lora_b,
        keep,
        grad_x,
        gb,
        m,
        n_in,
        rank,
        float(scaling),
        g.stride(0),
        weight.stride(0),
        lora_a.stride(0),
        lora_b.stride(0),
        lora_b.stride(1),
        keep_stride,
        K=g.shape[1],
        HAS_MASK=mask is not None,
        BASE_PRECISION=_precision(g.dtype),
        LOW_PRECISION=_precision(lora_a.dtype),
        UPCAST=g.device.type == "cpu",
        **launch,
    )
    return grad_x, gb
