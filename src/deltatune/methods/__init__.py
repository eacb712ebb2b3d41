"""The methods: one module per method (LoRA's options in the `lora` package), each registered here by one line.

Adding a method = one file (config dataclass + layers + how it is applied) + one `register(...)` line below.
"""

from __future__ import annotations

from deltatune.core.config import PeftType
from deltatune.core.registry import Method, register
from deltatune.methods.adalora import ADALORA_HOOKS, AdaLoraConfig, add_adalora
from deltatune.methods.bitfit import BITFIT_HOOKS, BitFitConfig, add_bitfit
from deltatune.methods.bottleneck import AdapterConfig, add_bottleneck
from deltatune.methods.ia3 import IA3Config, add_ia3, add_weighted_ia3
from deltatune.methods.lora.combine import add_weighted_adapter
from deltatune.methods.lora.hooks import LORA_FAMILY_HOOKS
from deltatune.methods.lora.initialization import convert_to_plain_lora
from deltatune.methods.lora.lora import LoraConfig, add_lora
from deltatune.methods.p_tuning import PromptEncoderConfig, add_p_tuning
from deltatune.methods.prefix_tuning import PREFIX_HOOKS, PrefixTuningConfig, add_prefix_tuning
from deltatune.methods.prompt_tuning import PromptTuningConfig, add_prompt_tuning, random_start_while_loading
from deltatune.methods.virtual_tokens import EMBEDDING_HOOKS

register(
    Method(
        PeftType.LORA,
        LoraConfig,
        add_lora,
        **LORA_FAMILY_HOOKS,
        convert_on_save=convert_to_plain_lora,  # PiSSA / OLoRA saved as a plain LoRA of the original base
        add_weighted_adapter=add_weighted_adapter,
        card_tags=("lora",),
    )
)
register(Method(PeftType.BITFIT, BitFitConfig, add_bitfit, **BITFIT_HOOKS))  # trained in place
register(Method(PeftType.BOTTLENECK, AdapterConfig, add_bottleneck))
register(Method(PeftType.ADALORA, AdaLoraConfig, add_adalora, **LORA_FAMILY_HOOKS, **ADALORA_HOOKS))
register(
    Method(PeftType.IA3, IA3Config, add_ia3, can_merge=True, param_prefix="ia3_", add_weighted_adapter=add_weighted_ia3)
)
register(
    Method(
        PeftType.PROMPT_TUNING,
        PromptTuningConfig,
        add_prompt_tuning,
        **EMBEDDING_HOOKS,
        while_loading=random_start_while_loading,  # a TEXT start would read a tokenizer the file makes moot
    )
)
register(Method(PeftType.P_TUNING, PromptEncoderConfig, add_p_tuning, **EMBEDDING_HOOKS))
register(Method(PeftType.PREFIX_TUNING, PrefixTuningConfig, add_prefix_tuning, **PREFIX_HOOKS))
