"""Fast paths behind deltatune's adapters: fused LoRA linear, batched mixed-adapter rows, lean cross-entropy.

Every function here has a plain PyTorch reference (`LoraLayer.adapter_forward`, `AdapterLayer.mixed_forward`,
`F.cross_entropy` on full logits) and tests/test_ops.py checks outputs and gradients against it.
`lora_dispatch` decides which forward a LoRA layer runs; `set_fast_paths(False)` (or `DELTATUNE_FAST_PATHS=0`
in the environment) makes every LoRA layer run its reference forward. The private torch state the fast paths
read is all in `torch_internals`, probed at import.
"""

from deltatune.ops.cross_entropy import lean_causal_lm_loss, linear_cross_entropy
from deltatune.ops.lora_dispatch import fast_paths_enabled, set_fast_paths, use_fast_paths
from deltatune.ops.lora_ops import lora_linear
from deltatune.ops.mixed_batch import mixed_lora_linear

__all__ = [
    "fast_paths_enabled",
    "lean_causal_lm_loss",
    "linear_cross_entropy",
    "lora_linear",
    "mixed_lora_linear",
    "set_fast_paths",
    "use_fast_paths",
]
