"""QLoRA: LoRA on a 4-bit (or 8-bit) frozen base (Dettmers et al., 2023, arXiv:2305.14314).

The base weights are stored by bitsandbytes: NF4 with double quantisation (4-bit codes, per-block scales that
are themselves quantised) or LLM.int8() (8-bit codes, per-row scales). Forward dequantises on the fly into
the compute dtype; the LoRA factors beside each layer stay in full precision and are the only thing trained::

    h = dequant(W_q) x + (alpha / r) B (A x)

Nothing here is a new layer class: `LoraLayer` (and AdaLoRA's `SVDLayer`) wrap `bnb.nn.Linear4bit` /
`bnb.nn.Linear8bitLt` like any linear layer. This file holds what is special to quantised bases:

- `bitsandbytes_config`: the `transformers.BitsAndBytesConfig` for a 4-bit or 8-bit load (clear error when
  bitsandbytes is missing);
- `prepare_model_for_kbit_training`: peft's preparation (freeze, upcast half-precision params such as the
  norms to fp32, input grads, gradient checkpointing), also under its old name `prepare_model_for_int8_training`;
- `merge_into_quantized`: fold an update into a quantised weight (dequantise, add, quantise again; lossy), through
  `requantize`, which also puts OLoRA's residual back on the 4-/8-bit grid;
- `dequantize_model`: swap every bitsandbytes layer for a plain `nn.Linear` holding its dequantised weight, which
  is what `PeftModel.merge_and_unload` does first on a quantised base, so the merge itself is exact.
"""

from __future__ import annotations

import importlib
import logging
import warnings

import torch
from torch import nn

from deltatune.core.layer_kinds import QUANTIZED_LINEAR, is_quantized_linear  # noqa: F401  (public here too)

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install bitsandbytes  (or: pip install 'deltatune[quant]')"


def require_bitsandbytes(what: str):
    """Import bitsandbytes, or raise an ImportError saying what needed it and how to install it."""
    try:
        return importlib.import_module("bitsandbytes")
    except ImportError:
        raise ImportError(f"{what} needs the bitsandbytes package, which is not installed; {INSTALL_HINT}") from None


def bitsandbytes_config(
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    compute_dtype: torch.dtype | None = None,
    double_quant: bool = True,
):
    """The `transformers.BitsAndBytesConfig` for a QLoRA base: NF4 + double quantisation, or LLM.int8().

    Args:
        load_in_4bit: NF4 codes with double-quantised block scales (the QLoRA paper's setting).
        load_in_8bit: LLM.int8() codes with per-row scales.
        compute_dtype: the dtype the 4-bit weights are dequantised into for each matmul; default bf16 on a GPU
            and fp32 on a CPU (CPUs have no fast half-precision matmul).
        double_quant: also quantise the block scales (saves ~0.4 bit per weight).

    Raises:
        ValueError: both or neither of `load_in_4bit` / `load_in_8bit`.
        ImportError: bitsandbytes is not installed (the message has the pip command).
    """
    if load_in_4bit == load_in_8bit:
        raise ValueError("pass exactly one of load_in_4bit=True or load_in_8bit=True")
    require_bitsandbytes("load_in_4bit=True" if load_in_4bit else "load_in_8bit=True")
    from transformers import BitsAndBytesConfig

    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict | None = None,
    auto_clear_cache: bool = True,
) -> nn.Module:
    """Get a 4-bit / 8-bit transformers model ready for adapter training (peft's function, same steps).

    1. Freeze every base parameter (the adapter added next is what trains).
    2. Upcast fp16/bf16 parameters that are not 4-bit codes (layer norms, embeddings, the head) to fp32:
       norms and the loss are unstable in half precision, and they are small.
    After step 2, with `auto_clear_cache` (peft's default), the GPU allocator's cache is emptied: the old
    half-precision copies would otherwise stay reserved.
    3. On a quantised model with `use_gradient_checkpointing`: make the embedding output require grad (with
       reentrant checkpointing a frozen input would otherwise cut the graph) and turn checkpointing on,
       trading recomputation for activation memory.

    Returns:
        The same model, changed in place.
    """
    # peft's default (reentrant checkpointing), said explicitly: torch warns when it is left implicit.
    kwargs = {"use_reentrant": True} if gradient_checkpointing_kwargs is None else dict(gradient_checkpointing_kwargs)
    for param in model.parameters():
        param.requires_grad_(False)
    for param in model.parameters():
        if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
            param.data = param.data.to(torch.float32)
    if auto_clear_cache and torch.cuda.is_available():
        torch.cuda.empty_cache()
    loaded_in_kbit = getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)
    if loaded_in_kbit and use_gradient_checkpointing:
        if kwargs.get("use_reentrant", True):
            model.enable_input_require_grads()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def prepare_model_for_int8_training(model: nn.Module, *args, **kwargs) -> nn.Module:
    """The old name *大模型高效微调* uses (on an 8-bit OPT); peft had it as this alias, with this warning,
    before removing it. Same arguments and steps as `prepare_model_for_kbit_training`."""
    warnings.warn(
        "prepare_model_for_int8_training is deprecated; use prepare_model_for_kbit_training (same arguments), "
        "which prepares 8-bit and 4-bit models alike",
        FutureWarning,
        stacklevel=2,
    )
    return prepare_model_for_kbit_training(model, *args, **kwargs)


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The full-precision weight (out, in) of a bitsandbytes 4-bit or 8-bit linear layer."""
    bnb = require_bitsandbytes(f"dequantising {type(layer).__name__}")
    weight = layer.weight
    if type(layer).__name__ == "Linear4bit":
        _unpack_cpu_4bit(weight)
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    # LLM.int8(): the row scales move from the weight to `layer.state` on the first forward; the weight's copy,
    # when present, is the newer one (set by a re-quantisation that no forward has consumed yet).
    scales = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
    return bnb.functional.int8_vectorwise_dequant(weight.data, scales.to(weight.device))


def readable_weight(layer: nn.Module) -> torch.Tensor:
    """A layer's weight as numbers in its own layout: dequantised for a bitsandbytes layer, else the weight."""
    return dequantized_weight(layer) if is_quantized_linear(layer) else layer.weight


def _unpack_cpu_4bit(weight: nn.Parameter) -> None:
    """Undo bitsandbytes' CPU inference repacking of a 4-bit weight (as its own state-dict saving does).

    On CPUs with AVX512-BF16, `Linear4bit` rewrites its codes into a kernel-friendly layout (and its scales to
    bf16) on the first no-grad forward in eval mode; `dequantize_4bit` only reads the standard layout.
    """
    state = getattr(weight, "quant_state", None)
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)


def merge_into_quantized(layer: nn.Module, delta: torch.Tensor) -> None:
    """Add `delta` (out, in) to a bitsandbytes layer's weight: dequantise, add, quantise again, in place.

    Re-quantising rounds W + delta to the 4-/8-bit grid again, so merged outputs differ slightly from the
    unmerged adapter (as in peft). For an exact merge, `dequantize_model` first (what `merge_and_unload` does).
    """
    merged = dequantized_weight(layer)
    requantize(layer, (merged.to(torch.float32) + delta.to(merged.device, torch.float32)).to(merged.dtype))


def requantize(layer: nn.Module, new_weight: torch.Tensor) -> None:
    """Replace a bitsandbytes layer's weight by `new_weight` (out, in), quantised with the layer's settings."""
    bnb = require_bitsandbytes(f"quantising into {type(layer).__name__}")
    weight = layer.weight
    if type(layer).__name__ == "Linear4bit":
        # Same block size, quant type and double quantisation as before; `bnb_quantized=False` re-quantises.
        kwargs = {k: v for k, v in weight.__dict__.items() if not k.startswith("_") and k != "data"}
        kwargs.update(bnb_quantized=False, requires_grad=False)
        layer.weight = bnb.nn.Params4bit(new_weight.to("cpu"), **kwargs).to(weight.device)
    else:
        layer.weight = bnb.nn.Int8Params(
            new_weight.to("cpu"), requires_grad=False, has_fp16_weights=weight.has_fp16_weights
        ).to(weight.device)
        layer.state.reset_grads()
        layer.state.SCB = layer.state.CB = None  # the next forward takes the new scales from the weight


def dequantized_linear(layer: nn.Module, dtype: torch.dtype | None = None) -> nn.Linear:
    """A plain `nn.Linear` with the layer's dequantised weight (in `dtype`, default its own) and its bias."""
    weight = dequantized_weight(layer)
    weight = weight.to(dtype) if dtype is not None else weight
    linear = nn.Linear(
        layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta", dtype=weight.dtype
    )  # no init: both tensors are set below
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if layer.bias is not None:
        linear.bias = nn.Parameter(layer.bias.data.to(weight.dtype), requires_grad=False)
    return linear


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every bitsandbytes linear layer (also those wrapped by adapters) by a dequantised `nn.Linear`.

    The transformers model's quantisation flags are cleared too, so the result saves and trains as a plain
    model. `dtype` defaults to the model's `config.dtype` (the dtype it was loaded with).

    Returns:
        The same model, changed in place.
    """
    if dtype is None:
        config_dtype = getattr(getattr(model, "config", None), "dtype", None)
        dtype = config_dtype if isinstance(config_dtype, torch.dtype) else None
    found = [(name, module) for name, module in model.named_modules() if is_quantized_linear(module)]
    for name, module in found:
        model.set_submodule(name, dequantized_linear(module, dtype))
    _clear_quantization_flags(model)
    logger.info("dequantised %d bitsandbytes layers%s", len(found), f" to {dtype}" if dtype else "")
    return model


def _clear_quantization_flags(model: nn.Module) -> None:
    """Forget that a transformers model was loaded quantised (as transformers' own `dequantize` does)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
        return
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
        if getattr(model, flag, False):
            setattr(model, flag, False)
