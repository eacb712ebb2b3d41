"""Shared by the LoRA test files: a (deltatune, peft) pair with the same non-zero adapter values."""

import torch
from tiny_models import copy_to_peft, logits, lora_pair, randomize_adapter

PARITY_ARCHS = ["llama", "bloom", "gpt2", "opt", "t5", "bert"]
ATOL = 1e-5


def parity_kwargs(arch: str) -> dict:
    kwargs = dict(r=4, lora_alpha=8, init_lora_weights=False)
    if arch == "bert":
        kwargs["modules_to_save"] = ["classifier"]
    return kwargs


def trained_pair(arch: str, **kwargs):
    """(ours, peft) with the same random adapter values in both."""
    ours, theirs = lora_pair(arch, **{**parity_kwargs(arch), **kwargs})
    randomize_adapter(ours)
    copy_to_peft(ours, theirs)
    return ours, theirs


def assert_same_logits(a, b, inputs, **kwargs):
    torch.testing.assert_close(logits(a, inputs, **kwargs), logits(b, inputs, **kwargs), rtol=0, atol=ATOL)
