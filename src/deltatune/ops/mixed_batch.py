"""Mixed-adapter batches in one pass: every row gathers its own adapter's A and B and one `bmm` serves all.

The reference (`AdapterLayer.mixed_forward`, and peft) loops over the distinct adapters of the batch, each
time gathering its rows, running two matmuls, scaling and scattering the rows back: about five launches per
adapter per layer. Here all adapters of a layer are stacked once, ``(n + 1, r_max, in)`` and
``(n + 1, r_max, out)`` (B transposed, scaling folded in) and a zero slot for rows that use no adapter, so a
layer costs two gathers and two batched matmuls whatever the number of adapters. Adapters of a smaller rank
are padded with zeros, which adds exact zeros.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def expand_row_adapters(row_adapters: Sequence[str], batch: int) -> list[str]:
    """One name per row; `generate` with beams or several samples per prompt repeats each row k times."""
    if batch == len(row_adapters):
        return list(row_adapters)
    if batch % len(row_adapters):
        raise ValueError(f"adapter_names has {len(row_adapters)} entries for a batch of {batch} rows; give one per row")
    return [n for n in row_adapters for _ in range(batch // len(row_adapters))]


def row_index(row_adapters: Sequence[str], names: Sequence[str], batch: int, device: torch.device) -> torch.Tensor:
    """(batch,) slot of each row in the stacks built from `names`; unknown names and "__base__" -> zero slot."""
    slot = {name: i for i, name in enumerate(names)}
    rows = expand_row_adapters(row_adapters, batch)
    return torch.tensor([slot.get(n, len(names)) for n in rows], dtype=torch.long, device=device)


def stack_lora_weights(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (A (r, in), B (out, r), scaling) of each adapter, zero-padded to the largest rank.

    Returns:
        A stack (n + 1, r_max, in) and scaled B^T stack (n + 1, r_max, out); the last slot is all zeros.
        Both stay differentiable with respect to every A and B.
    """
    r_max = max(a.shape[0] for a, _, _ in factors)
    a_list = [F.pad(a, (0, 0, 0, r_max - a.shape[0])) for a, _, _ in factors]  # (r_max, in) each
    bt_list = [F.pad((b * s).T, (0, 0, 0, r_max - b.shape[1])) for _, b, s in factors]  # (r_max, out) each
    a_list.append(torch.zeros_like(a_list[0]))
    bt_list.append(torch.zeros_like(bt_list[0]))
    return torch.stack(a_list), torch.stack(bt_list)


def gather_row_factors(
    rows: torch.Tensor, a_stack: torch.Tensor, bt_stack: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's own factors: A^T (batch, in, r) and scaled B^T (batch, r, out)."""
    return a_stack.index_select(0, rows).transpose(1, 2), bt_stack.index_select(0, rows)


def apply_row_factors(
    x: torch.Tensor, result: torch.Tensor, a_rows_t: torch.Tensor, bt_rows: torch.Tensor
) -> torch.Tensor:
    """`result` plus x_i A_i^T B_i^T for every row i, in two batched matmuls (in place when nothing records)."""
    batch = x.shape[0]
    x3 = x.reshape(batch, -1, x.shape[-1]).to(a_rows_t.dtype)  # (batch, T, in)
    after_a = torch.bmm(x3, a_rows_t)  # (batch, T, r)
    out3 = result.view(batch, -1, result.shape[-1]) if result.is_contiguous() else None
    recording = torch.is_grad_enabled() and (result.requires_grad or after_a.requires_grad or bt_rows.requires_grad)
    if out3 is not None and not recording and result.dtype == bt_rows.dtype:
        out3.baddbmm_(after_a, bt_rows)  # in place: no (batch, T, out) temporary
        return result
    low = torch.bmm(after_a, bt_rows)  # (batch, T, out)
    return result + low.to(result.dtype).view(result.shape)


def mixed_lora_linear(
    x: torch.Tensor, result: torch.Tensor, rows: torch.Tensor, a_stack: torch.Tensor, bt_stack: torch.Tensor
) -> torch.Tensor:
    """`result` plus each row's own low-rank update.

    Args:
        x: layer input (batch, ..., in).
        result: base layer output (batch, ..., out); updated in place when no gradient is recorded.
        rows: (batch,) slot of each row in the stacks (see `row_index`).
        a_stack: (n + 1, r, in). bt_stack: (n + 1, r, out), scaled B^T.
    """
    return apply_row_factors(x, result, *gather_row_factors(rows, a_stack, bt_stack))
