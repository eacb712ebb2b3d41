"""The methods: one module per method (LoRA's options in the `lora` package), each registered here by one line.

Adding a method = one file (config dataclass + layers + how it is applied) + one `register(...)` line below.
"""

from __future__ import annotations

from deltatune.core.config import PeftType
from deltatune.core.registry import Method, register
from deltatune.methods.adalora import (
    AdaLoraConfig,
    add_adalora,
    add_orthogonal_regularizer,
    load_rank_pattern,
    pruned_tensors,
)
from deltatune.methods.bitfit import BitFitConfig, add_bitfit, bitfit_is_trainable
from deltatune.methods.bottleneck import AdapterConfig, add_bottleneck
from deltatune.methods.ia3 import IA3Config, add_ia3
from deltatune.methods.lora.lora import LoraConfig, add_lora, lora_bias_is_trainable, refuse_second_bias
from deltatune.methods.p_tuning import PromptEncoderConfig, add_p_tuning
from deltatune.methods.prefix_tuning import PREFIX_HOOKS, PrefixTuningConfig, add_prefix_tuning
from deltatune.methods.prompt_tuning import PromptTuningConfig, add_prompt_tuning
from deltatune.methods.virtual_tokens import EMBEDDING_HOOKS

register(
    Method(
        PeftType.LORA,
        LoraConfig,
        add_lora,
        lora_bias_is_trainable,
        can_merge=True,
        param_prefix="lora_",
        refuse_second_adapter=refuse_second_bias,
    )
)
register(Method(PeftType.BITFIT, BitFitConfig, add_bitfit, bitfit_is_trainable, can_merge=True))  # trained in place
register(Method(PeftType.BOTTLENECK, AdapterConfig, add_bottleneck))
register(
    Method(
        PeftType.ADALORA,
        AdaLoraConfig,
        add_adalora,
        lora_bias_is_trainable,
        can_merge=True,
        after_forward=add_orthogonal_regularizer,
        to_file=pruned_tensors,
        from_file=load_rank_pattern,
        param_prefix="lora_",
        refuse_second_adapter=refuse_second_bias,
    )
)
register(Method(PeftType.IA3, IA3Config, add_ia3, can_merge=True, param_prefix="ia3_"))
register(Method(PeftType.PROMPT_TUNING, PromptTuningConfig, add_prompt_tuning, **EMBEDDING_HOOKS))
register(Method(PeftType.P_TUNING, PromptEncoderConfig, add_p_tuning, **EMBEDDING_HOOKS))
register(Method(PeftType.PREFIX_TUNING, PrefixTuningConfig, add_prefix_tuning, **PREFIX_HOOKS))
