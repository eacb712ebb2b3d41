"""A tiny random Llama on disk and its 4-bit / 8-bit loads, for the QLoRA and LoftQ tests."""

import torch
from transformers import LlamaForCausalLM

from deltatune.quantization import bitsandbytes_config
from helpers.models import tiny_model


def save_tiny_llama(folder) -> None:
    """A tiny random Llama saved as safetensors in `folder` (the quantised loads read it)."""
    model = tiny_model("llama", hidden_size=64, intermediate_size=256, initializer_range=0.05, pad_token_id=None)
    model.save_pretrained(folder)


def load(folder, bits: int | None = None, train: bool = False) -> LlamaForCausalLM:
    """The Llama in `folder`: full precision when `bits` is None, else a 4-bit (NF4) or 8-bit load on the CPU.

    `train=True` returns it in train mode: on CPUs with AVX512-BF16, bitsandbytes repacks 4-bit codes for
    inference on the first eval forward, which peft's dequantisation then misreads (deltatune unpacks them
    first); comparisons with peft that dequantise stay in train mode.
    """
    if bits is None:
        model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    else:
        quant = bitsandbytes_config(load_in_4bit=bits == 4, load_in_8bit=bits == 8, compute_dtype=torch.float32)
        model = LlamaForCausalLM.from_pretrained(folder, quantization_config=quant, device_map={"": "cpu"})
    return model.train(train)
