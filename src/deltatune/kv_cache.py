"""The KV cache a transformers model takes and returns, whatever the installed release calls it.

transformers 5.0 to 5.23 pass the cache to `forward` as `past_key_values`; 5.24 renamed it `cache` (the old name
still maps, with a FutureWarning, and models not yet converted keep it). The prompt methods need the cache twice:
to tell `generate`'s first step (the whole prompt) from the steps that continue a filled cache, and, for prefix
tuning, to hand the model a cache that already holds the prefixes. Neither hard-codes the name: the cache in a
call is found by its type, and the keyword the model takes is read from the model's own `forward` signatures.
"""

from __future__ import annotations

import inspect
from typing import Any

import transformers
from torch import nn
from transformers import Cache

# The keywords the releases in the supported range use, newest first.
CACHE_ARGUMENTS = ("cache", "past_key_values")


def cache_argument(model: nn.Module) -> str | None:
    """The keyword `model` takes its KV cache by: the first of CACHE_ARGUMENTS that the model's `forward`, or the
    `forward` of a module inside it, names (task heads such as BertForSequenceClassification pass the cache on
    through **kwargs to an inner model that names it). None when no module names one."""
    seen: set[type] = set()
    for module in model.modules():  # the model itself first
        if type(module) in seen:
            continue
        seen.add(type(module))
        parameters = inspect.signature(type(module).forward).parameters
        for name in CACHE_ARGUMENTS:
            if name in parameters:
                return name
    return None


def require_cache_argument(model: nn.Module, method: str, need: str, instead: str) -> str:
    """`cache_argument(model)`, or a ValueError that names the method, the model and the transformers release:
    "<method> <need>, but under transformers X <model> takes no KV cache (...); <instead>"."""
    name = cache_argument(model)
    if name is None:
        raise ValueError(
            f"{method} {need}, but under transformers {transformers.__version__} {describe_model(model)} "
            f"takes no KV cache (no forward among its modules takes {' or '.join(CACHE_ARGUMENTS)}); {instead}"
        )
    return name


def describe_model(model: nn.Module) -> str:
    """`LlamaForCausalLM (model_type='llama')`: how the cache errors name a model."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return f"{type(model).__name__} (model_type={model_type!r})"


def passed_cache(inputs: dict[str, Any]) -> tuple[str | None, Cache | None]:
    """The keyword and the Cache object among a forward call's inputs, found by type; (None, None) if none."""
    for key, value in inputs.items():
        if isinstance(value, Cache):
            return key, value
    return None, None


def cache_length(cache: Cache | None) -> int:
    """Tokens already in a transformers Cache (0 for None)."""
    return 0 if cache is None else int(cache.get_seq_length())
