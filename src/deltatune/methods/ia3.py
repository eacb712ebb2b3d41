"""(IA)³: Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al., 2022, "Few-Shot
Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning", arXiv:2205.05638).

Each adapted layer h = W x + b gets one trainable vector l that rescales activations element-wise::

    attention layers (keys, values):   h = l ⊙ (W x + b)          l = ia3_l: (out x 1)
    feed-forward layers (`feedforward_modules`): h = W (l ⊙ x) + b    l = ia3_l: (1 x in)

l starts at one, so the adapted model starts equal to the base; a layer costs out (or in) parameters, far fewer
than LoRA's r (in + out). Since l only rescales rows (or columns) of W, it folds into the weight: merging sets
W <- l ⊙ W (and b <- l ⊙ b for an attention layer); unmerging divides by l again, which is exact only up to
rounding (as in peft). Several active adapters multiply their vectors. Linear, transformers' Conv1D (which
stores W as (in, out)), nn.Conv2d / Conv3d (a vector per channel) and bitsandbytes 4/8-bit linear layers are
supported; same fields, files and numbers as peft's IA3.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from deltatune.core.config import PeftConfigWithTargets, PeftType
from deltatune.core.layer_kinds import (
    adapter_dtype,
    is_conv,
    is_conv1d,
    is_linear_like,
    is_quantized_linear,
    layer_dims,
)
from deltatune.core.layers import AdapterLayer, rows_by_adapter
from deltatune.core.targeting import find_targets, modules_to_save_names, wrap_modules_to_save, wrap_targets

# peft's defaults, for the architectures deltatune's LoRA table knows: keys and values of the attention, plus
# the feed-forward output (whose *input* is scaled, `FEEDFORWARD_MODULES`).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"],
    "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"],
    "bert": ["key", "value", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "phi": ["q_proj", "v_proj", "fc2"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
}
FEEDFORWARD_MODULES: dict[str, list[str]] = {
    "t5": ["wo"],
    "mt5": [],
    "gpt2": ["mlp.c_proj"],
    "bloom": ["mlp.dense_4h_to_h"],
    "roberta": ["output.dense"],
    "opt": ["fc2"],
    "gptj": ["fc_out"],
    "gpt_neox": ["dense_4h_to_h"],
    "gpt_neo": ["c_proj"],
    "bart": ["fc2"],
    "gpt_bigcode": ["mlp.c_proj"],
    "llama": ["down_proj"],
    "mistral": ["down_proj"],
    "mixtral": ["w2"],
    "bert": ["output.dense"],
    "deberta-v2": ["output.dense"],
    "deberta": ["output.dense"],
    "falcon": ["dense_4h_to_h"],
    "phi": ["fc2"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "gemma3_text": ["down_proj"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
}


@dataclass
class IA3Config(PeftConfigWithTargets):
    """(IA)³ settings (peft's field names and defaults); `target_modules` and the other targeting fields as LoRA.

    Attributes:
        feedforward_modules: the targets whose input is scaled (the paper's feed-forward rescaling) instead of
            their output: names (matched as a suffix of the module name, as peft) or one regex full-matched
            against it. A list must be a subset of a listed `target_modules`. None: the architecture's default.
        fan_in_fan_out: True for layers storing W as (in, out), like GPT-2's Conv1D (read from each layer, and
            recorded here, as peft does).
        init_ia3_weights: True starts every vector at one (adapted model == base); False keeps random normal
            values (for tests).
    """

    feedforward_modules: set[str] | list[str] | str | None = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        self.peft_type = PeftType.IA3
        super().__post_init__()
        if isinstance(self.feedforward_modules, (list, tuple)):
            self.feedforward_modules = set(self.feedforward_modules)
        both_listed = isinstance(self.feedforward_modules, set) and isinstance(self.target_modules, set)
        if both_listed and not self.feedforward_modules <= self.target_modules:
            extra = sorted(self.feedforward_modules - self.target_modules)
            raise ValueError(  # peft's words first
                f"`feedforward_modules` should be a subset of `target_modules`: {extra} are feedforward_modules but "
                f"not in target_modules={sorted(self.target_modules)}; add them to target_modules or drop them"
            )

    def to_dict(self) -> dict:
        """The file's fields; `layers_to_transform` / `layers_pattern` only when set (peft's IA3Config lacks them,
        and warns about keys it does not know)."""
        out = super().to_dict()
        for key in ("layers_to_transform", "layers_pattern"):
            if out[key] is None:
                del out[key]
        return out


def is_feedforward(config: IA3Config, module_name: str) -> bool:
    """peft's rule: a regex full-matches the module name, a name list matches its end (no dot needed)."""
    if isinstance(config.feedforward_modules, str):
        return re.fullmatch(config.feedforward_modules, module_name) is not None
    return any(module_name.endswith(name) for name in config.feedforward_modules)


class IA3Adapter(nn.Module):
    """One adapter's scaling vector for one layer: (out, 1) over the output, or (1, in) over the input; over a
    convolution (1, channels, 1, ...), which broadcasts over its (B, channels, spatial...) activations."""

    def __init__(self, in_features: int, out_features: int, feedforward: bool, init: bool, base: nn.Module) -> None:
        super().__init__()
        self.feedforward = feedforward
        if is_conv(base):
            shape = (1, in_features if feedforward else out_features) + (1,) * (base.weight.dim() - 2)
        else:
            shape = (1, in_features) if feedforward else (out_features, 1)
        vector = torch.randn(shape)  # drawn on the CPU in fp32, as peft, so a seed gives both libraries one value
        if init:
            nn.init.ones_(vector)
        device = base.weight.device if base.weight.device.type != "meta" else "meta"
        self.ia3_l = nn.Parameter(vector.to(device=device, dtype=adapter_dtype(base)))


def weight_factor(vector: torch.Tensor, feedforward: bool, base: nn.Module) -> torch.Tensor:
    """`vector` shaped to multiply the base weight: (out, in) for a Linear, (in, out) for Conv1D, the kernel
    (out, in / groups, k...) for a convolution (an input vector repeated for each group's outputs, as peft)."""
    if is_conv1d(base):
        return vector.T
    if not is_conv(base):
        return vector
    if not feedforward:
        return vector.transpose(0, 1)  # (out, 1, 1, ...)
    if base.groups == 1:
        return vector  # (1, in, 1, ...)
    in_per_group, out_per_group = base.in_channels // base.groups, base.out_channels // base.groups
    kernel_ones = vector.shape[2:]
    grouped = vector.reshape(base.groups, 1, in_per_group, *kernel_ones)
    grouped = grouped.expand(base.groups, out_per_group, in_per_group, *kernel_ones)
    return grouped.reshape(base.out_channels, in_per_group, *kernel_ones)


class IA3Layer(AdapterLayer):
    """A Linear / Conv1D / bitsandbytes 4/8-bit linear layer or an nn.Conv2d / Conv3d whose input or output
    (IA)³ vectors rescale."""

    def __init__(self, base_layer: nn.Module) -> None:
        if not (is_linear_like(base_layer) or isinstance(base_layer, (nn.Conv2d, nn.Conv3d))):
            raise TypeError(
                "IA3 supports nn.Linear, Conv1D, nn.Conv2d, nn.Conv3d and bitsandbytes linear layers, not "
                f"{type(base_layer).__name__}; choose other target_modules"
            )
        super().__init__(base_layer)
        self.in_features, self.out_features = layer_dims(base_layer)

    def add(self, name: str, config: IA3Config, feedforward: bool) -> None:
        base = self.base_layer
        self.adapters[name] = IA3Adapter(
            self.in_features, self.out_features, feedforward, config.init_ia3_weights, base
        )

    def _scale(self, names: Sequence[str], feedforward: bool) -> torch.Tensor | None:
        """The product of the named adapters' vectors of one kind, shaped for the activations, or None."""
        vectors = [self.adapters[n].ia3_l for n in names if self.adapters[n].feedforward == feedforward]
        if not vectors:
            return None
        scale = vectors[0]
        for vector in vectors[1:]:
            scale = scale * vector
        return scale if is_conv(self.base_layer) else scale.flatten()  # (1, C, 1, ...); a linear layer: (C,)

    def _scaled_forward(self, x: torch.Tensor, names: Sequence[str], *args, **kwargs) -> torch.Tensor:
        """The base layer with the named adapters applied: input vectors before it, output vectors after."""
        scale_in, scale_out = self._scale(names, True), self._scale(names, False)
        if is_quantized_linear(self.base_layer) and not torch.is_autocast_enabled() and names:
            x = x.float()  # bitsandbytes layers compute in the fp32 of the adapter here, as in peft
        if scale_in is not None:
            x = (x.to(scale_in.dtype) * scale_in).to(x.dtype)  # (B, T, in) or (B, in, spatial...)
        result = self.base_layer(x, *args, **kwargs)
        if scale_out is not None:
            result = (result * scale_out).to(result.dtype)  # (B, T, out) or (B, out, spatial...)
        return result

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled:
            return self.base_layer(x, *args, **kwargs)
        if self.row_adapters is not None:
            return self._mixed_forward(x, *args, **kwargs)
        names = [n for n in self.active_adapters if n in self.adapters and n not in self.merged_adapters]
        return self._scaled_forward(x, names, *args, **kwargs)

    def _mixed_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Each row through its own adapter (an input vector acts before the base layer, so rows rerun it)."""
        output = self.base_layer(x, *args, **kwargs).clone()
        for name, rows in rows_by_adapter(self.row_adapters, x):
            if name in self.adapters:
                output[rows] = self._scaled_forward(x[rows], [name], *args, **kwargs)
        return output

    # ---- merging: W <- l ⊙ W ---------------------------------------------------------------------------------
    def merge(self, names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        if is_quantized_linear(self.base_layer):
            raise ValueError(
                "Cannot merge ia3 layers when the model is loaded in 4-bit or 8-bit mode: scaling the quantised "
                "codes would round the vector away; use merge_and_unload(), which dequantises the base first"
            )
        for name in self.adapters_to_merge(names):
            weight, bias = self._scaled_weights(name, divide=False)
            if safe_merge:
                check_finite(name, weight, bias)
            self._write(weight, bias)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged_adapters:
            return
        warnings.warn("Unmerge result can be inaccurate for (IA)^3.", stacklevel=2)
        while self.merged_adapters:
            self._write(*self._scaled_weights(self.merged_adapters.pop(), divide=True))

    def _scaled_weights(self, name: str, divide: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The base weight and bias with adapter `name`'s vector multiplied in (or divided out: + 1e-8, as peft)."""
        adapter, base = self.adapters[name], self.base_layer
        factor = weight_factor(adapter.ia3_l.detach(), adapter.feedforward, base)
        factor = factor + 1e-8 if divide else factor
        op = torch.div if divide else torch.mul
        weight = op(base.weight.data, factor)
        bias = None
        if not adapter.feedforward and base.bias is not None:  # an output vector scales the bias too
            bias = op(base.bias.data, factor.reshape(base.bias.shape))
        return weight, bias

    def _write(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Store new base weight / bias values, rounded once to the base's dtypes."""
        base = self.base_layer
        base.weight.data = weight.to(base.weight.dtype)
        if bias is not None:
            base.bias.data = bias.to(base.bias.dtype)


def check_finite(name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """`safe_merge`: refuse a merged weight or bias with NaN / inf before anything is written (peft's words)."""
    for what, tensor in (("weights", weight), ("bias", bias)):
        if tensor is not None and not torch.isfinite(tensor).all():
            raise ValueError(
                f"NaNs detected in the merged {what}. The adapter {name} seems to be broken: its vector would put "
                "NaN or inf into the base layer, so nothing was merged into it (load a good checkpoint or retrain)"
            )


def _resolve_feedforward(model: nn.Module, config: IA3Config) -> None:
    """`config.feedforward_modules`, or the architecture's defaults written back into the config (as peft)."""
    if config.feedforward_modules is not None:
        return
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FEEDFORWARD_MODULES:
        raise ValueError(
            f"Please specify `feedforward_modules` in `peft_config`: deltatune has no default for "
            f"model_type={model_type!r}; pass feedforward_modules=[...] (a subset of target_modules, or [] for none)"
        )
    config.feedforward_modules = set(FEEDFORWARD_MODULES[model_type])


def add_ia3(model: nn.Module, config: IA3Config, adapter_name: str) -> None:
    """Wrap every targeted module of `model` in an `IA3Layer` and give it adapter `adapter_name`."""
    targets = find_targets(model, config, DEFAULT_TARGET_MODULES)
    _resolve_feedforward(model, config)
    modules_to_save_names(model, config.modules_to_save)  # checked before any layer is changed
    for name, layer in wrap_targets(model, targets, IA3Layer):
        if not is_conv(layer.base_layer):  # the layout is read from the layer, recorded (as peft)
            config.fan_in_fan_out = is_conv1d(layer.base_layer)
        layer.add(adapter_name, config, is_feedforward(config, name))
    wrap_modules_to_save(model, config.modules_to_save, adapter_name)


def add_weighted_ia3(
    model: nn.Module,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    **options: object,
) -> None:
    """peft's IA3 `add_weighted_adapter`: a new adapter whose vector in each layer is sum_i w_i l_i over the
    `adapters` that layer has, targeting the union of their modules (and of their feedforward modules).

    An existing `adapter_name` is left as it is (as peft). (IA)^3 vectors only combine linearly, so
    `combination_type` other than the default (or "linear") and LoRA's extra options are refused.
    """
    if combination_type not in ("svd", "linear") or options:
        raise ValueError(
            f"(IA)^3 adapters combine linearly (sum of weight x vector); combination_type={combination_type!r} "
            f"and options {sorted(options)} are LoRA's: call add_weighted_adapter(adapters, weights, name)"
        )
    if len(adapters) != len(weights):
        raise ValueError(f"add_weighted_adapter: {len(adapters)} adapters but {len(weights)} weights; give one each")
    if adapter_name in model.peft_config:
        return
    configs = [_existing_ia3_config(model, name) for name in adapters]
    _refuse_shared_modules_to_save(model, adapters)
    model.add_adapter(adapter_name, combined_config(configs))
    for layer in model.get_base_model().modules():
        if isinstance(layer, IA3Layer) and adapter_name in layer.adapters:
            _weighted_sum(layer, adapters, weights, adapter_name)


def _existing_ia3_config(model: nn.Module, name: str) -> IA3Config:
    if name not in model.peft_config:
        raise ValueError(f"Adapter {name} does not exist; this model has: {', '.join(model.peft_config)}")
    return model.peft_config[name]


def _refuse_shared_modules_to_save(model: nn.Module, adapters: Sequence[str]) -> None:
    """As peft: two of the adapters with their own copy of one module cannot be combined."""
    for module in model.get_base_model().modules():
        copies = getattr(module, "modules_to_save", None)
        if isinstance(copies, nn.ModuleDict) and sum(name in copies for name in adapters) > 1:
            raise ValueError("Cannot add weighted adapters targeting the same module with modules_to_save.")


def combined_config(configs: Sequence[IA3Config]) -> IA3Config:
    """The first config, with the union of every config's targets and feedforward modules (peft's rule: sets
    join, regexes join as alternatives; a mix of the two is refused)."""
    fields = {}
    for field in ("target_modules", "feedforward_modules"):
        values = [getattr(config, field) for config in configs]
        if len({type(value) for value in values}) > 1:
            raise ValueError("All adapter configs should have the same type for target and feedforward modules.")
        fields[field] = "|".join(f"({v})" for v in values) if isinstance(values[0], str) else set().union(*values)
    return dataclasses.replace(configs[0], **fields)


def _weighted_sum(layer: IA3Layer, adapters: Sequence[str], weights: Sequence[float], new: str) -> None:
    vector = layer.adapters[new].ia3_l
    vector.data.zero_()
    for name, weight in zip(adapters, weights, strict=True):
        if name in layer.adapters:
            vector.data += layer.adapters[name].ia3_l.data * weight
