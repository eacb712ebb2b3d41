"""LoftQ on an already-quantised model: `replace_lora_weights_loftq` (peft's function of that name).

`init_lora_weights="loftq"` (`lora_init.py`) needs the full-precision base: it quantises W itself and saves Q.
Most QLoRA users instead load a model straight into 4 bits. For them, this sets each adapter from the error the
4-bit load made, reading the original W from the model's safetensors file one tensor at a time::

    B A = best rank-r approximation of W - dequant(W_q)     (B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T)

so that W_q + B A is closer to W than W_q alone. One SVD per layer (LoftQ with one step, as peft). As in peft,
A and B are not divided by the scale alpha / r: use lora_alpha = r. An optional `callback(model, name)` can
judge each replacement (for example by comparing logits with the full-precision model's) and return False to
roll that layer back; calling the function again may improve further, since each step is greedy.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from deltatune.methods.lora.dora import is_dora
from deltatune.methods.lora.initialization import low_rank, warn_if_loftq_scaled
from deltatune.methods.lora.lora import LoraLayer
from deltatune.quantization import dequantized_weight, require_bitsandbytes

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"


class _WeightReader:
    """Reads single tensors from a model's safetensors file (or its shards) without loading the rest."""

    def __init__(self, model_path: str, base_model_prefix: str | None) -> None:
        self.base_model_prefix = base_model_prefix
        folder, file_name = (model_path, SINGLE_FILE) if os.path.isdir(model_path) else os.path.split(model_path)
        self.source = os.path.join(folder, file_name)
        index = os.path.join(folder, SHARD_INDEX)
        if os.path.isfile(self.source):
            self.weight_map = None
        elif os.path.isfile(index):  # sharded: the index says which file holds each tensor
            with open(index, encoding="utf-8") as f:
                shards = json.load(f)["weight_map"]
            self.source, self.weight_map = index, {k: os.path.join(folder, v) for k, v in shards.items()}
        else:
            raise FileNotFoundError(
                f"no {SINGLE_FILE} or {SHARD_INDEX} at {model_path}: replace_lora_weights_loftq reads the "
                "full-precision weights from safetensors files (pickled .bin files are refused); pass "
                "model_path= the folder of the unquantised model, or save it once with save_pretrained()"
            )

    def get(self, key: str) -> torch.Tensor:
        """The tensor `key`, tried also without the base-model prefix (a file saved from the bare model)."""
        candidates = [key]
        if self.base_model_prefix and key.startswith(self.base_model_prefix + "."):
            candidates.append(key[len(self.base_model_prefix) + 1 :])
        for candidate in candidates:
            path = self.weight_map.get(candidate) if self.weight_map is not None else self.source
            if path is None:
                continue
            try:
                with safe_open(path, framework="pt", device="cpu") as f:
                    if candidate in f.keys():
                        return f.get_tensor(candidate)
            except (SafetensorError, OSError) as err:
                raise ValueError(f"{path} could not be read ({err}); the file is truncated or damaged") from None
        raise KeyError(
            f"{self.source} holds no tensor {' or '.join(map(repr, candidates))}: is it the "
            "full-precision version of this model?"
        )


def _model_path(base_model: nn.Module, model_path: str | os.PathLike | None) -> str:
    if model_path is not None:
        return os.fspath(model_path)
    name = getattr(getattr(base_model, "config", None), "_name_or_path", "") or ""
    if os.path.isdir(name):  # loaded from a local folder: its files are there
        return name
    raise ValueError(
        f"replace_lora_weights_loftq needs model_path=: the model's name_or_path {name!r} is not a local folder, "
        "and nothing is downloaded; pass the folder (or .safetensors file) of the full-precision model"
    )


def _four_bit_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, LoraLayer]]:
    """(name, layer) for every LoRA layer over a bitsandbytes 4-bit base that holds `adapter_name`."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or type(module.base_layer).__name__ != "Linear4bit":
            continue
        if adapter_name not in module.adapters:
            continue
        if is_dora(module.adapters[adapter_name]):
            raise ValueError(
                f"replace_lora_weights_loftq: adapter {adapter_name!r} on {name} is a DoRA adapter, "
                "whose magnitude would no longer match new factors; use a plain LoRA adapter"
            )
        found.append((name, module))
    if not found:
        raise ValueError(
            f"replace_lora_weights_loftq found no LoRA adapter {adapter_name!r} on a bitsandbytes 4-bit layer: load "
            "the base with load_in_4bit (e.g. deltatune.bitsandbytes_config(load_in_4bit=True)) before "
            "get_peft_model, and name an adapter the model has"
        )
    return found


@torch.no_grad()
def loftq_factors_for_quantized(quantized_layer: nn.Module, weight: torch.Tensor, r: int):
    """(A, B) with B A the best rank-r approximation of weight - dequant(quantized), in fp32 (peft's order)."""
    dequantized = dequantized_weight(quantized_layer)  # (out, in)
    residual = weight.to(device=dequantized.device, dtype=torch.float32) - dequantized
    left, right = low_rank(residual, r)
    return right, left


@torch.no_grad()
def replace_lora_weights_loftq(
    peft_model: nn.Module,
    model_path: str | os.PathLike | None = None,
    adapter_name: str = "default",
    callback: Callable[[nn.Module, str], bool] | None = None,
) -> list[str]:
    """Set the LoRA factors of a 4-bit model so that they carry its quantisation error (LoftQ, one step).

    Args:
        peft_model: a `PeftModel` whose base was loaded in 4 bits (bitsandbytes NF4 or FP4) with LoRA adapters.
        model_path: the full-precision model's folder or `.safetensors` file (sharded files with their index
            are read too); default: the base model's `name_or_path` when that is a local folder.
        adapter_name: the adapter to set.
        callback: called as `callback(peft_model, name)` after each layer is set (`name` relative to the base
            model); returning False puts that layer's previous factors back.

    Returns:
        The names of the layers whose factors were replaced and kept.

    Raises:
        ValueError: no LoRA layer over a 4-bit base holds the adapter, a DoRA adapter, layer replication
            (its copies have no weights of their own in the file), or no local model path.
        FileNotFoundError / KeyError: the weights file, or a layer's weight in it, is missing.
    """
    require_bitsandbytes("replace_lora_weights_loftq")
    from tqdm.auto import tqdm  # installed with transformers; imported here, not with the package

    config = getattr(peft_model, "peft_config", {}).get(adapter_name)
    if getattr(config, "layer_replication", None):
        raise ValueError(
            "replace_lora_weights_loftq cannot read the weights of replicated layers "
            "(layer_replication) from the model file; use it on a model without layer_replication"
        )
    base_model = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    layers = _four_bit_layers(base_model, adapter_name)
    reader = _WeightReader(_model_path(base_model, model_path), getattr(base_model, "base_model_prefix", None))
    kept = []
    for name, layer in tqdm(layers, desc="LoftQ", unit="layer", disable=len(layers) < 8):
        adapter = layer.adapters[adapter_name]
        lora_a, lora_b = loftq_factors_for_quantized(
            layer.base_layer, reader.get(name + ".weight"), adapter.lora_A.out_features
        )
        before = (adapter.lora_A.weight.clone(), adapter.lora_B.weight.clone()) if callback else None
        adapter.lora_A.weight.copy_(lora_a)
        adapter.lora_B.weight.copy_(lora_b)
        if callback is not None and not callback(peft_model, name):
            adapter.lora_A.weight.copy_(before[0])
            adapter.lora_B.weight.copy_(before[1])
            continue
        kept.append(name)
    for scaling in dict.fromkeys(layer.adapters[adapter_name].scaling for _, layer in layers):
        warn_if_loftq_scaled(scaling)
    return kept
