"""Trainable tokens: train only chosen rows of an embedding beside a LoRA adapter (peft's
`LoraConfig(trainable_token_indices=...)`).

Teaching a model new special tokens (a chat template's `<|im_start|>`, ...) needs their embedding rows to
train, but training the whole embedding (`modules_to_save=["embed_tokens"]`) trains and saves vocab x dim
values. Here only the chosen rows are parameters. For token indices I (k of them) an adapter holds
`trainable_tokens_delta` (k x dim), which starts as W[I], and the layer computes with

    W' = W with rows I *replaced* by trainable_tokens_delta          (replaced, not added to: as peft)

so the model starts equal to the base, only rows I get gradients, and merging writes the rows into W (the
original rows are kept to unmerge). Replacing (rather than adding a delta) keeps the result defined when the
embedding was resized and its new rows drawn at random again.

Tied weights: when `tie_word_embeddings` is set and the input embedding gets rows, every other module that
shares its weight (the LM head; T5's encoder / decoder `embed_tokens`) is wrapped too, *tied* to the
embedding's layer: it owns nothing and computes with the same replaced rows, so the head scores the new
tokens with their trained rows. The rows are saved once, under the embedding.

File keys are peft's: `<embedding>.token_adapter.trainable_tokens_delta` (see `layers.peft_key`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.core.layers import AdapterLayer, embedding_lookup, embedding_scale, rows_by_adapter
from deltatune.core.targeting import adapter_internal_names, modules_to_save_names, replace_module

FIELD = "trainable_token_indices"


# ---- the config value -----------------------------------------------------------------------------------------
def _check_index_list(indices, where: str) -> list[int]:
    """A list of distinct non-negative ints (bools refused), or a TypeError / ValueError naming `where`."""
    if not isinstance(indices, (list, tuple)) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in indices
    ):
        raise TypeError(
            f"{where}={indices!r} must be a list of token ids (ints), e.g. tokenizer.convert_tokens_to_ids(['<tok>'])"
        )
    if not indices:
        raise ValueError(f"{where}=[] lists no token; give at least one token id or leave {FIELD}=None")
    if any(i < 0 for i in indices):
        raise ValueError(f"{where}={list(indices)!r} has a negative token id; token ids start at 0")
    repeated = sorted({i for i in indices if list(indices).count(i) > 1})
    if repeated:
        raise ValueError(f"{where} lists token ids {repeated} more than once; list each token once")
    return list(indices)


def check_token_indices(value) -> list[int] | dict[str, list[int]] | None:
    """`LoraConfig.trainable_token_indices`, checked: None, a list of token ids (for the model's input
    embedding), or {module name or name suffix: list of token ids}."""
    if value is None:
        return None
    if isinstance(value, dict):
        if not value:
            raise ValueError(f"{FIELD}={{}} names no layer; give {{'embed_tokens': [ids]}} or leave it None")
        for key in value:
            if not isinstance(key, str) or not key:
                raise TypeError(f"{FIELD} keys must be module names such as 'embed_tokens', got {key!r}")
        return {key: _check_index_list(ids, f"{FIELD}[{key!r}]") for key, ids in value.items()}
    return _check_index_list(value, FIELD)


# ---- the layer ------------------------------------------------------------------------------------------------
class TokenRows(nn.Module):
    """One adapter's rows of one layer: the trainable rows and the originals they replace."""

    def __init__(self, weight: torch.Tensor, indices: Sequence[int]) -> None:
        super().__init__()
        self.token_indices = list(indices)
        originals = weight.detach()[torch.tensor(self.token_indices, device=weight.device)].clone()  # (k, dim)
        self.trainable_tokens_delta = nn.Parameter(originals.clone())  # (k, dim), in the weight's dtype (as peft)
        # Not saved (peft neither): the base weight gives them back; used to unmerge.
        self.register_buffer("trainable_tokens_original", originals, persistent=False)
        self.register_buffer("index", torch.tensor(self.token_indices, device=weight.device), persistent=False)


class TrainableTokensLayer(AdapterLayer):
    """An embedding (or a linear head) whose chosen rows are replaced by each adapter's trainable rows.

    Args:
        base_layer: an nn.Embedding (a subclass such as Gemma 3's scaled one) or an nn.Linear head.
        tied_to: for a module sharing its weight with the input embedding, the embedding's layer: this layer
            then holds no rows of its own and uses the embedding's (kept in a list so it is no submodule and
            its rows are saved once).
    """

    def __init__(self, base_layer: nn.Module, tied_to: TrainableTokensLayer | None = None) -> None:
        super().__init__(base_layer)
        self._tied_to = [tied_to] if tied_to is not None else []

    @property
    def owner(self) -> TrainableTokensLayer:
        """The layer that holds the rows: the embedding's layer for a tied one, else this one."""
        return self._tied_to[0] if self._tied_to else self

    def add(self, name: str, indices: Sequence[int]) -> None:
        """Give adapter `name` trainable copies of rows `indices`."""
        if self._tied_to:
            raise ValueError("a tied layer follows the input embedding's rows and takes none of its own")
        self.adapters[name] = TokenRows(self.base_layer.weight, indices)

    def set_active(self, names: Sequence[str]) -> None:
        self.active_adapters = [n for n in names if n in self.owner.adapters]

    def replaced_weight(self, weight: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """`weight` (vocab, dim) with the rows of adapters `names` replaced by their trainable rows."""
        for name in names:
            rows = self.owner.adapters[name]
            weight = weight.index_copy(0, rows.index.to(weight.device), rows.trainable_tokens_delta.to(weight))
        return weight

    def _compute(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The base layer's own computation, with `weight` in place of its weight."""
        base = self.base_layer
        if isinstance(base, nn.Embedding):
            out = embedding_lookup(base, x, weight)  # (B, T, dim)
            return out * embedding_scale(base, out.dtype) if getattr(base, "embed_scale", None) is not None else out
        return F.linear(x, weight, base.bias)  # a linear head, tied or named in the dict: (B, T, vocab)

    def adapter_forward(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        return self._compute(self.replaced_weight(self.base_layer.weight, [name]), x)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled:
            return self.base_layer(x, *args, **kwargs)
        if self.row_adapters is not None:
            return self.mixed_forward(x, self.base_layer(x, *args, **kwargs))
        names = [n for n in self.active_adapters if n not in self.merged_adapters]
        if not names:
            return self.base_layer(x, *args, **kwargs)
        return self._compute(self.replaced_weight(self.base_layer.weight, names), x)

    def mixed_forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        output = result.clone()
        for name, rows in rows_by_adapter(self.row_adapters, x):
            if name in self.owner.adapters:
                output[rows] = self.adapter_forward(name, x[rows], result[rows]).to(output.dtype)
        return output

    def _check_disjoint(self, names: Sequence[str]) -> None:
        """As peft: adapters whose rows overlap cannot be merged together (which one's row would win?)."""
        seen: dict[int, str] = {}
        for name in dict.fromkeys(names):
            for index in self.owner.adapters[name].token_indices:
                if index in seen:
                    raise ValueError(
                        f"adapters {seen[index]!r} and {name!r} both train token {index}; only adapters "
                        "with disjoint trainable_token_indices can be merged together"
                    )
                seen[index] = name

    def merge(self, names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Write the adapters' rows into the base weight (a tied layer only records it: the weight is shared)."""
        names = [
            n for n in (names or self.active_adapters) if n in self.owner.adapters and n not in self.merged_adapters
        ]
        if not self._tied_to and names:
            self._check_disjoint(self.merged_adapters + names)
            if safe_merge:
                for name in names:
                    if not torch.isfinite(self.adapters[name].trainable_tokens_delta).all():
                        raise ValueError(
                            f"safe_merge: adapter {name!r} has NaN or inf token rows, so nothing "
                            "was merged into this layer; the adapter is broken (retrain or reload it)"
                        )
            with torch.no_grad():
                weight = self.base_layer.weight
                for name in names:
                    rows = self.adapters[name]
                    weight.index_copy_(0, rows.index.to(weight.device), rows.trainable_tokens_delta.to(weight))
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Put the original rows back, last merged first."""
        if not self._tied_to:
            with torch.no_grad():
                weight = self.base_layer.weight
                for name in reversed(self.merged_adapters):
                    rows = self.adapters[name]
                    weight.index_copy_(0, rows.index.to(weight.device), rows.trainable_tokens_original.to(weight))
        self.merged_adapters = []


# ---- choosing the layers (checked before the model changes) and wrapping them ------------------------------------
@dataclass
class TokensPlan:
    """Where an adapter's trainable tokens go.

    Attributes:
        layers: module name -> token ids, for the layers that hold rows.
        embedding: the input embedding's name when it is among `layers` and the tied modules follow it.
        tied: names of the modules that share the input embedding's weight and follow its rows.
    """

    layers: dict[str, list[int]]
    embedding: str | None = None
    tied: list[str] = field(default_factory=list)


def _unwrapped(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, AdapterLayer) else module


def _input_embedding_name(model: nn.Module) -> str:
    """The name of `get_input_embeddings()` (peft's fallback: "embed_tokens")."""
    get_input = getattr(model, "get_input_embeddings", None)
    embedding = get_input() if callable(get_input) else None
    return next((n for n, m in model.named_modules() if embedding is not None and m is embedding), "embed_tokens")


def _embedding_names(model: nn.Module) -> str:
    """A short list of the embedding layers, for errors."""
    names = [n for n, m in model.named_modules() if isinstance(_unwrapped(m), nn.Embedding)]
    return ", ".join(dict.fromkeys(names)) or "(none)"


def _resolve(model: nn.Module, value: list[int] | dict[str, list[int]]) -> dict[str, list[int]]:
    """{module name: ids}. Keys match as in peft: every module whose full name ends with the key."""
    wanted = value if isinstance(value, dict) else {_input_embedding_name(model): value}
    inside = adapter_internal_names(model)
    names = [n for n, _ in model.named_modules(remove_duplicate=False) if n and n not in inside]
    layers: dict[str, list[int]] = {}
    for key, ids in wanted.items():
        found = [n for n in names if n.endswith(key)]
        if not found:
            raise ValueError(
                f"{FIELD}: {key!r} matched no module of {type(model).__name__}; give an embedding "
                f"layer's name or name suffix, e.g. one of: {_embedding_names(model)}"
            )
        layers.update({n: ids for n in found})
    return layers


def _tied_names(model: nn.Module, embedding_name: str) -> list[str]:
    """Modules sharing the input embedding's weight, when the model ties them (`tie_word_embeddings`)."""
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return []
    embedding = model.get_submodule(embedding_name)
    weight = _unwrapped(embedding).weight
    inside = adapter_internal_names(model)
    modules = model.named_modules(remove_duplicate=False)
    return [
        n
        for n, m in modules
        if n and n not in inside and m is not embedding and getattr(_unwrapped(m), "weight", None) is weight
    ]


def _tie_plan(model: nn.Module, layers: dict[str, list[int]]) -> TokensPlan:
    """As peft: rows on the input embedding carry over to the modules tied to it, unless the config gives a
    tied module other token ids (then each listed layer keeps its own rows and nothing is tied)."""
    embedding = _input_embedding_name(model)
    if embedding not in layers:
        return TokensPlan(layers)
    tied = _tied_names(model, embedding)
    if any(layers[n] != layers[embedding] for n in tied if n in layers):
        return TokensPlan(layers)
    return TokensPlan({n: ids for n, ids in layers.items() if n not in tied}, embedding, tied)


def _check_layer(model: nn.Module, name: str, ids: list[int] | None, lora_targets: Sequence[str]) -> None:
    """A layer that can take rows: an embedding or linear head, no other method's layer, indices in range."""
    module = model.get_submodule(name)
    if name in lora_targets or (isinstance(module, AdapterLayer) and not isinstance(module, TrainableTokensLayer)):
        raise ValueError(
            f"{FIELD}: {name} is also a LoRA target; a module takes one method: drop it from "
            f"target_modules, or from {FIELD}"
        )
    base = _unwrapped(module)
    if not isinstance(base, (nn.Embedding, nn.Linear)):
        raise TypeError(
            f"{FIELD}: {name} is a {type(base).__name__}, not an nn.Embedding (or a linear LM head); "
            f"name an embedding layer, e.g. one of: {_embedding_names(model)}"
        )
    if ids is None:
        return
    if isinstance(module, TrainableTokensLayer) and module._tied_to:
        raise ValueError(
            f"{FIELD}: {name} shares its weight with the input embedding and follows its rows "
            "(tied weights); give the rows to the input embedding instead"
        )
    vocab = base.weight.shape[0]
    outside = [i for i in ids if i >= vocab]
    if outside:
        raise ValueError(
            f"{FIELD}: token ids {outside} are outside {name}'s {vocab} rows (0..{vocab - 1}); for "
            "new tokens call model.resize_token_embeddings(len(tokenizer)) before adding the adapter"
        )


def plan_trainable_tokens(model: nn.Module, config, lora_targets: Sequence[str]) -> TokensPlan | None:
    """Where `config.trainable_token_indices` puts rows, with every problem raised before the model changes."""
    value = getattr(config, FIELD, None)
    if value is None:
        return None
    plan = _tie_plan(model, _resolve(model, value))
    full = set(modules_to_save_names(model, config.modules_to_save))
    for name in [*plan.layers, *plan.tied]:
        if name in full:
            raise ValueError(
                f"{name} is in both modules_to_save (trained in full) and {FIELD} (some rows "
                "trained); keep it in one of them"
            )
        _check_layer(model, name, plan.layers.get(name), lora_targets)
    return plan


def add_trainable_tokens(model: nn.Module, plan: TokensPlan | None, adapter_name: str) -> None:
    """Wrap the planned layers in `TrainableTokensLayer`s and give them adapter `adapter_name`'s rows."""
    if plan is None:
        return
    for name, ids in plan.layers.items():
        module = model.get_submodule(name)
        if not isinstance(module, TrainableTokensLayer):
            module = TrainableTokensLayer(module)
            replace_module(model, name, module)
        module.add(adapter_name, ids)
    if plan.embedding is None:
        return
    owner = model.get_submodule(plan.embedding)
    for name in plan.tied:
        module = model.get_submodule(name)
        if not isinstance(module, TrainableTokensLayer):
            replace_module(model, name, TrainableTokensLayer(module, tied_to=owner))
