"""Combining LoRA adapters into a new one: peft's `add_weighted_adapter`, with the same results.

Each adapter i has an update dW_i = s_i B_i A_i on a layer; with weights w_i the combinations are:

- ``"cat"``: A = [w_1 s_1 A_1; w_2 s_2 A_2; ...] (rows), B = [B_1, B_2, ...] (columns), rank sum(r_i). B A is
  exactly sum_i w_i dW_i: exact, but the rank grows with every adapter.
- ``"svd"``: sum_i w_i dW_i, cut back to rank r (default: the largest r_i) by a truncated SVD, U S -> B, V^T -> A.
  Exact up to the dropped singular values.
- ``"linear"``: the A's mixed with sqrt(|w_i s_i|) (sign on A) and the B's with sqrt(|w_i s_i|); cheap, but
  B A is then not sum_i w_i dW_i (the cross terms stay); all r_i must be equal.
- Merging rules from model merging, on the A's and B's (``"ties"``, ``"dare_linear"``, ``"dare_ties"``,
  ``"magnitude_prune"``) or on the dW_i before the SVD (the same names + ``"_svd"``): TIES (Yadav et al., 2023,
  arXiv:2306.01708) keeps each tensor's largest `density` fraction of entries and, per entry, only the
  adapters that agree with the majority sign; DARE (Yu et al., 2023, arXiv:2311.03099) drops entries at
  random with keep probability `density` and rescales by 1 / density; magnitude pruning keeps the largest.

The new adapter has lora_alpha = r, so its own scale is 1 and the mixed factors carry all of it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from deltatune.core.config import PeftType
from deltatune.core.layers import ModulesToSaveWrapper
from deltatune.core.targeting import ALL_LINEAR
from deltatune.methods.lora.initialization import reads_base_weight
from deltatune.methods.lora.lora import LoraLayer

if TYPE_CHECKING:
    from deltatune.core.peft_model import PeftModel

FACTOR_RULES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_RULES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
NEEDS_DENSITY = {"ties", "dare_linear", "dare_ties", "magnitude_prune"}


# ---- the merging rules, on a list of same-shaped tensors --------------------------------------------------------
def _prune(tensor: torch.Tensor, density: float, random: bool) -> torch.Tensor:
    """Keep the `density` fraction of entries: the largest (magnitude) or a random draw, rescaled (DARE)."""
    if density >= 1:
        return tensor
    if random:
        return tensor * torch.bernoulli(torch.full_like(tensor, density)) / density
    mask = torch.zeros_like(tensor).reshape(-1)
    mask[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel())).indices] = 1
    return tensor * mask.reshape(tensor.shape)


def _weighted(tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(n, ...) tensors times their n weights, broadcast over the rest."""
    return tensors * weights.view(weights.shape + (1,) * (tensors.dim() - 1))


def _majority_sign_mask(tensors: torch.Tensor, method: str) -> torch.Tensor:
    """Per entry, which adapters agree with the sign of the total ("total") or of the vote ("frequency")."""
    sign = tensors.sign()
    magnitude = tensors.sum(dim=0) if method == "total" else sign.sum(dim=0)
    return sign == torch.where(magnitude >= 0, 1, -1)


def mix(
    rule: str,
    tensors: list[torch.Tensor],
    weights: torch.Tensor,
    density: float | None,
    majority_sign_method: str = "total",
) -> torch.Tensor:
    """One tensor from `tensors` by `rule` (a combination type without its "_svd" suffix)."""
    if rule in ("ties", "dare_ties", "dare_linear", "magnitude_prune"):
        tensors = [_prune(t, density, random=rule.startswith("dare")) for t in tensors]
    stacked = torch.stack(tensors, dim=0)  # (n, ...)
    if rule in ("ties", "dare_ties"):
        agree = _majority_sign_mask(stacked, majority_sign_method)
        return (_weighted(stacked, weights) * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)
    return _weighted(stacked, weights).sum(dim=0)


# ---- the new adapter's config -----------------------------------------------------------------------------------
def _check(
    model: PeftModel,
    adapters: Sequence[str],
    weights: Sequence[float],
    combination_type: str,
    density: float | None,
    majority_sign_method: str,
) -> None:
    for name in adapters:
        if name not in model.peft_config:
            raise ValueError(
                f"add_weighted_adapter: no adapter named {name!r}; this model has: {', '.join(model.peft_config)}"
            )
        config = model.peft_config[name]
        if config.peft_type is not PeftType.LORA:
            raise ValueError(f"add_weighted_adapter combines LoRA adapters; {name!r} is {config.peft_type.value}")
        if config.use_dora:
            raise ValueError(
                f"add_weighted_adapter cannot combine DoRA adapters ({name!r}): their magnitude vectors do not add"
            )
        lost = [field for field in ("lora_bias", "trainable_token_indices") if getattr(config, field)]
        if lost:  # peft drops these silently; saying so is better than losing them
            raise ValueError(
                f"add_weighted_adapter cannot combine adapters with {lost[0]} set ({name!r}): the "
                "combined adapter would lose their B biases / token rows"
            )
    if not adapters or len(weights) != len(adapters):
        raise ValueError(
            f"add_weighted_adapter: give one weight per adapter ({len(adapters)} adapters, {len(weights)} weights)"
        )
    if combination_type not in ("cat", *FACTOR_RULES, *SVD_RULES):
        raise ValueError(
            f"combination_type={combination_type!r} is not known; use one of: "
            f"{', '.join(('cat', *FACTOR_RULES, *SVD_RULES))}"
        )
    if combination_type.removesuffix("_svd") in NEEDS_DENSITY and (density is None or not 0 <= density <= 1):
        raise ValueError(
            f"combination_type={combination_type!r} needs density in [0, 1] (the fraction of entries "
            f"kept), got {density}"
        )
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method={majority_sign_method!r}; use 'total' or 'frequency'")
    _refuse_conv_and_attention(model, adapters)
    for wrapper in model.get_base_model().modules():
        if isinstance(wrapper, ModulesToSaveWrapper) and sum(a in wrapper.modules_to_save for a in adapters) > 1:
            raise ValueError(
                "add_weighted_adapter: two of the adapters train the same module in full "
                "(modules_to_save); full copies cannot be combined"
            )


def _refuse_conv_and_attention(model: PeftModel, adapters: Sequence[str]) -> None:
    """The rules here combine (r x in) / (out x r) factors; convolutions and nn.MultiheadAttention are refused."""
    for name, layer in model.get_base_model().named_modules():
        involved = isinstance(layer, LoraLayer) and any(a in layer.adapters for a in adapters)
        if involved and layer.kind in ("conv", "mha"):
            raise ValueError(
                f"add_weighted_adapter does not combine adapters on {name} ({type(layer.base_layer).__name__}): only "
                "linear and embedding layers; combine adapters that leave convolutions and attention layers out"
            )


def _new_rank(model: PeftModel, adapters: Sequence[str], combination_type: str, svd_rank: int | None) -> int:
    configs = [model.peft_config[a] for a in adapters]
    ranks = [max(c.r, *c.rank_pattern.values()) if c.rank_pattern else c.r for c in configs]  # the largest, as peft
    if combination_type == "cat":
        return sum(ranks)
    if combination_type in SVD_RULES:
        return svd_rank or max(ranks)
    if len(set(ranks)) != 1:
        raise ValueError(
            f"combination_type={combination_type!r} mixes the factors, which needs one rank; the "
            f"ranks are {dict(zip(adapters, ranks, strict=True))}: use 'svd' or 'cat'"
        )
    return ranks[0]


def _new_target_modules(model: PeftModel, adapters: Sequence[str]) -> set[str] | str:
    """The union of the adapters' targets: names as a set, regexes joined with "|" (as peft)."""
    targets = []
    for name in adapters:
        target = model.peft_config[name].target_modules
        if target == ALL_LINEAR:  # the module names it chose, as peft records them
            target = {
                key.rsplit(".", 1)[-1]
                for key, module in model.get_base_model().named_modules()
                if isinstance(module, LoraLayer) and name in module.adapters
            }
        targets.append(target)
    if all(isinstance(t, str) for t in targets):
        return "|".join(f"({t})" for t in targets)
    if any(isinstance(t, str) for t in targets):
        raise ValueError(
            "add_weighted_adapter: the adapters mix target_modules given as a regex and as a list of "
            "names; combine adapters that were targeted the same way"
        )
    return set().union(*targets)


# ---- the new factors, per layer ---------------------------------------------------------------------------------
def _factors(adapter) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) as (r, in), (out, r); for embeddings (r, vocab), (dim, r)."""
    if adapter.kind == "embedding":
        return adapter.lora_embedding_A, adapter.lora_embedding_B
    return adapter.lora_A.weight, adapter.lora_B.weight


def _cat(layer: LoraLayer, adapters, weights) -> tuple[torch.Tensor, torch.Tensor]:
    a_parts, b_parts = [], []
    for name, weight in zip(adapters, weights, strict=True):
        a, b = _factors(layer.adapters[name])
        a_parts.append(a.data * weight * layer.adapters[name].scaling)
        b_parts.append(b.data)
    return torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1)


def _mixed_factors(layer: LoraLayer, adapters, weights, rule, density, sign_method):
    """A and B each mixed by `rule`, with sqrt(|w s|) on both and the sign on A."""
    a_parts, b_parts, a_weights, b_weights = [], [], [], []
    for name, weight in zip(adapters, weights, strict=True):
        a, b = _factors(layer.adapters[name])
        w = weight * layer.adapters[name].scaling
        a_weights.append(math.sqrt(abs(w)) * (1 if w >= 0 else -1))
        b_weights.append(math.sqrt(abs(w)))
        a_parts.append(a.data)
        b_parts.append(b.data)
    new_a = mix(rule, a_parts, torch.tensor(a_weights).to(a_parts[0].device), density, sign_method)
    new_b = mix(rule, b_parts, torch.tensor(b_weights).to(b_parts[0].device), density, sign_method)
    return new_a.to(a_parts[0].dtype), new_b.to(a_parts[0].dtype)


def _svd_factors(layer: LoraLayer, adapters, weights, rule, density, sign_method, rank, clamp, full_matrices, driver):
    """The mixed update dW cut to `rank` by SVD: B = U S, A = V^T (clamped at the `clamp` quantile)."""
    # Each s B A as B is to A (out, in); an embedding's delta_weight is (vocab, dim), its transpose.
    deltas = [layer.adapters[name].delta_weight() for name in adapters]
    deltas = [delta.T for delta in deltas] if layer.kind == "embedding" else deltas
    weights = torch.tensor(list(weights)).to(deltas[0].device)
    delta = mix(rule.removesuffix("_svd"), deltas, weights, density, sign_method)  # (out, in)
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    u, vh = u[:, :rank] @ torch.diag(s[:rank]), vh[:rank, :]  # (out, rank), (rank, in)
    if clamp is not None:
        high = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
        u, vh = u.clamp(-high, high), vh.clamp(-high, high)
    return vh, u


def add_weighted_adapter(
    model: PeftModel,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> None:
    """Add adapter `adapter_name` made from `adapters` mixed with `weights` (see the module docstring).

    A layer that only some of the adapters reach mixes those; the new adapter is added, not activated
    (call `set_adapter`), and is frozen until then, as in peft.
    """
    _check(model, adapters, weights, combination_type, density, majority_sign_method)
    combination_type = "linear" if len(adapters) == 1 else combination_type  # as peft: one adapter is just scaled
    rank = _new_rank(model, adapters, combination_type, svd_rank)
    source = model.peft_config[adapters[0]]
    # The mixed factors overwrite the new adapter's: an init that reads (and changes) the base weight must not run.
    init = True if reads_base_weight(source.init_lora_weights) else source.init_lora_weights
    config = dataclasses.replace(
        source,
        r=rank,
        lora_alpha=rank,
        rank_pattern={},
        alpha_pattern={},
        init_lora_weights=init,
        loftq_config={},
        target_modules=_new_target_modules(model, adapters),
    )
    model.add_adapter(adapter_name, config)
    for layer in model.get_base_model().modules():
        if not isinstance(layer, LoraLayer) or adapter_name not in layer.adapters:
            continue
        present = [(a, w) for a, w in zip(adapters, weights, strict=True) if a in layer.adapters]
        if not present:
            continue
        names, layer_weights = zip(*present, strict=True)
        if combination_type == "cat":
            new_a, new_b = _cat(layer, names, layer_weights)
        elif combination_type in SVD_RULES:
            new_a, new_b = _svd_factors(
                layer,
                names,
                layer_weights,
                combination_type,
                density,
                majority_sign_method,
                rank,
                svd_clamp,
                svd_full_matrices,
                svd_driver,
            )
        else:
            new_a, new_b = _mixed_factors(layer, names, layer_weights, combination_type, density, majority_sign_method)
        a, b = _factors(layer.adapters[adapter_name])
        with torch.no_grad():
            a.zero_()[: new_a.shape[0], :] = new_a
            b.zero_()[:, : new_b.shape[1]] = new_b
