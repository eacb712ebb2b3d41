"""The method registry: what `PeftModel`, the adapter files and targeting know of a method.

Each method describes itself as a `Method` (its config class and hooks) and is registered by one line in
`deltatune/methods/__init__.py`; nothing in `deltatune.core` names a method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from deltatune.core.config import PeftConfig, PeftType


def _no_base_params(param_name: str, config: PeftConfig) -> bool:
    return False


@dataclass(frozen=True)
class Method:
    """How `PeftModel` applies one method.

    Attributes:
        peft_type: the `peft_type` written in adapter files.
        config_class: the method's config dataclass.
        add: puts adapter `name` into the transformers model in place (wraps layers, adds parameters). It may
            return a module that lives beside the model instead (the prompt methods' encoders); `PeftModel` keeps
            it in `prompt_encoder[name]`, where it is counted, trained, moved and saved with the adapter.
        base_param_trains: for parameters of the base model (names relative to it), whether this config
            trains and saves them too (LoRA's `bias`, BitFit's biases).
        can_merge: whether `merge_and_unload` can fold the adapter into the base weights.
        forward: replaces the plain call of the base model in `PeftModel.forward` (prompt methods build
            virtual tokens here); called as forward(peft_model, **model_inputs).
        generate: likewise for `PeftModel.generate`; called as generate(peft_model, *args, **kwargs).
        after_forward: post-processes the outputs (AdaLoRA adds its orthogonality term to the loss);
            called as after_forward(peft_model, outputs) -> outputs.
        to_file: maps the adapter's tensors (peft keys) to what the file holds, for methods whose file layout is
            not their parameters (prompt methods store `prompt_embeddings`); to_file(peft_model, name, tensors).
        from_file: the inverse, run before the generic loading; it loads what it understands and returns the
            rest under peft keys; from_file(peft_model, weights, name, source) -> weights.
        param_prefix: the text in every adapter parameter's name ("lora_"), peft's `prefix` of a tuner model.
        refuse_second_adapter: raises when a new adapter's config cannot sit beside the existing ones;
            called as refuse_second_adapter(existing {name: config}, new config).
    """

    peft_type: PeftType
    config_class: type[PeftConfig]
    add: Callable[[nn.Module, PeftConfig, str], nn.Module | None]
    base_param_trains: Callable[[str, PeftConfig], bool] = _no_base_params
    can_merge: bool = False
    forward: Callable[..., Any] | None = None
    generate: Callable[..., Any] | None = None
    after_forward: Callable[[nn.Module, Any], Any] | None = None
    to_file: Callable[..., dict[str, Any]] | None = None
    from_file: Callable[..., dict[str, Any]] | None = None
    param_prefix: str | None = None
    refuse_second_adapter: Callable[[dict[str, PeftConfig], PeftConfig], None] | None = None


METHODS: dict[PeftType, Method] = {}


def register(method: Method) -> None:
    METHODS[method.peft_type] = method


def method_for(config: PeftConfig) -> Method:
    """The registered method of a config, with an error listing the known ones."""
    if config.peft_type not in METHODS:
        known = ", ".join(t.value for t in METHODS)
        raise ValueError(f"peft_type={config.peft_type!r} is not implemented in deltatune; known: {known}")
    return METHODS[config.peft_type]


def config_class_for(peft_type: str | None, source: str = "config") -> type[PeftConfig]:
    """The config class for a `peft_type` string read from a file."""
    for known_type, method in METHODS.items():
        if peft_type == known_type.value:
            return method.config_class
    known = ", ".join(t.value for t in METHODS)
    raise ValueError(f"{source}: peft_type={peft_type!r} is not a method deltatune has; known: {known}")
