"""The method registry: what `PeftModel`, the adapter files and targeting know of a method.

Each method describes itself as a `Method` (its config class and hooks) and is registered by one line in
`deltatune/methods/__init__.py`; nothing in `deltatune.core` names a method. A hook left at its default (None,
False, empty) means the generic behaviour: nothing extra happens, or the core refuses with a message that says
the method lacks it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:  # for annotations only: the configs' module reads the registry (from_dict), not the reverse
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
        one_adapter_at_a_time: `set_adapter` takes one name only and `set_requires_grad` is refused (the prompt
            methods: one prompt is put before the inputs).
        refuse_rows: raises when one batch cannot run adapter adapter_names[i] on row i (`forward(adapter_names=)`);
            called as refuse_rows(config of the active adapter, adapter_names).
        refuse_merge: raises when this model's adapters cannot be merged although the method can merge
            (LoRA's replicated layers share one base weight); called with the transformers model.
        while_disabled: a context manager run around the block of `disable_adapter()`, entered after the adapter
            layers are switched off, for what the method changed in place (BitFit's biases); called with the
            transformers model.
        disable_warning: the warning `disable_adapter_layers()` gives for a config whose disabled model still
            differs from the base (LoRA's trained biases), or None; called with the config.
        before_unload: run by `unload()` (keep_trained=False) and `merge_and_unload()` (keep_trained=True) before
            the adapter layers are unwrapped, for what the method changed in place (BitFit gives the original
            biases back, or keeps the trained ones); called as before_unload(transformers model, keep_trained).
        while_loading: a context manager around creating an adapter whose values are about to be read from a file,
            to skip start-up work the file replaces (prompt tuning's TEXT start loads a tokenizer); called with
            the config.
        convert_on_save: `save_pretrained(path_initial_model_for_weight_conversion=folder)`: rewrites the saved
            tensors and config (PiSSA / OLoRA into a plain LoRA of the original base); called as
            convert_on_save(tensors, config, folder) -> (tensors, config).
        check_saved: looks at the tensors read from the model for its file (LoRA warns about unsharded
            ZeRO-3 / FSDP shards); called as check_saved(tensors, adapter_name).
        update_and_allocate: the method's training step outside the optimizer (AdaLoRA's rank budget); called as
            update_and_allocate(transformers model, global_step) -> the rank budget.
        add_weighted_adapter: `PeftModel.add_weighted_adapter`, new adapter from existing ones (LoRA's
            `combine`); called as add_weighted_adapter(peft_model, adapters, weights, name, combination_type,
            **options).
        card_tags: tags the model card gets for this method (peft tags LoRA adapters "lora").
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
    one_adapter_at_a_time: bool = False
    refuse_rows: Callable[[PeftConfig, Sequence[str]], None] | None = None
    refuse_merge: Callable[[nn.Module], None] | None = None
    while_disabled: Callable[[nn.Module], AbstractContextManager[None]] | None = None
    disable_warning: Callable[[PeftConfig], str | None] | None = None
    before_unload: Callable[[nn.Module, bool], None] | None = None
    while_loading: Callable[[PeftConfig], AbstractContextManager[None]] | None = None
    convert_on_save: Callable[..., tuple[dict[str, torch.Tensor], PeftConfig]] | None = None
    check_saved: Callable[[dict[str, torch.Tensor], str], None] | None = None
    update_and_allocate: Callable[[nn.Module, int], int] | None = None
    add_weighted_adapter: Callable[..., None] | None = None
    card_tags: tuple[str, ...] = ()


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
