"""The module paths of deltatune 0.1 (`deltatune.config`, `deltatune.tuners.lora`, ...), kept importable for code
written against them: each old path is the module that now holds its names (see the README's layout section)."""

from __future__ import annotations

import importlib
import sys
import types

# old path -> the module that holds its names now
MOVED_MODULES = {
    "deltatune.config": "deltatune.core.config",
    "deltatune.peft_model": "deltatune.core.peft_model",
    "deltatune.layers": "deltatune.core.layers",
    "deltatune.files": "deltatune.core.files",
    "deltatune.targeting": "deltatune.core.targeting",
    "deltatune.state_dict": "deltatune.core.state_dict",
    "deltatune.tuners.lora": "deltatune.methods.lora.lora",
    "deltatune.tuners.lora_init": "deltatune.methods.lora.initialization",
    "deltatune.tuners.trainable_tokens": "deltatune.methods.lora.trainable_tokens",
    "deltatune.tuners.quantized": "deltatune.quantization",
    "deltatune.tuners.adalora": "deltatune.methods.adalora",
    "deltatune.tuners.bitfit": "deltatune.methods.bitfit",
    "deltatune.tuners.bottleneck": "deltatune.methods.bottleneck",
    "deltatune.tuners.virtual_tokens": "deltatune.methods.virtual_tokens",
    "deltatune.tuners.prompt_tuning": "deltatune.methods.prompt_tuning",
    "deltatune.tuners.p_tuning": "deltatune.methods.p_tuning",
    "deltatune.tuners.prefix_tuning": "deltatune.methods.prefix_tuning",
}


def install() -> None:
    """Make every old path import the module that holds its names now (idempotent)."""
    tuners = sys.modules.setdefault("deltatune.tuners", types.ModuleType("deltatune.tuners"))
    tuners.__path__ = []  # a package, so that `import deltatune.tuners.lora` looks its child up
    sys.modules["deltatune"].tuners = tuners
    for old, new in MOVED_MODULES.items():
        module = importlib.import_module(new)
        sys.modules[old] = module
        parent, _, child = old.rpartition(".")
        setattr(sys.modules[parent], child, module)
