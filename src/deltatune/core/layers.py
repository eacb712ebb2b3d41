"""Pieces every layer-changing method shares: the wrapped-layer base class and the trainable-copy wrapper.

A method's layer *wraps* the original module (`self.base_layer`) instead of subclassing it, so a 4-bit or
8-bit layer can sit underneath (QLoRA). Each wrapped layer keeps one small container per adapter name in
`self.adapters`; the state-dict key `...q_proj.adapters.<name>.lora_A.weight` becomes peft's
`...q_proj.lora_A.weight` in the adapter file (see `peft_key`).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from deltatune.core.layer_kinds import is_conv1d, is_quantized_linear
from deltatune.quantization import merge_into_quantized  # bitsandbytes itself loads only inside the call

BASE_ADAPTER_NAME = "__base__"  # a row of a mixed batch that should see no adapter


def as_names(adapter_names: str | Sequence[str]) -> list[str]:
    """One adapter name or several, as a list (peft's `set_adapter` takes either)."""
    return [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)


class WrappedLayer(nn.Module):
    """A module that wraps `base_layer` and keeps per-adapter containers in `adapters`; attributes it lacks are
    read from the wrapped layer (model code reads `layer.weight` or `layer.in_features`)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "adapters"):
                raise
            return getattr(self._modules["base_layer"], name)


class AdapterLayer(WrappedLayer):
    """A base layer plus named adapters; subclasses implement `adapter_forward` and, if they can, merging.

    Attributes:
        base_layer: the original module, frozen.
        adapters: one container module per adapter name.
        active_adapters: names applied in forward (usually one).
        merged_adapters: names whose update is currently folded into the base weight.
        disabled: True inside `PeftModel.disable_adapter()`.
        row_adapters: for a mixed batch, the adapter name of each row (set by `PeftModel` around forward).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.row_adapters: Sequence[str] | None = None

    def set_active(self, names: Sequence[str]) -> None:
        """Apply these adapters in forward; names this layer lacks are kept (as peft) and skipped."""
        self.active_adapters = list(names)

    # peft's per-layer API (`BaseTunerLayer`), for code that walks the model's adapter layers itself.
    @property
    def active_adapter(self) -> str | list[str]:
        return self.active_adapters[0] if len(self.active_adapters) == 1 else list(self.active_adapters)

    @property
    def disable_adapters(self) -> bool:
        return self.disabled

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def enable_adapters(self, enabled: bool) -> None:
        """Turn this layer's adapters on or off (off: the layer computes its base output only)."""
        self.disabled = not enabled

    def set_adapter(self, adapter_names: str | Sequence[str], inference_mode: bool = False) -> None:
        """Activate these adapters here; they train unless `inference_mode`, the others are frozen (as peft)."""
        self.set_active(as_names(adapter_names))
        for name, adapter in self.adapters.items():
            adapter.requires_grad_(name in self.active_adapters and not inference_mode)

    def get_base_layer(self) -> nn.Module:
        """The innermost wrapped layer."""
        base = self.base_layer
        return base.get_base_layer() if isinstance(base, AdapterLayer) else base

    def _all_available_adapter_names(self) -> list[str]:
        return list(self.adapters)

    def adapter_parts(self, name: str) -> list[nn.Module]:
        """Every module that holds adapter `name`'s parameters in this layer (one container, usually)."""
        return [self.adapters[name]]

    def delete_adapter(self, name: str) -> None:
        """Drop an adapter's container (unmerge it first if merged)."""
        if name in self.merged_adapters:
            self.unmerge()
        if name in self.adapters:
            del self.adapters[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def adapters_to_merge(self, names: Sequence[str] | None) -> list[str]:
        """The named (default: active) adapters of this layer not merged yet, with peft's warnings when some are."""
        wanted = [n for n in (names or self.active_adapters) if n in self.adapters]
        names = [n for n in wanted if n not in self.merged_adapters]
        if self.merged_adapters and wanted:  # peft's warnings, same words
            if names:
                warnings.warn(
                    f"Already following adapters were merged {','.join(self.merged_adapters)}. "
                    f"You are now additionally merging {','.join(names)}.",
                    stacklevel=4,
                )
            else:
                warnings.warn("All adapters are already merged, nothing to do.", stacklevel=4)
        return names

    def merge(self, names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Fold the named (default: active) adapters into the base weight; `safe_merge` checks for NaN first."""
        raise TypeError(f"{type(self).__name__} adapters cannot be merged into the base layer")

    def unmerge(self) -> None:
        """Undo `merge`, restoring the base weight."""
        raise TypeError(f"{type(self).__name__} adapters cannot be merged into the base layer")

    def unwrap(self) -> nn.Module:
        """The module to put back in the model when the adapters are removed."""
        return self.base_layer

    def adapter_forward(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Return `result` updated by adapter `name` for input `x` (subclasses implement)."""
        raise TypeError(f"{type(self).__name__} must implement adapter_forward")

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        if self.row_adapters is not None:
            return self.mixed_forward(x, result)
        for name in self.active_adapters:
            if name in self.adapters and name not in self.merged_adapters:
                result = self.adapter_forward(name, x, result)
        return result

    def mixed_forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Apply each row's own adapter: one pass per distinct adapter over the rows that asked for it."""
        output = result.clone()
        for name, rows in rows_by_adapter(self.row_adapters, x):
            if name in self.adapters:
                output[rows] = self.adapter_forward(name, x[rows], result[rows])
        return output


class MergeableLayer(AdapterLayer):
    """An `AdapterLayer` whose adapters fold into the base weight (LoRA, AdaLoRA): their containers have
    `delta_weight()`, shaped (out, in). Merging adds each update to the weight; unmerging takes it out again."""

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Adapter `adapter_name`'s update in the base weight's layout (Conv1D stores W transposed), peft's name."""
        delta = self.adapters[adapter_name].delta_weight()
        return delta.T if is_conv1d(self.base_layer) else delta

    def _base_weight_delta(self, name: str) -> torch.Tensor:
        """What to add to the base weight to merge adapter `name` (its update; a method may rescale W too)."""
        return self.get_delta_weight(name)

    def unmerge_delta(self, name: str, current: torch.Tensor | None = None) -> torch.Tensor:
        """What to add to the base weight (`current`: default the layer's own) to take merged adapter `name` out."""
        return -self._base_weight_delta(name)

    def _bias_delta(self, name: str) -> torch.Tensor | None:
        """What to add to the base bias to merge adapter `name`, or None (only LoRA with lora_bias has one)."""
        return None

    def _names_to_merge(self, names: Sequence[str] | None, safe_merge: bool) -> list[str]:
        """The named (default: active) adapters of this layer not merged yet; with `safe_merge`, checked first."""
        names = self.adapters_to_merge(names)
        if safe_merge:
            check_finite_merge(self.base_layer.weight, {name: self._base_weight_delta(name) for name in names})
            biases = {name: self._bias_delta(name) for name in names}
            biases = {name: b for name, b in biases.items() if b is not None}
            if biases:  # only lora_bias adapters have one, and only over a base with a bias (else refused above)
                check_finite_merge(self.base_layer.bias, biases)
        return names

    def _shift_weight(self, delta: torch.Tensor) -> None:
        """Add `delta` to the base weight: into the codes of a 4/8-bit base, else in place, summed in the delta's
        precision and rounded once to the weight's (as peft's `weight.data += delta`)."""
        if is_quantized_linear(self.base_layer):
            merge_into_quantized(self.base_layer, delta)
        else:
            with torch.no_grad():
                self.base_layer.weight.data += delta

    def _shift_bias(self, delta: torch.Tensor | None) -> None:
        if delta is not None:
            with torch.no_grad():
                self.base_layer.bias.data += delta

    def merge(self, names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        for name in self._names_to_merge(names, safe_merge):
            bias_delta = self._bias_delta(name)  # checked before the weight changes
            self._shift_weight(self._base_weight_delta(name))
            self._shift_bias(bias_delta)
            self.merged_adapters.append(name)  # one by one: a DoRA norm is taken on the weight without them

    def unmerge(self) -> None:
        for name in reversed(self.merged_adapters):
            self._shift_weight(self.unmerge_delta(name))
            bias_delta = self._bias_delta(name)
            self._shift_bias(-bias_delta if bias_delta is not None else None)
        self.merged_adapters = []


def check_finite_merge(weight: torch.Tensor, deltas: dict[str, torch.Tensor]) -> None:
    """peft's `safe_merge`: refuse, before any change, an update that would put NaN or inf into the base weight."""
    with torch.no_grad():
        for name, delta in deltas.items():
            merged = weight + delta if weight.is_floating_point() else delta  # packed 4/8-bit codes: the update
            if not torch.isfinite(merged).all():
                raise ValueError(
                    f"safe_merge: NaNs detected in the merged weights: adapter {name!r} would put NaN or inf into the "
                    "base weight, so nothing was merged "
                    "into this layer; the adapter is broken (load a good checkpoint or retrain it)"
                )


def embedding_lookup(base: nn.Embedding, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Look `x` up in `table` with the base embedding's own options (padding_idx, max_norm, ...), as its forward
    would: LoRA's A factor and trainable-token rows stand in for the base weight this way."""
    return nn.functional.embedding(
        x, table, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
    )


def embedding_scale(base: nn.Embedding, dtype: torch.dtype) -> torch.Tensor | float:
    """The factor an embedding applies in its own forward (Gemma 3's `embed_scale`, 1.0 for a plain one), for
    what an adapter puts in the embedding's place too (as peft): LoRA's update, trainable-token rows."""
    scale = getattr(base, "embed_scale", None)
    if scale is None:
        return 1.0
    if not isinstance(scale, torch.Tensor):
        scale = torch.tensor(scale, dtype=base.weight.dtype, device=base.weight.device)
    return scale.to(dtype)


def rows_by_adapter(row_adapters: Sequence[str], x: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (adapter name, row indices of `x`) for each distinct name in a mixed batch.

    `generate` with beams or several samples per prompt repeats each row k times; the names follow.
    """
    batch = x.shape[0]
    if batch != len(row_adapters):
        if batch % len(row_adapters):
            raise ValueError(
                f"Length of `adapter_names` should be the same as the number of inputs, but got {len(row_adapters)} "
                f"and {batch} respectively: adapter_names has {len(row_adapters)} entries for a batch of {batch} "
                "rows; give one per row"
            )
        row_adapters = [n for n in row_adapters for _ in range(batch // len(row_adapters))]
    for name in dict.fromkeys(row_adapters):
        if name == BASE_ADAPTER_NAME:
            continue
        rows = [i for i, n in enumerate(row_adapters) if n == name]
        yield name, torch.tensor(rows, device=x.device)


CONTAINERS = (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList)


class ModulesToSaveWrapper(nn.Module):
    """Keeps the original module frozen and a trainable copy per adapter name (peft's `modules_to_save`)."""

    def __init__(self, original_module: nn.Module) -> None:
        if isinstance(original_module, CONTAINERS):  # no forward of their own: a copy would never run (as peft)
            raise TypeError(
                f"modules_to_save cannot be applied to modules of type {type(original_module).__name__}: it holds "
                "modules or parameters but has no forward; list the modules inside it instead"
            )
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False
        self.row_adapters: Sequence[str] | None = None

    def __getattr__(self, name: str):
        # `model.head.weight` reads the copy that trains (the active adapter's), as peft: a model whose forward
        # reads the weight directly must see the trained values.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save") or "_modules" not in self.__dict__:
                raise
            return getattr(self._current_module(), name)

    def _current_module(self) -> nn.Module:
        """The module forward runs: the active adapter's copy, or the original when none is active or disabled."""
        copies = self._modules["modules_to_save"]
        active = self.__dict__.get("active_adapter")
        if self.__dict__.get("disabled") or active not in copies:
            return self._modules["original_module"]
        return copies[active]

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if self.active_adapter is not None else []

    @property
    def disable_adapters(self) -> bool:
        return self.disabled

    def enable_adapters(self, enabled: bool) -> None:
        self.disabled = not enabled

    def set_adapter(self, adapter_names: str | Sequence[str], inference_mode: bool = False) -> None:
        """Activate one adapter's copy here (the others freeze); two would be ambiguous, as in peft."""
        self.set_active(as_names(adapter_names))
        for name, copied in self.modules_to_save.items():
            copied.requires_grad_(name == self.active_adapter and not inference_mode)

    def _all_available_adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    def add(self, name: str) -> None:
        """Make a trainable copy of the original module for adapter `name`."""
        copied = copy.deepcopy(self.original_module)
        for param in copied.parameters():
            param.requires_grad_(True)
        self.modules_to_save[name] = copied

    def set_active(self, names: Sequence[str]) -> None:
        present = [n for n in names if n in self.modules_to_save]
        if len(present) > 1:  # one module cannot run two trained copies at once
            raise ValueError(
                f"Only one adapter can be set at a time for ModulesToSaveWrapper, got {len(present)}: adapters "
                f"{present} each train their own copy of this module (modules_to_save); activate one of them, or "
                "give them modules_to_save that do not overlap"
            )
        self.active_adapter = present[0] if present else None

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def unwrap(self, keep: str | None = None) -> nn.Module:
        """The trained copy of `keep` (default: the active adapter), else the original module."""
        keep = keep or self.active_adapter
        return self.modules_to_save[keep] if keep in self.modules_to_save else self.original_module

    def forward(self, *args, **kwargs):
        # Inputs pass as given: some models call their modules with keywords only (`vision(pixel_values=...)`).
        if self.row_adapters is not None and not self.disabled:
            return self._mixed_forward(*args, **kwargs)
        return self._current_module()(*args, **kwargs)

    def _mixed_forward(self, x: torch.Tensor, *args, **kwargs):
        """Each row through its own adapter's copy (rows of the base run the original)."""
        output = self.original_module(x, *args, **kwargs)
        if not isinstance(output, torch.Tensor):  # e.g. a GRU's (output, hidden): rows cannot be spliced
            raise TypeError(
                "Mixed batching is only supported for the following modules: Linear, Embedding, Conv1d, Conv2d, "
                "Conv3d. A mixed batch (adapter_names) needs modules_to_save modules that return one tensor, but "
                f"{type(self.original_module).__name__} returns {type(output).__name__}; run each adapter's "
                "rows in a separate call with set_adapter()"
            )
        output = output.clone()
        for name, rows in rows_by_adapter(self.row_adapters, x):
            if name in self.modules_to_save:
                output[rows] = self.modules_to_save[name](x[rows], *args, **kwargs)
        return output


def peft_key(internal_key: str, adapter_name: str) -> str:
    """Our state-dict key -> peft's file key: drop the per-adapter container level."""
    # peft keeps trainable-token rows one level deeper, in its wrapper's `token_adapter` (lora/trainable_tokens.py)
    tokens = f".adapters.{adapter_name}.trainable_tokens_"
    internal_key = internal_key.replace(tokens, ".token_adapter.trainable_tokens_")
    return internal_key.replace(f".adapters.{adapter_name}.", ".").replace(f".modules_to_save.{adapter_name}.", ".")


def belongs_to_adapter(internal_key: str, adapter_name: str) -> bool:
    """True for parameters inside adapter `adapter_name`'s containers or trainable copies."""
    return f".adapters.{adapter_name}." in internal_key or f".modules_to_save.{adapter_name}." in internal_key
