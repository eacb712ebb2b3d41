"""The device and dtype a command runs the base model in (`--device`, `--dtype`), for train, chat, eval and merge.

Precision follows peft's recipe: the base model may be half precision (bf16/fp16) while the adapter weights stay
in fp32 (`get_peft_model` and `PeftModel.from_pretrained` cast them up). `auto` keeps the model's own dtype where
the device runs it natively; a CPU without native bf16 kernels keeps fp32.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
DEVICES = ("auto", "cpu", "cuda", "mps")


@dataclass
class Precision:
    """The device and base-model dtype a run uses, and why."""

    device: str  # cpu, cuda or mps
    dtype: torch.dtype
    reason: str

    @property
    def mixed_precision(self) -> str | None:
        """ "bf16"/"fp16" when the Trainer should autocast (a half-precision base on a GPU), else None."""
        half = self.dtype in (torch.bfloat16, torch.float16)
        return DTYPE_NAMES[self.dtype] if half and self.device in ("cuda", "mps") else None


def choose_device(requested: str = "auto") -> str:
    """`--device`: auto is cuda if available, else mps, else cpu; a device that is not there is an error."""
    if requested not in DEVICES:
        raise ValueError(f"--device {requested!r}: choose one of {', '.join(DEVICES)}")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if requested == "auto":
        return "cuda" if available["cuda"] else "mps" if available["mps"] else "cpu"
    if not available[requested]:
        raise ValueError(f"--device {requested}: no {requested} device here; use --device auto or cpu")
    return requested


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bf16 natively (AVX512-BF16 or AMX); without it bf16 is emulated and slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def device_supports(device: str, dtype: torch.dtype) -> bool:
    if dtype == torch.float32:
        return True
    if device == "cuda":
        return dtype == torch.float16 or torch.cuda.is_bf16_supported()
    if device == "mps":
        return dtype == torch.float16
    return dtype == torch.bfloat16 and cpu_has_bf16()  # fp16 on a CPU: no fast kernels, no autocast


def model_dtype(config: Any) -> torch.dtype:
    """The dtype a model's config says its weights are in (fp32 when it says nothing)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def choose_precision(requested_dtype: str, requested_device: str, config: Any) -> Precision:
    """`--dtype` and `--device` resolved for this model and machine (auto: the model's own dtype if the device
    runs it natively, else fp32)."""
    if requested_dtype not in ("auto", *DTYPES):
        raise ValueError(f"--dtype {requested_dtype!r}: choose one of auto, {', '.join(DTYPES)}")
    device = choose_device(requested_device)
    if requested_dtype != "auto":
        dtype = DTYPES[requested_dtype]
        if not device_supports(device, dtype):
            logger.warning("--dtype %s on %s has no native kernels here: expect slow steps", requested_dtype, device)
        return Precision(device, dtype, f"--dtype {requested_dtype}")
    native = model_dtype(config)
    name = DTYPE_NAMES.get(native, str(native))
    if device_supports(device, native):
        return Precision(device, native, f"the model's own dtype ({name}), which {device} runs natively")
    if native == torch.bfloat16 and device == "cuda":
        return Precision(device, torch.float16, "the model is bf16, this GPU has no bf16: fp16")
    return Precision(device, torch.float32, f"the model is {name}, which {device} does not run natively here: fp32")


def log_precision(precision: Precision) -> None:
    mixed = f", mixed precision {precision.mixed_precision}" if precision.mixed_precision else ""
    logger.info(
        "device %s, base model in %s (%s)%s; adapter weights in fp32",
        precision.device,
        DTYPE_NAMES.get(precision.dtype, precision.dtype),
        precision.reason,
        mixed,
    )
