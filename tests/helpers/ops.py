"""Shared by the fast-path test files: tolerances, a tiny llama in train mode on a device, leaf tensors."""

import torch

from deltatune import LoraConfig, get_peft_model
from helpers.models import tiny_model

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def close(a, b, tol=1e-5):
    return torch.allclose(a, b, atol=tol, rtol=tol), (a - b).abs().max().item()


def relative_error(a, b):
    return (torch.linalg.norm((a - b).float()) / torch.linalg.norm(b.float())).item()


def tiny_llama_on(device="cpu", seed=0):
    """The tiny llama without a pad token (no zeroed embedding row), in train mode, on `device`."""
    return tiny_model("llama", seed=seed, pad_token_id=None).train().to(device)


def leaves(*shapes, device="cpu", dtype=torch.float32):
    return [torch.randn(*s, device=device, dtype=dtype).requires_grad_() for s in shapes]


def lora_model(device="cpu", dropout=0.0, names=("default",), bias="none"):
    """LoRA on all seven llama projections with random (non-zero) weights; later names get other ranks."""
    model = get_peft_model(
        tiny_llama_on(device, seed=5),
        LoraConfig(r=4, lora_alpha=8, target_modules=SEVEN, lora_dropout=dropout, init_lora_weights=False, bias=bias),
        names[0],
    )
    for i, name in enumerate(names[1:]):
        model.add_adapter(
            name, LoraConfig(r=2 + 2 * i, lora_alpha=4 + i, target_modules=SEVEN, init_lora_weights=False)
        )
    return model
