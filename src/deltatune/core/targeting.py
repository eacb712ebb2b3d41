"""Choosing which modules a method changes, and swapping them in place.

Matching follows peft exactly so that a config means the same module set in both libraries:
a string `target_modules` is a regex matched against the whole module name; a list matches a name exactly
or as a dotted suffix; `layers_to_transform` then keeps only modules inside the listed layer indices.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable

from torch import nn

from deltatune.core.config import NoMatchingPeftModuleError
from deltatune.core.layer_kinds import is_linear_like
from deltatune.core.layers import AdapterLayer, ModulesToSaveWrapper

ALL_LINEAR = "all-linear"


def _layer_index(key: str, layers_pattern: list[str] | str | None) -> int | None:
    """The first numbered block in `key` (e.g. 3 in 'model.layers.3.self_attn.q_proj')."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        return int(match.group("idx")) if match else None
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    for pattern in patterns:
        match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
        if match:
            return int(match.group("idx"))
    return None


def matches(key: str, target_modules: list[str] | str, layers_to_transform=None, layers_pattern=None) -> bool:
    """Whether module `key` is selected by `target_modules` (and `layers_to_transform`)."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, key) is not None
    if key in target_modules:  # a full name is taken as is, without the layer filter (peft's rule)
        return True
    found = any(key.endswith(f".{t}") for t in target_modules)
    return found and in_layers(key, layers_to_transform, layers_pattern)


def is_excluded(key: str, exclude_modules: list[str] | str | None) -> bool:
    """Whether `exclude_modules` (peft's rule: one regex full-matched, or names / dotted suffixes) removes `key`."""
    if not exclude_modules:
        return False
    if isinstance(exclude_modules, str):
        return re.fullmatch(exclude_modules, key) is not None
    return key in exclude_modules or any(key.endswith(f".{m}") for m in exclude_modules)


def in_layers(key: str, layers_to_transform: list[int] | int | None, layers_pattern=None) -> bool:
    """Whether `key` lies in one of the layers listed, or the one layer given (always true when none are listed)."""
    if layers_to_transform is None or layers_to_transform == []:
        return True
    wanted = {layers_to_transform} if isinstance(layers_to_transform, int) else set(layers_to_transform)
    return _layer_index(key, layers_pattern) in wanted


def is_module_to_save(key: str, modules_to_save: Iterable[str] | None) -> bool:
    """Whether `key` is, or lies inside, a module listed in `modules_to_save`."""
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", key) for m in modules_to_save or ())


def output_layer_names(model: nn.Module) -> set[str]:
    """The LM head (or classifier) that "all-linear" must leave alone."""
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    heads = [output] if output is not None else [getattr(model, n, None) for n in ("classifier", "score")]
    return {name for name, module in model.named_modules() if any(module is h for h in heads if h is not None)}


def adapter_internal_names(model: nn.Module) -> set[str]:
    """Names of modules that live inside adapter layers or trainable copies (never targets themselves)."""
    inside = set()
    for prefix, module in model.named_modules():
        if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
            inside.update(f"{prefix}.{suffix}" for suffix, _ in module.named_modules() if suffix)
    return inside


def _is_linear_target(module: nn.Module) -> bool:
    """A linear-like layer, or an adapter layer already wrapped around one (a second adapter on the model)."""
    if isinstance(module, AdapterLayer):
        module = module.base_layer
    return is_linear_like(module)


def all_linear_names(model: nn.Module) -> list[str]:
    """Every linear-like module except the output head, in model order (peft's "all-linear")."""
    skip = output_layer_names(model) | adapter_internal_names(model)
    return [n for n, m in model.named_modules() if n and n not in skip and _is_linear_target(m)]


def weight_module_names(model: nn.Module, limit: int = 25) -> str:
    """A short list of leaf names of modules with weights, to show in 'matched nothing' errors."""
    inside = adapter_internal_names(model)
    names = {
        n.split(".")[-1]
        for n, m in model.named_modules()
        if n and n not in inside and getattr(m, "weight", None) is not None
    }
    names = sorted(names)
    return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")


def shown_names(value):
    """A set of module names as a sorted list, for messages (a regex string or None as it is)."""
    return sorted(value) if isinstance(value, set) else value


def _resolve_target_modules(model: nn.Module, config, default_targets: dict[str, list[str]]) -> list[str] | str:
    """`config.target_modules`, or the architecture's defaults (written back into the config, as peft does)."""
    if config.target_modules is not None:
        return config.target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in default_targets:
        raise ValueError(
            f"Please specify `target_modules` in `peft_config`: it is not set and deltatune has no default for "
            f"model_type={model_type!r}; "
            f"pass target_modules=[...] with some of: {weight_module_names(model)}"
        )
    config.target_modules = set(default_targets[model_type])
    return config.target_modules


def find_targets(model: nn.Module, config, default_targets: dict[str, list[str]]) -> list[str]:
    """Names of the modules `config` selects, in model order, with a clear error when it selects none."""
    targets = _resolve_target_modules(model, config, default_targets)
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        targets = all_linear_names(model)  # full names (config refuses layers_to_transform with a string)
    inside = adapter_internal_names(model)
    found = [
        name
        for name, _ in model.named_modules()
        if name
        and name not in inside
        and not is_module_to_save(name, config.modules_to_save)
        and matches(name, targets, config.layers_to_transform, config.layers_pattern)
    ]
    if not found:
        shown = shown_names(config.target_modules)
        layers = f" in layers {config.layers_to_transform}" if config.layers_to_transform is not None else ""
        raise NoMatchingPeftModuleError(
            f"Target modules {shown} not found in the base model: target_modules={shown!r}{layers} matched no module "
            f"of {type(model).__name__}; modules with weights here include: {weight_module_names(model)}"
        )
    kept = [name for name in found if not is_excluded(name, config.exclude_modules)]
    if not kept:
        raise NoMatchingPeftModuleError(
            f"All modules were excluded: exclude_modules={shown_names(config.exclude_modules)!r} removes every module "
            f"target_modules={shown_names(config.target_modules)!r} selects ({', '.join(found[:5])}"
            f"{', ...' if len(found) > 5 else ''}); exclude fewer modules"
        )
    if config.exclude_modules and len(kept) == len(found):
        warnings.warn(
            f"You have passed exclude_modules={shown_names(config.exclude_modules)} but no modules were excluded. "
            "Please check that exclude_modules was set correctly.",
            stacklevel=4,
        )
    return kept


def replace_module(model: nn.Module, name: str, new_module: nn.Module) -> None:
    """Put `new_module` where `name` was."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new_module)


def wrap_targets(
    model: nn.Module,
    names: Iterable[str],
    layer_class: type[AdapterLayer],
    make_layer: Callable[[nn.Module], AdapterLayer] | None = None,
) -> list[tuple[str, AdapterLayer]]:
    """Wrap each named module in a `layer_class` layer, or reuse the one already there (a second adapter).

    Every module is checked before any is changed: one already held by another method's layer is refused.

    Args:
        model: the transformers model, changed in place.
        names: the modules to wrap (from `find_targets`, or a method's own choice of places).
        layer_class: the method's adapter layer; a module that already is one is returned as it is.
        make_layer: builds the layer around a plain module (default: `layer_class(module)`), for a method
            whose layer class depends on the module's kind.

    Returns:
        (name, layer) for each module, in the order given; the caller adds its adapter to each layer.
    """
    names = list(names)
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, AdapterLayer) and not isinstance(module, layer_class):
            raise ValueError(f"{name} already holds a {type(module).__name__}; one method per module")
    make_layer = make_layer or layer_class
    wrapped = []
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, layer_class):
            module = make_layer(module)
            replace_module(model, name, module)
        wrapped.append((name, module))
    return wrapped


# Task heads that `PeftModel` adds to `modules_to_save` for classifiers / QA (as peft); a model has one or none.
OPTIONAL_MODULES_TO_SAVE = {"classifier", "score", "qa_outputs"}


def modules_to_save_names(model: nn.Module, modules_to_save: Iterable[str] | None) -> list[str]:
    """Names of the modules `modules_to_save` selects (name or dotted suffix); an error if an entry finds none."""
    wanted = list(modules_to_save or [])
    inside = adapter_internal_names(model)
    found = [
        name
        for name, _ in model.named_modules()
        if name and name not in inside and any(name == m or name.endswith(f".{m}") for m in wanted)
    ]
    missing = [
        m for m in wanted if m not in OPTIONAL_MODULES_TO_SAVE and not any(n == m or n.endswith(f".{m}") for n in found)
    ]
    if missing:
        raise ValueError(
            f"modules_to_save={missing!r} matched no module; modules with weights here include: "
            f"{weight_module_names(model)}"
        )
    return found


def wrap_modules_to_save(model: nn.Module, modules_to_save: Iterable[str] | None, adapter_name: str) -> None:
    """Give each module named in `modules_to_save` a trainable copy for `adapter_name`."""
    for name in modules_to_save_names(model, modules_to_save):
        module = model.get_submodule(name)
        if not isinstance(module, ModulesToSaveWrapper):
            module = ModulesToSaveWrapper(module)
            replace_module(model, name, module)
        module.add(adapter_name)
