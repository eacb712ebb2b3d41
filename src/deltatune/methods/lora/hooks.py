"""What the LoRA family (LoRA and AdaLoRA) plugs into `PeftModel` besides its layers: the registry hooks that
concern trained base biases, merging replicated layers, and checking the tensors saved (see
`deltatune.core.registry.Method`)."""

from __future__ import annotations

import warnings

import torch

from deltatune.core.config import PeftConfig, PeftWarning
from deltatune.methods.lora.lora import lora_bias_is_trainable, refuse_second_bias
from deltatune.methods.lora.replication import refuse_merge_if_replicated


def bias_disable_warning(config: PeftConfig) -> str | None:
    """Why the disabled model is not the base one: with `bias` "all" / "lora_only" the biases trained in place."""
    bias = getattr(config, "bias", "none")
    if bias == "none":
        return None
    return (
        f"disabling adapter layers with bias={bias!r} does not give the base model's output: the biases trained in "
        "place stay"
    )


def warn_unsharded(tensors: dict[str, torch.Tensor], adapter_name: str) -> None:
    """As peft: a 1-D or empty lora_A / lora_B is a ZeRO-3 / FSDP shard saved without gathering first."""
    lora = {k: v for k, v in tensors.items() if ".lora_A" in k or ".lora_B" in k}
    bad = [(k, tuple(v.shape)) for k, v in lora.items() if v.ndim < 2 or v.numel() == 0]
    if bad:
        warnings.warn(
            f"Adapter {adapter_name!r}: {len(bad)} LoRA tensor(s) have invalid shape: {bad[:3]}. A 1-D or zero-sized "
            "lora_A / lora_B tensor indicates that DeepSpeed ZeRO-3 / FSDP shards were not gathered before "
            "save_pretrained() and are therefore incomplete; gather them first (deepspeed.zero.GatheredParameters "
            "or FSDP's summon_full_params)",
            PeftWarning,
            stacklevel=3,  # the caller of get_peft_model_state_dict, which runs this hook
        )


# The Method fields LoRA and AdaLoRA share.
LORA_FAMILY_HOOKS = dict(
    base_param_trains=lora_bias_is_trainable,
    can_merge=True,
    param_prefix="lora_",
    refuse_second_adapter=refuse_second_bias,
    refuse_merge=refuse_merge_if_replicated,
    disable_warning=bias_disable_warning,
    check_saved=warn_unsharded,
)
