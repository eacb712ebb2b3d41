"""A deltatune model beside HF peft's on copies of one tiny base, and the tools to give both the same adapter."""

from __future__ import annotations

import copy

import torch

from helpers.models import DEFAULT_TASK, tiny_model

PARITY_ARCHS = ["llama", "bloom", "gpt2", "opt", "t5", "bert"]
ATOL = 1e-5


def twins(arch: str, task: str | None = None) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Two independent copies of the same tiny model: one for deltatune, one for peft."""
    model = tiny_model(arch, task)
    return model, copy.deepcopy(model)


def randomize_adapter(model: torch.nn.Module, seed: int = 3, scale: float = 0.1) -> None:
    """Fill every trainable tensor with random values, so an update that is ignored cannot go unnoticed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=gen) * scale + param)


def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


def lora_pair(arch: str, seed: int = 5, task: str | None = None, **lora_kwargs):
    """(deltatune model, peft model) with the same base and the same LoRA settings, built from the same seed."""
    import peft

    import deltatune

    task = task or DEFAULT_TASK.get(arch, "CAUSAL_LM")
    ours_base, peft_base = twins(arch, task)
    torch.manual_seed(seed)
    ours = deltatune.get_peft_model(ours_base, deltatune.LoraConfig(task_type=task, **copy.deepcopy(lora_kwargs)))
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(peft_base, peft.LoraConfig(task_type=task, **copy.deepcopy(lora_kwargs)))
    return ours, theirs


def copy_to_peft(ours, theirs) -> None:
    """Put deltatune's adapter values into the peft model, through peft's own loader (checks the key names)."""
    import peft

    result = peft.set_peft_model_state_dict(theirs, ours.get_adapter_state_dict())
    assert not result.unexpected_keys, result.unexpected_keys


def wrapped_names(model, layer_class) -> list[str]:
    """Names (relative to the transformers model) of modules wrapped in `layer_class`."""
    prefix = "base_model.model."
    return sorted(n[len(prefix) :] for n, m in model.named_modules() if isinstance(m, layer_class))


def parity_kwargs(arch: str) -> dict:
    """LoRA settings for the parity tests: non-zero init, and bert's classifier trained beside."""
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
