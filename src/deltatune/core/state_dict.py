"""peft's low-level adapter API: an adapter's tensors under peft's file keys, loading them back, the base weights
under their original names, and adapters put straight into a plain `nn.Module` (no `PeftModel` around it).

The functions take either a `PeftModel` (keys start with `base_model.model.`, as in adapter files) or a module that
`inject_adapter_in_model` changed (keys are the module's own names, as in peft), also inside torch.compile, FSDP or
DDP. An injected module carries `peft_config` ({adapter name: config}) as peft's does; internally its keys get the
`base_model.model.` prefix too, so one code path (and the methods' file hooks) serves both.
"""

from __future__ import annotations

import copy
import os
import re
import warnings
from collections import namedtuple
from types import SimpleNamespace
from typing import Any, Literal

import torch
from torch import nn

from deltatune.core.config import PeftConfig
from deltatune.core.files import Placement, match_tensors, place_tensors
from deltatune.core.layers import AdapterLayer, ModulesToSaveWrapper, belongs_to_adapter, peft_key
from deltatune.core.registry import method_for

PREFIX = "base_model.model."
# What `load_state_dict(strict=False)` returns in torch, and peft's loaders with it.
IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # peft's names for "the embeddings are targeted"
_WRAPPER_PARTS = re.compile(r"(^|\.)(_orig_mod|_fsdp_wrapped_module|_checkpoint_wrapped_module)\.")


# ---- finding the adapters -----------------------------------------------------------------------------------------
def _holds_adapters(model: nn.Module) -> bool:
    """`peft_config` set on the module or defined by its class; a wrapper's `__getattr__` (FSDP's) only forwards it."""
    return "peft_config" in vars(model) or any("peft_config" in vars(c) for c in type(model).__mro__)


def _is_peft_model(model: nn.Module) -> bool:
    return _holds_adapters(model) and "base_model" in model._modules


def _unwrap(model: nn.Module) -> tuple[nn.Module, str]:
    """The PeftModel or injected module inside torch.compile / FSDP / DDP wrappers, and the key prefix the
    wrappers add to state-dict keys (DDP's `module.`)."""
    path = ""
    while not _holds_adapters(model):
        for child in ("_orig_mod", "_fsdp_wrapped_module", "module"):
            if isinstance(model._modules.get(child), nn.Module):
                path += f"{child}." if child == "module" else ""  # FSDP and compile name no level in their keys
                model = model._modules[child]
                break
        else:
            raise ValueError(
                f"{type(model).__name__} holds no adapters: pass a PeftModel (get_peft_model) or a module that "
                "inject_adapter_in_model changed"
            )
    return model, path


def _refuse_peft_layers(model: nn.Module) -> None:
    """A model adapted by peft itself has peft_config too, but none of deltatune's layers: say so, not `{}`."""
    layer = next((m for m in model.modules() if type(m).__module__.startswith("peft.")), None)
    if layer is not None:
        raise TypeError(
            f"this model holds peft's own adapter layers ({type(layer).__module__}.{type(layer).__name__}); "
            "use peft's get/set_peft_model_state_dict for it, or build the adapter with deltatune"
        )


def _config_of(model: nn.Module, adapter_name: str) -> PeftConfig:
    _refuse_peft_layers(model)
    if adapter_name not in model.peft_config:
        known = ", ".join(model.peft_config) or "none"
        raise ValueError(f"adapter_name={adapter_name!r} is not an adapter of this model; it has: {known}")
    return model.peft_config[adapter_name]


def _hook_model(model: nn.Module) -> Any:
    """What a method's file hooks receive: the PeftModel, or a stand-in with its two attributes the hooks read."""
    if _is_peft_model(model):
        return model
    return SimpleNamespace(peft_config=model.peft_config, get_base_model=lambda: model)


def _prefix(model: nn.Module) -> str:
    """The prefix that makes `model`'s state-dict keys look like a PeftModel's (empty for a PeftModel)."""
    return "" if _is_peft_model(model) else PREFIX


def _internal_state(model: nn.Module, state_dict: dict[str, torch.Tensor], wrapper_path: str) -> dict:
    """`state_dict` (of the wrapped model) under the unwrapped model's keys, with a PeftModel's prefix."""
    prefix = _prefix(model)
    return {prefix + _WRAPPER_PARTS.sub(r"\1", k).removeprefix(wrapper_path): v for k, v in state_dict.items()}


def adapter_entries(state_dict: dict[str, torch.Tensor], config: PeftConfig, adapter_name: str) -> dict:
    """The entries of a PeftModel-keyed state dict that adapter `adapter_name` saves: its own tensors and the base
    tensors its config trains (LoRA's `bias`, BitFit's biases)."""
    method = method_for(config)
    return {
        key: value
        for key, value in state_dict.items()
        if belongs_to_adapter(key, adapter_name)
        or (".adapters." not in key and method.base_param_trains(key.removeprefix(PREFIX), config))
    }


# ---- get_peft_model_state_dict ------------------------------------------------------------------------------------
def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: bool | Literal["auto"] = "auto",
) -> dict[str, torch.Tensor]:
    """The tensors of adapter `adapter_name` under peft's file keys (what `adapter_model.safetensors` holds).

    Args:
        model: a PeftModel, or a module changed by `inject_adapter_in_model`; torch.compile, FSDP and DDP wrappers
            are looked through.
        state_dict: the model's state dict to read values from (default: `model.state_dict()`).
        adapter_name: the adapter to save; the name itself is not in the keys (peft's rule).
        unwrap_compiled: peft's option; deltatune always looks through torch.compile, so it changes nothing.
        save_embedding_layers: also save the input/output embeddings: True, False, or "auto" (when the config
            targets `embed_tokens`/`lm_head`, or the vocabulary was resized against the base model's config.json).
    """
    inner, wrapper_path = _unwrap(model)
    config = _config_of(inner, adapter_name)
    inferred = state_dict is None
    everything = _internal_state(inner, model.state_dict() if inferred else state_dict, wrapper_path)
    tensors = {peft_key(k, adapter_name): v for k, v in adapter_entries(everything, config, adapter_name).items()}
    method = method_for(config)
    if method.to_file:
        tensors = method.to_file(_hook_model(inner), adapter_name, tensors)
    if _wants_embeddings(inner, config, save_embedding_layers):
        tensors.update(_embedding_tensors(inner, config, everything))
    if inferred and method.check_saved:  # the model's own values: LoRA warns about ungathered shards
        method.check_saved(tensors, adapter_name)
    prefix = _prefix(inner)
    return {k.removeprefix(prefix) if prefix else k: v for k, v in tensors.items()}


def _embedding_targeted(model: nn.Module, config: PeftConfig) -> bool:
    """peft's test for "the config targets the embeddings" (names in EMBEDDING_LAYER_NAMES)."""
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, str) and targets != "all-linear":
        names = (name for name, _ in _base_of(model).named_modules())
        return any(
            re.fullmatch(targets, n) for n in names if re.match(rf"(.*\.)?({'|'.join(EMBEDDING_LAYER_NAMES)})$", n)
        )
    return bool(targets) and not isinstance(targets, str) and any(n in targets for n in EMBEDDING_LAYER_NAMES)


def _base_of(model: nn.Module) -> nn.Module:
    return model.get_base_model() if _is_peft_model(model) else model


def _wants_embeddings(model: nn.Module, config: PeftConfig, save_embedding_layers: bool | str) -> bool:
    """Resolve `save_embedding_layers`; "auto" as peft: targeted embeddings, or a resized vocabulary."""
    if save_embedding_layers != "auto":
        return bool(save_embedding_layers)
    if _embedding_targeted(model, config) and getattr(config, "trainable_token_indices", None) is None:
        warnings.warn(
            "Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`.", stacklevel=4
        )
        return True
    if _vocab_resized(model, config):
        warnings.warn(
            "Setting `save_embedding_layers` to `True` as the embedding layer has been resized during finetuning.",
            stacklevel=4,
        )
        return True
    return False


def _vocab_resized(model: nn.Module, config: PeftConfig) -> bool:
    """Whether the model's vocab_size differs from its base model's config.json; a folder's, or one in the local
    Hugging Face cache (no download at save time: an unknown base counts as not resized)."""
    model_config = getattr(_base_of(model), "config", None)
    vocab_size, model_id = getattr(model_config, "vocab_size", None), config.base_model_name_or_path
    if not (vocab_size and model_id):
        return False
    local = os.path.isdir(model_id)
    if local and not os.path.isfile(os.path.join(model_id, "config.json")):
        return False
    try:
        base_config = type(model_config).from_pretrained(model_id, local_files_only=True)
    except (OSError, ValueError):
        return False
    return getattr(base_config, "vocab_size", vocab_size) != vocab_size


def _embedding_tensors(model: nn.Module, config: PeftConfig, everything: dict[str, torch.Tensor]) -> dict:
    """The input and output embedding tensors (PeftModel keys), as peft adds them for `save_embedding_layers`."""
    base = _base_of(model)
    if not hasattr(base, "get_input_embeddings"):
        warnings.warn(
            "Could not identify embedding layer(s) because the model is not a 🤗 transformers model.", stacklevel=4
        )
        return {}
    targeted = _embedding_targeted(model, config)
    found = {}
    for layer in (base.get_input_embeddings(), base.get_output_embeddings()):
        if layer is None or (targeted and not isinstance(layer, AdapterLayer)):
            continue  # a targeted embedding is saved through its wrapped base layer only
        wanted = layer.base_layer if targeted else layer
        name = next((n for n, m in base.named_modules() if m is wanted), None)
        if name is not None:
            found.update({k: v for k, v in everything.items() if k.startswith(f"{PREFIX}{name}.")})
    return found


# ---- set_peft_model_state_dict ------------------------------------------------------------------------------------
def load_adapter_tensors(
    model: nn.Module,
    weights: dict[str, torch.Tensor],
    adapter_name: str,
    source: str,
    strict: bool = True,
    ignore_mismatched_sizes: bool = False,
) -> IncompatibleKeys:
    """Copy peft-keyed tensors (PeftModel keys) into adapter `adapter_name` of an unwrapped model; every key and
    shape is checked before any copy. `strict` (loading a file) refuses file tensors with no place in the model.

    Returns the keys of the model's state dict that got no value (base weights included, as torch and peft report
    them) and the file keys that found no place."""
    config = _config_of(model, adapter_name)
    method = method_for(config)
    if method.from_file:  # the method loads what is special to its file layout first
        weights = method.from_file(_hook_model(model), weights, adapter_name, source)
    everything = _internal_state(model, model.state_dict(keep_vars=True), "")
    targets = {peft_key(k, adapter_name): v for k, v in adapter_entries(everything, config, adapter_name).items()}
    match = place_tensors if strict else match_tensors
    placement: Placement = match(weights, targets, everything, source, ignore_mismatched_sizes)
    with torch.no_grad():
        for target, value in placement.pairs:
            target.copy_(value.to(target.dtype))
    loaded = {id(target) for target, _ in placement.pairs}
    prefix = _prefix(model)
    missing = [
        k.removeprefix(prefix) if prefix else k
        for k, v in everything.items()
        if id(v) not in loaded and not k.startswith("prompt_encoder.")  # a prompt encoder loads in its hook
    ]
    return IncompatibleKeys(missing, placement.unexpected)


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> IncompatibleKeys:
    """Load tensors saved by `get_peft_model_state_dict` (or read from a peft adapter file) into adapter
    `adapter_name`, which must exist already (get_peft_model, add_adapter or inject_adapter_in_model).

    Args:
        model: a PeftModel or an injected module (wrappers are looked through), as for `get_peft_model_state_dict`.
        peft_model_state_dict: peft-keyed tensors, with or without the `base_model.model.` prefix; left unchanged.
        adapter_name: the adapter to fill (any name: file keys hold none).
        ignore_mismatched_sizes: skip tensors whose shape differs from the model's, with a warning (as peft).
        low_cpu_mem_usage: peft's option for adapters created on the meta device; deltatune creates adapter
            weights on the base layer's device, so values are always copied and this changes nothing.

    Returns:
        `IncompatibleKeys(missing_keys, unexpected_keys)`, as torch's `load_state_dict(strict=False)`: the model's
        state-dict keys (deltatune's names) that got no value, base weights included, and the given keys that have
        no place in the model.
    """
    inner, _ = _unwrap(model)
    prefix = _prefix(inner)
    # An injected module's keys come with or without the prefix (peft drops it the same way); a copy either way.
    weights = {prefix + k.removeprefix(prefix): v for k, v in peft_model_state_dict.items()}
    source = "set_peft_model_state_dict"
    result = load_adapter_tensors(inner, weights, adapter_name, source, False, ignore_mismatched_sizes)
    unexpected = [k.removeprefix(prefix) if prefix else k for k in result.unexpected_keys]
    return IncompatibleKeys(result.missing_keys, unexpected)


# ---- base model state dict ----------------------------------------------------------------------------------------
def _original_key(key: str) -> str | None:
    """A base model key as it was before the adapters wrapped its module; None for adapter tensors."""
    if ".adapters." in key or ".modules_to_save." in key:
        return None
    return key.replace(".base_layer.", ".").replace(".original_module.", ".")


def _original_keys(model: nn.Module) -> dict[str, str]:
    """original key -> key in the adapted base model, for every base tensor."""
    base = _base_of(model)
    layer_paths = _adapter_layer_paths(base)
    keys = {}
    for key in base.state_dict():
        original = _original_key(f".{key}")  # a leading dot so a top-level wrapped module matches too
        if original is not None and not _beside_base_layer(key, layer_paths):
            keys[original[1:]] = key
    return keys


def _adapter_layer_paths(base: nn.Module) -> tuple[str, ...]:
    """ "path." of every adapter layer in `base` (the top-level module itself: "")."""
    return tuple(f"{name}." if name else "" for name, m in base.named_modules() if isinstance(m, AdapterLayer))


def _beside_base_layer(key: str, layer_paths: tuple[str, ...]) -> bool:
    """True for a tensor an adapter layer holds outside its `base_layer` (AdaLoRA's ranknum): adapter state."""
    return any(key.startswith(path) and not key[len(path) :].startswith("base_layer.") for path in layer_paths)


def get_base_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict under its original keys, without any adapter tensor (peft's function).

    Args:
        model: a PeftModel (or an injected module); its base weights keep the values they have now (merged
            adapters included).
    """
    inner, _ = _unwrap(model)
    state = _base_of(inner).state_dict()
    return {original: state[key] for original, key in _original_keys(inner).items()}


def set_base_model_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True
) -> IncompatibleKeys:
    """Load base weights saved under their original keys into the adapted model (inverse of
    `get_base_model_state_dict`); `strict` raises RuntimeError on missing or unexpected keys, as torch."""
    inner, _ = _unwrap(model)
    keys = _original_keys(inner)
    missing = [k for k in keys if k not in state_dict]
    unexpected = [k for k in state_dict if k not in keys]
    if strict and (missing or unexpected):
        problems = [f"Missing key(s) in state_dict: {missing}"] if missing else []
        problems += [f"Unexpected key(s) in state_dict: {unexpected}"] if unexpected else []
        raise RuntimeError("Error(s) in loading state_dict:\n\t" + "\n\t".join(problems))
    renamed = {keys[k]: v for k, v in state_dict.items() if k in keys}
    _base_of(inner).load_state_dict(renamed, strict=False)
    return IncompatibleKeys(missing, unexpected)


# ---- inject_adapter_in_model --------------------------------------------------------------------------------------
def inject_adapter_in_model(
    peft_config: PeftConfig,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Put adapter layers into `model` in place and return it, without a PeftModel around it (peft's function).

    The adapter is active and trainable, everything else frozen; `get_peft_model_state_dict` and
    `set_peft_model_state_dict` work on the result (keys without `base_model.model.`).

    Args:
        peft_config: a layer method's config (LoRA, AdaLoRA, ...); the prompt methods need a PeftModel.
        model: any `nn.Module`.
        adapter_name: the adapter's name.
        low_cpu_mem_usage: peft's option to create adapter weights on the meta device; deltatune creates them on
            the base layer's device (they are small), so this changes nothing.
        state_dict: adapt exactly the modules this (LoRA / AdaLoRA) state dict has tensors for, instead of the
            config's `target_modules`; only its keys are read.
    """
    if method_for(peft_config).forward is not None:  # a method with its own forward needs the PeftModel around
        raise ValueError(
            f"inject_adapter_in_model does not support {peft_config.peft_type.value}: a prompt method runs in "
            "PeftModel's forward; use get_peft_model(model, config)"
        )
    if state_dict is not None:
        peft_config = _config_targeting(peft_config, state_dict)
    method_for(peft_config).add(model, peft_config, adapter_name)
    configs = dict(vars(model).get("peft_config") or {})
    configs[adapter_name] = peft_config
    model.peft_config = configs
    _activate(model, peft_config, adapter_name)
    return model


def _config_targeting(config: PeftConfig, state_dict: dict[str, torch.Tensor]) -> PeftConfig:
    """A copy of `config` whose targets are the modules `state_dict` holds adapter tensors for (the keys of a
    method whose parameter names carry its `param_prefix`: LoRA, AdaLoRA)."""
    prefix = method_for(config).param_prefix
    if prefix is None:
        raise ValueError(
            f"inject_adapter_in_model(state_dict=...) reads the modules from LoRA / AdaLoRA keys; for "
            f"{config.peft_type.value} leave state_dict out and set target_modules in the config"
        )
    marker = f".{prefix}"
    names = {k.removeprefix(PREFIX).split(marker)[0] for k in state_dict if marker in k}
    if not names:
        raise ValueError(
            f"inject_adapter_in_model: state_dict has no LoRA tensors (keys with '{marker}'); nothing to adapt"
        )
    config = copy.copy(config)
    config.target_modules = set(names)  # a set, as every config keeps it
    config.layers_to_transform = config.layers_pattern = None  # full names are exact targets
    return config


def _activate(model: nn.Module, config: PeftConfig, adapter_name: str) -> None:
    """As peft's injection: the new adapter is active and trains, the rest of the model is frozen."""
    method = method_for(config)
    for module in model.modules():
        if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
            module.set_active([adapter_name])
    for name, param in model.named_parameters():
        trains = belongs_to_adapter(name, adapter_name) or (
            ".adapters." not in name and method.base_param_trains(name, config)
        )
        param.requires_grad_(trains and not config.inference_mode)
