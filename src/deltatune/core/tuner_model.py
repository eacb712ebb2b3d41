"""`TunerModel`: peft's `peft_model.base_model`. It holds the transformers model the adapters live in (`.model`),
which adapters exist and which are active, and how they train; `PeftModel` wraps it."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence

from torch import nn

from deltatune.core.config import PeftConfig, PeftWarning
from deltatune.core.layer_kinds import adapter_dtype
from deltatune.core.layers import AdapterLayer, ModulesToSaveWrapper, as_names, belongs_to_adapter
from deltatune.core.registry import Method, method_for

logger = logging.getLogger(__name__)


class TunerModel(nn.Module):
    """Holds the transformers model (`.model`) the adapters live in, and which adapters exist and are active
    (peft's tuner model: `peft_model.base_model`). Unknown attributes are read from the model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, PeftConfig] = {}
        self.active_names: list[str] = []
        self.adapters_disabled = False  # True while adapters are switched off; read by methods with their own forward
        self.targeted_module_names: list[str] = []  # every module an adapter wraps, in the order first wrapped
        self.loaded_trainable: set[str] = set()  # adapters loaded with is_trainable=True: they train while inactive
        # The method of the adapters (one per model). Kept after the last adapter is deleted: what a method changed
        # in place (BitFit's biases) is still there for `unload`.
        self.method: Method | None = None

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules") or {}  # none yet while __init__ runs (DeepSpeed's zero.Init)
            if name == "model" or "model" not in modules:
                raise
            return getattr(modules["model"], name)

    @property
    def active_adapters(self) -> list[str]:
        return list(self.active_names)

    @property
    def active_adapter(self) -> str | list[str]:
        """The active adapter's name; a list when several (or none) are active, as in peft."""
        return self.active_names[0] if len(self.active_names) == 1 else list(self.active_names)

    @property
    def prefix(self) -> str:
        """The text every adapter parameter name holds ("lora_" for the LoRA family), as peft's tuners."""
        config = next(iter(self.peft_config.values()), None)
        prefix = method_for(config).param_prefix if config is not None else None
        if prefix is None:
            raise AttributeError("prefix")
        return prefix

    def adapter_modules(self) -> Iterator[nn.Module]:
        """Every adapter-wrapped layer and trainable copy in the model."""
        for module in self.model.modules():
            if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
                yield module

    def record_targets(self, adapter_name: str) -> None:
        """Add the modules adapter `adapter_name` wraps to `targeted_module_names` (peft's attribute)."""
        for name, module in self.model.named_modules():
            if isinstance(module, AdapterLayer) and adapter_name in module.adapters:
                if name not in self.targeted_module_names:
                    self.targeted_module_names.append(name)

    def known_names(self, adapter_names: str | Sequence[str]) -> list[str]:
        """The adapter name(s) as a list, each one this model has (else peft's "not found" error)."""
        names = as_names(adapter_names)
        unknown = [name for name in names if name not in self.peft_config]
        if unknown:
            raise ValueError(
                f"Adapter {unknown[0]} not found: this model has {', '.join(self.peft_config) or 'no adapters'}"
            )
        return names

    def set_adapter(self, adapter_names: str | Sequence[str], inference_mode: bool = False) -> None:
        """Activate these adapters (several LoRA adapters add up); they train unless `inference_mode`."""
        names = self.known_names(adapter_names)
        merged = [m for m in self.adapter_modules() if isinstance(m, AdapterLayer) and m.merged_adapters]
        if merged:  # as peft: a merged update would stay in the base weight under the new adapter
            logger.warning("set_adapter(%r): unmerging the merged adapters first", adapter_names)
            for module in merged:
                module.unmerge()
        for module in self.adapter_modules():
            module.set_active(names)
        self.active_names = names
        self.set_trainable(inference_mode)

    def set_trainable(self, inference_mode: bool = False) -> None:
        """Train the active adapters and those loaded with `is_trainable=True`; freeze the rest (an adapter
        whose config is in inference mode never trains; `inference_mode` freezes the active ones, as peft)."""
        training = [
            name
            for name, config in self.peft_config.items()
            if ((name in self.active_names and not inference_mode) or name in self.loaded_trainable)
            and not config.inference_mode
        ]
        lead = next((name for name in self.active_names if name in training), None)
        config = self.peft_config[lead] if lead is not None else None
        for name, param in self.model.named_parameters():
            if ".adapters." in name or ".modules_to_save." in name:
                trains = any(belongs_to_adapter(name, adapter) for adapter in training)
            else:  # base parameters some methods train (LoRA's bias, BitFit)
                trains = config is not None and method_for(config).base_param_trains(name, config)
            param.requires_grad_(trains)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Turn gradients on or off for the named adapters' parameters only (as peft)."""
        names = self.known_names(adapter_names)
        for name, param in self.model.named_parameters():
            if any(belongs_to_adapter(name, adapter) for adapter in names):
                param.requires_grad_(requires_grad)

    def enable_adapter_layers(self) -> None:
        """Switch every adapter back on after `disable_adapter_layers`."""
        for module in self.adapter_modules():
            module.disabled = False
        self.adapters_disabled = False

    def disable_adapter_layers(self) -> None:
        """Switch every adapter off in place: the model computes the base output (merged ones are unmerged)."""
        for name in self.active_names:
            config = self.peft_config[name]
            hook = method_for(config).disable_warning
            message = hook(config) if hook else None
            if message:  # something the method trained in place stays
                warnings.warn(message, PeftWarning, stacklevel=2)
        for module in self.adapter_modules():
            if isinstance(module, AdapterLayer) and module.merged_adapters:
                module.unmerge()
            module.disabled = True
        self.adapters_disabled = True

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter's layers and config; the remaining ones stay active (or the first one left)."""
        for module in self.adapter_modules():
            module.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        self.loaded_trainable.discard(adapter_name)
        if adapter_name not in self.active_names:  # the active ones (and anything merged) stay as they are
            self.set_trainable()
            return
        remaining = [name for name in self.active_names if name != adapter_name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        self.active_names = remaining
        if remaining:
            self.set_adapter(remaining)

    def update_and_allocate(self, global_step: int) -> int:
        """The method's step outside the optimizer, under peft's name: AdaLoRA's rank budget
        (`peft_model.base_model.update_and_allocate(step)`, after `loss.backward()`).

        Returns:
            The method's budget at this step (AdaLoRA: the total rank).
        """
        hook = self.method.update_and_allocate if self.method else None
        if hook is None:
            kind = self.method.peft_type.value if self.method else "no"
            raise ValueError(
                f"update_and_allocate is AdaLoRA's rank budget step, but this model holds no AdaLoRA adapter ({kind} "
                "adapters have no step outside the optimizer)"
            )
        return hook(self.model, global_step)


def count_parameters(params: Iterator[tuple[str, nn.Parameter]]) -> tuple[int, int]:
    """(trainable, all) with peft's rule for packed 4-bit weights (two values per byte of storage)."""
    trainable = total = 0
    for _, param in params:
        n = param.numel()
        if type(param).__name__ == "Params4bit":
            n *= 2 * (param.element_size() if hasattr(param, "element_size") else 1)
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total


def cast_adapter_dtype(model: nn.Module, adapter_name: str, autocast: bool) -> None:
    """peft's `autocast_adapter_dtype`: True keeps a half-precision base's adapter in fp32 (stable updates);
    False gives each adapter its layer's dtype."""
    for module in model.modules():
        if not isinstance(module, AdapterLayer) or adapter_name not in module.adapters:
            continue
        base = module.get_base_layer()
        weight = getattr(base, "weight", getattr(base, "in_proj_weight", None))  # MultiheadAttention: in_proj
        if weight is None or not weight.is_floating_point():  # a 4/8-bit base: the adapter stays fp32
            continue
        for part in module.adapter_parts(adapter_name):
            if autocast:
                for param in part.parameters():
                    if param.is_floating_point():  # half precision -> fp32 (the rule adapters are made by)
                        param.data = param.data.to(adapter_dtype(param))
            else:
                part.to(weight.dtype)
