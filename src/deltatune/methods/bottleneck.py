"""Bottleneck adapters: small networks inserted in every Transformer layer (Houlsby et al., 2019,
"Parameter-Efficient Transfer Learning for NLP", arXiv:1902.00751; Pfeiffer et al., 2021, arXiv:2005.00247).

After a chosen sub-layer with output h (hidden size d), an adapter with a bottleneck of m << d units adds::

    h' = h + W_up f(W_down h + b_down) + b_up        W_down: (m x d), W_up: (d x m), f a non-linearity

W_up and b_up start at zero, so the adapted model starts exactly equal to the base. Presets choose the places:

- "houlsby": after the attention block's output projection and after the feed-forward block (2 per layer);
- "pfeiffer": after the feed-forward block only (1 per layer, about half the parameters).

Each place costs 2 d m + m + d parameters. The adapter is non-linear, so it cannot be merged into the base
weights (an extra step at inference, as the tutorials note).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from deltatune.core.config import PeftConfigWithTargets, PeftType, check_range
from deltatune.core.layer_kinds import adapter_dtype, layer_dims
from deltatune.core.layers import AdapterLayer
from deltatune.core.targeting import find_targets, in_layers, is_excluded, wrap_modules_to_save, wrap_targets

# Which sub-layers each preset puts an adapter after.
PRESETS: dict[str, tuple[str, ...]] = {"houlsby": ("attention", "ffn"), "pfeiffer": ("ffn",)}

# model_type -> (name of the layer list, regex of the attention output module, regex of the feed-forward output
# module); the regexes match the module name after `<layer list>.<i>.`.
_LLAMA_STYLE = ("layers", r"self_attn\.o_proj", r"mlp\.down_proj")
ADAPTER_SITES: dict[str, tuple[str, str, str]] = {
    "llama": _LLAMA_STYLE,
    "mistral": _LLAMA_STYLE,
    "qwen2": _LLAMA_STYLE,
    "qwen3": _LLAMA_STYLE,
    "gemma": _LLAMA_STYLE,
    "gemma2": _LLAMA_STYLE,
    "phi3": _LLAMA_STYLE,
    "olmo": _LLAMA_STYLE,
    "bloom": ("h", r"self_attention\.dense", r"mlp\.dense_4h_to_h"),
    "gpt2": ("h", r"attn\.c_proj", r"mlp\.c_proj"),
    "opt": ("layers", r"self_attn\.out_proj", r"fc2"),
    "bert": ("layer", r"attention\.output\.dense", r"output\.dense"),
    "roberta": ("layer", r"attention\.output\.dense", r"output\.dense"),
    "xlm-roberta": ("layer", r"attention\.output\.dense", r"output\.dense"),
    # T5: self-attention only (no cross-attention adapters, as in AdapterHub's presets); FFN is layer 1 or 2.
    "t5": ("block", r"layer\.0\.SelfAttention\.o", r"layer\.\d+\.DenseReluDense\.wo"),
    "mt5": ("block", r"layer\.0\.SelfAttention\.o", r"layer\.\d+\.DenseReluDense\.wo"),
}

NON_LINEARITIES = ("relu", "gelu", "gelu_new", "silu", "swish", "tanh", "sigmoid", "leaky_relu", "mish", "linear")


@dataclass
class AdapterConfig(PeftConfigWithTargets):
    """Bottleneck adapter settings (`peft_type` "BOTTLENECK", a deltatune method).

    Attributes:
        preset: "houlsby" (after attention and after the feed-forward block) or "pfeiffer" (after the
            feed-forward block only).
        reduction_factor: bottleneck size = hidden size // reduction_factor (16: m = 128 for d = 2048).
        bottleneck_size: the number of bottleneck units m, used instead of `reduction_factor` when set.
        non_linearity: f between the two projections ("relu", "gelu", "silu"/"swish", "tanh", ...).
        residual: True adds the adapter to its input (h + adapter(h), Houlsby's inner skip connection); False
            replaces h by adapter(h), so the model does not start equal to the base (for ablations).
        adapter_dropout: dropout on the adapter's input, in [0, 1).
        init_weights: True starts the up-projection at zero (adapted model == base); False draws it at random
            (for tests).
        target_modules: put an adapter after each of these modules instead of the preset's places (exact names,
            dotted suffixes or a regex, matched as for LoRA).
    """

    preset: str = "houlsby"
    reduction_factor: float = 16
    bottleneck_size: int | None = None
    non_linearity: str = "relu"
    residual: bool = True
    adapter_dropout: float = 0.0
    init_weights: bool = True

    def __post_init__(self) -> None:
        self.peft_type = PeftType.BOTTLENECK
        super().__post_init__()
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r} is not a known adapter preset; use one of: {', '.join(PRESETS)}")
        if self.bottleneck_size is None and not self.reduction_factor > 0:
            raise ValueError(
                f"reduction_factor={self.reduction_factor} must be > 0 (hidden size // it = bottleneck); try 16"
            )
        if self.bottleneck_size is not None and self.bottleneck_size < 1:
            raise ValueError(f"bottleneck_size={self.bottleneck_size} must be a positive number of units; try 64")
        if self.non_linearity not in NON_LINEARITIES:
            known = ", ".join(NON_LINEARITIES)
            raise ValueError(f"non_linearity={self.non_linearity!r} is not known; use one of: {known}")
        check_range("adapter_dropout", self.adapter_dropout, 0.0, 1.0, "use a dropout probability such as 0.1")

    def hidden_units(self, hidden_size: int, where: str = "") -> int:
        """The bottleneck size m for a sub-layer of width `hidden_size`, with an error when it would be 0."""
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        units = int(hidden_size // self.reduction_factor)
        if units < 1:
            raise ValueError(
                f"reduction_factor={self.reduction_factor} leaves no hidden unit in the adapter after "
                f"{where or 'a layer'} "
                f"(hidden size {hidden_size} // {self.reduction_factor} = 0); use reduction_factor <= {hidden_size} "
                "or set bottleneck_size"
            )
        return units


def _activation(name: str) -> nn.Module:
    from transformers.activations import ACT2FN

    return nn.Identity() if name == "linear" else ACT2FN[name]


class BottleneckAdapter(nn.Module):
    """One adapter: down-projection, non-linearity, up-projection (and the inner skip when `residual`)."""

    def __init__(self, hidden: int, units: int, config: AdapterConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.residual = config.residual
        self.dropout = nn.Dropout(config.adapter_dropout) if config.adapter_dropout > 0 else nn.Identity()
        self.adapter_down = nn.Linear(hidden, units, dtype=dtype)
        self.act = _activation(config.non_linearity)
        self.adapter_up = nn.Linear(units, hidden, dtype=dtype)
        if config.init_weights:  # else both keep nn.Linear's random init
            nn.init.zeros_(self.adapter_up.weight)  # start as the identity map: adapted model == base
            nn.init.zeros_(self.adapter_up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.adapter_up(self.act(self.adapter_down(self.dropout(h))))  # (B, T, d) -> (B, T, m) -> (B, T, d)
        return h + z if self.residual else z


def _output_size(module: nn.Module) -> int:
    """Width of a module's output: a layer's out features (`layer_dims`), else the weight's first dim."""
    dims = layer_dims(module)
    if dims is not None:
        return dims[1]
    weight = getattr(module, "weight", None)
    if weight is None:
        raise TypeError(f"cannot tell the output width of {type(module).__name__}; choose other target_modules")
    return weight.shape[0]


class BottleneckLayer(AdapterLayer):
    """A sub-layer's output module (attention or FFN output projection) followed by named adapters."""

    def add(self, name: str, config: AdapterConfig, where: str) -> None:
        hidden = _output_size(self.base_layer)
        device = next(self.base_layer.parameters()).device
        units = config.hidden_units(hidden, where)
        self.adapters[name] = BottleneckAdapter(hidden, units, config, adapter_dtype(self.base_layer)).to(device)

    def adapter_forward(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        adapter = self.adapters[name]
        return adapter(result.to(adapter.adapter_down.weight.dtype)).to(result.dtype)


def adapter_sites(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Names of the modules the adapters go after: `target_modules`, else the preset's places for this model."""
    if config.target_modules is not None:
        return find_targets(model, config, {})
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTER_SITES:
        raise ValueError(
            f"bottleneck adapters know where to go in {', '.join(sorted(ADAPTER_SITES))}, not model_type="
            f"{model_type!r}; pass target_modules=[...] naming the attention / feed-forward output modules"
        )
    layers, attention, ffn = ADAPTER_SITES[model_type]
    wanted = [{"attention": attention, "ffn": ffn}[place] for place in PRESETS[config.preset]]
    pattern = re.compile(rf"(?:.*\.)?{layers}\.\d+\.(?:{'|'.join(wanted)})")
    found = [name for name, _ in model.named_modules() if pattern.fullmatch(name)]
    found = [n for n in found if in_layers(n, config.layers_to_transform, layers)]
    found = [n for n in found if not is_excluded(n, config.exclude_modules)]
    if not found:
        raise ValueError(f"no {config.preset} adapter place found in {type(model).__name__} (model_type={model_type})")
    return found


def add_bottleneck(model: nn.Module, config: AdapterConfig, adapter_name: str) -> None:
    """Put adapter `adapter_name` after each chosen sub-layer of `model` (in place)."""
    for name, module in wrap_targets(model, adapter_sites(model, config), BottleneckLayer):
        module.add(adapter_name, config, name)
    wrap_modules_to_save(model, config.modules_to_save, adapter_name)
