"""LoRA (Hu et al., 2021) and its options: DoRA, PiSSA/OLoRA/LoftQ initialisation, combining adapters, layer
replication, trainable tokens, and LoRA on convolutions and nn.MultiheadAttention; the method itself is in `lora.py`.
"""

from deltatune.methods.lora import mha  # noqa: F401  (adds LoRA's nn.MultiheadAttention layer to SPECIAL_LAYERS)
from deltatune.methods.lora.lora import DEFAULT_TARGET_MODULES, LoraConfig, LoraLayer

__all__ = ["DEFAULT_TARGET_MODULES", "LoraConfig", "LoraLayer"]
