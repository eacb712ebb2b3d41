"""LoRA on nn.MultiheadAttention (peft's `lora.MultiheadAttention`: same factors, numbers and file keys).

nn.MultiheadAttention keeps its query/key/value projection as one packed parameter `in_proj_weight` (3E x E) and
reads `out_proj.weight` (E x E) without calling `out_proj`, so neither can be adapted by wrapping a Linear's
forward. Both get a LoRA update, for every adapter (peft has no way to pick one of them either)::

    in_proj_weight'  = in_proj_weight  + s B A          A: (r x E), B: (3E x r)
    out_proj.weight' = out_proj.weight + s B_o A_o      A_o: (r x E), B_o: (E x r)

and forward runs torch's attention (`F.multi_head_attention_forward`) on the two adapted weights: nothing is
changed in place and gradients reach the adapters. peft instead merges before and unmerges after every forward.
One difference: peft 0.21 adds the out_proj update twice (W_o + 2 s B_o A_o) in forward and merge
(huggingface/peft#3774, a fix not released yet); deltatune adds it once, as that fix does, so outputs equal peft's
where B_o is zero (a fresh adapter) and equal the formula above always.

The out_proj adapters live in an `OutProjLora` put at `base_layer.out_proj`, so the file keys are peft's:
`mha.lora_A.weight`, `mha.lora_B.weight`, `mha.base_layer.out_proj.lora_A.weight`, ... As in peft: only packed
projections (kdim == vdim == embed_dim), no DoRA and no mixed batches (`adapter_names`); lora_bias is refused too
(peft accepts it but never applies the in_proj bias). lora_dropout does nothing here: the update goes into the
weights, not beside the input (as in peft).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.core.layers import WrappedLayer, check_finite_merge
from deltatune.methods.lora.lora import SPECIAL_LAYERS, LoraConfig, LoraLayer, new_adapter


def check_mha(base: nn.MultiheadAttention) -> None:
    """peft's limits: one packed in_proj (same dim for query, key and value) and a Linear out_proj."""
    if not base._qkv_same_embed_dim:
        raise ValueError(
            "Only same embed for query/key/value is supported as of now for MultiheadAttention "
            f"(this one has embed_dim={base.embed_dim}, kdim={base.kdim}, vdim={base.vdim}); leave it out of "
            "target_modules"
        )
    if not isinstance(base.out_proj, nn.Linear):
        raise TypeError(
            f"out_proj must be an instance of nn.Linear for MultiheadAttention, not {type(base.out_proj).__name__}"
        )


def check_config(config: LoraConfig) -> None:
    """What LoRA on nn.MultiheadAttention cannot do, refused before the layer changes."""
    if config.use_dora:
        raise ValueError("MultiheadAttention does not support DoRA (yet), please set use_dora to False")
    if config.lora_bias:
        raise ValueError(
            "lora_bias=True does not work on nn.MultiheadAttention (peft never applies its in_proj bias); leave the "
            "attention layer out of target_modules or drop lora_bias"
        )


class OutProjLora(WrappedLayer):
    """The out_proj Linear of an adapted nn.MultiheadAttention, with that layer's out_proj adapters beside it.

    nn.MultiheadAttention reads only `out_proj.weight` and `out_proj.bias` (answered from the Linear);
    `LoraMultiheadAttention` adds the update. Calling this module runs the plain Linear.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x)


class LoraMultiheadAttention(LoraLayer):
    """An nn.MultiheadAttention with LoRA adapters on its in_proj (`self.adapters`) and out_proj
    (`base_layer.out_proj.adapters`), one of each per adapter name."""

    def __init__(self, base_layer: nn.MultiheadAttention) -> None:
        check_mha(base_layer)
        super().__init__(base_layer)  # kind "mha": in_features E, out_features 3E (the in_proj)
        base_layer.out_proj = OutProjLora(base_layer.out_proj)

    @property
    def out_proj_lora(self) -> OutProjLora:
        return self.base_layer.out_proj

    @property
    def out_proj(self) -> nn.Linear:
        """The attention's own out_proj Linear (as peft exposes it; other attributes are read from the base)."""
        return self.out_proj_lora.base_layer

    def add(self, name: str, r: int, alpha: float, config: LoraConfig) -> None:
        check_config(config)
        embed, out = self.base_layer.embed_dim, self.out_proj_lora
        if not self.adapters:  # peft builds the first adapter's out_proj factors twice: draw as often
            new_adapter("linear", embed, embed, r, alpha, config, out.weight)
        self.adapters[name] = new_adapter("linear", embed, 3 * embed, r, alpha, config, self.base_layer.in_proj_weight)
        out.adapters[name] = new_adapter("linear", embed, embed, r, alpha, config, out.weight)

    def adapter_parts(self, name: str) -> list[nn.Module]:
        return [self.adapters[name], self.out_proj_lora.adapters[name]]

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        if name in self.out_proj_lora.adapters:
            del self.out_proj_lora.adapters[name]

    def set_adapter(self, adapter_names: str | Sequence[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode)
        for name, adapter in self.out_proj_lora.adapters.items():  # the out_proj halves follow the in_proj ones
            adapter.requires_grad_(name in self.active_adapters and not inference_mode)

    def _restore_weights(self) -> None:
        """peft's repair after its merge-around-forward; here the weights are never unregistered: nothing to do."""

    def _weights(self, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(in_proj_weight, out_proj.weight) with the updates of adapters `names` added, in the base dtype."""
        in_proj, out_proj = self.base_layer.in_proj_weight, self.out_proj_lora.weight
        for name in names:
            in_proj = in_proj + self.adapters[name].delta_weight().to(in_proj.dtype)  # (3E, E)
            out_proj = out_proj + self.out_proj_lora.adapters[name].delta_weight().to(out_proj.dtype)  # (E, E)
        return in_proj, out_proj

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.row_adapters is not None:
            raise TypeError(
                "lora.MultiheadAttention does not support mixed adapter batches (as in peft); run each adapter's rows "
                "separately after set_adapter(name)"
            )
        options = dict(
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )
        pending = (
            []
            if self.disabled
            else [n for n in self.active_adapters if n in self.adapters and n not in self.merged_adapters]
        )
        if not pending:  # disabled, or everything merged: exactly the base layer
            return self.base_layer(query, key, value, **options)
        in_proj, out_proj = self._weights(pending)
        output, weights = attention(self.base_layer, in_proj, out_proj, query, key, value, **options)
        return output.to(query.dtype), weights.to(query.dtype) if weights is not None else None

    def _names_to_merge(self, names: Sequence[str] | None, safe_merge: bool) -> list[str]:
        names = super()._names_to_merge(names, safe_merge=False)  # peft's warnings; the checks are on two weights
        if safe_merge:
            base, out = self.base_layer, self.out_proj_lora
            check_finite_merge(base.in_proj_weight, {n: self.adapters[n].delta_weight() for n in names})
            check_finite_merge(out.weight, {n: out.adapters[n].delta_weight() for n in names})
        return names

    def merge(self, names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        for name in self._names_to_merge(names, safe_merge):
            self._shift(name, 1)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        for name in reversed(self.merged_adapters):
            self._shift(name, -1)
        self.merged_adapters = []

    def _shift(self, name: str, sign: int) -> None:
        """Add (sign 1) or take out (-1) adapter `name`'s updates in place, rounded to the base dtype (as peft)."""
        in_proj, out_proj = self.base_layer.in_proj_weight, self.out_proj_lora.weight
        with torch.no_grad():
            in_proj.data += sign * self.adapters[name].delta_weight().to(in_proj.dtype)
            out_proj.data += sign * self.out_proj_lora.adapters[name].delta_weight().to(out_proj.dtype)

    def unwrap(self) -> nn.MultiheadAttention:
        """The plain nn.MultiheadAttention, its out_proj a plain Linear again."""
        self.base_layer.out_proj = self.out_proj_lora.base_layer
        return self.base_layer


def attention(
    mha: nn.MultiheadAttention,
    in_proj_weight: torch.Tensor,
    out_proj_weight: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    **options,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """nn.MultiheadAttention's forward (its general path) with these two projection weights."""
    batch_first = mha.batch_first and query.dim() == 3
    if batch_first:  # torch's attention wants (T, B, E); keep self-attention's shared tensors shared, as torch does
        query, key, value = _time_first(query, key, value)
    output, weights = F.multi_head_attention_forward(
        query,
        key,
        value,
        mha.embed_dim,
        mha.num_heads,
        in_proj_weight,
        mha.in_proj_bias,
        mha.bias_k,
        mha.bias_v,
        mha.add_zero_attn,
        mha.dropout,
        out_proj_weight,
        mha.out_proj.bias,
        training=mha.training,
        **options,
    )
    return (output.transpose(1, 0) if batch_first else output), weights


def _time_first(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(B, T, E) -> (T, B, E) for each, transposing a tensor passed twice only once (torch then projects once)."""
    if key is value:
        if query is key:
            query = key = value = query.transpose(1, 0)
        else:
            query, key = (t.transpose(1, 0) for t in (query, key))
            value = key
        return query, key, value
    return tuple(t.transpose(1, 0) for t in (query, key, value))


SPECIAL_LAYERS[nn.MultiheadAttention] = LoraMultiheadAttention  # what add_lora wraps such a module in
