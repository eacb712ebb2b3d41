"""Fast paths behind deltatune's adapters: fused LoRA linear, batched mixed-adapter rows, lean cross-entropy.

Every function here has a plain PyTorch reference (`LoraLayer.adapter_forward`, `AdapterLayer.mixed_forward`,
`F.cross_entropy` on full logits) and tests/test_ops.py checks outputs and gradients against it.
"""

from deltatune.ops.cross_entropy import lean_causal_lm_loss, linear_cross_entropy
from deltatune.ops.lora_ops import lora_linear
from deltatune.ops.mixed_batch import mixed_lora_linear

__all__ = ["lean_causal_lm_loss", "linear_cross_entropy", "lora_linear", "mixed_lora_linear"]
