"""Prefix Tuning: learned keys and values in front of every attention layer (Li & Liang, 2021, arXiv:2101.00190).

For each layer l, n learned key and value vectors are put before the keys and values computed from the input, so
every real token can attend to them:

    attention_l(x) = softmax(Q_l(x) [Pk_l ; K_l(x)]^T / sqrt(d_h)) [Pv_l ; V_l(x)]

The base model is untouched. The prefixes reach the attention layers as an already-filled KV cache (a
`transformers` DynamicCache, or an EncoderDecoderCache whose self-attention part holds them for encoder-decoders),
so the model needs an attention that takes a KV cache (`cache` since transformers 5.24, `past_key_values` before;
deltatune.kv_cache reads which from the model); for one that takes none we raise an error naming it.

Parameters: with `prefix_projection=False` the prefixes are trained directly, n x (2 * layers * d) values
(983,040 on bloom-1b4-zh with n = 10). With `prefix_projection=True` they come from a small network,
embedding (n, d) -> Linear(d, h) -> Tanh -> Linear(h, 2 * layers * d), which trains more stably and costs
far more parameters (205,641,728 on bloom-1b4-zh). The adapter file stores the computed prefixes either way
(`prompt_embeddings`, shape (n, 2 * layers * d)), as peft does.

On grouped-query attention (Llama-style) the prefix has the key/value heads' width: d = kv_heads * head_dim.
For encoder-decoders, as in peft, only the decoder's self-attention gets a prefix, and decoder layer i reads
rows 4i, 4i + 1 of the table laid side by side with itself (peft's layout, kept so that files agree).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache

from deltatune.core.config import PeftType
from deltatune.kv_cache import CACHE_ARGUMENTS, cache_length, describe_model, passed_cache, require_cache_argument
from deltatune.methods.virtual_tokens import (
    PROMPT_HOOKS,
    PromptLearningConfig,
    VirtualTokenEncoder,
    adjust_ids,
    batch_size,
    build_on_device,
    file_tensors,
    generate_inputs,
    load_file_tensors,
    prepare_model,
    prepend,
    rewritten_forward,
)


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix Tuning settings (peft's field names and defaults).

    Attributes:
        init_weights: None draws the prefixes at random; "zero" starts them at zero.
        encoder_hidden_size: width h of the projection network; None takes token_dim.
        prefix_projection: False trains the prefixes directly; True computes them with
            embedding -> Linear -> Tanh -> Linear (the tutorials' "要不要有全连接层").
    """

    init_weights: str | None = None
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False

    def __post_init__(self) -> None:
        self.peft_type = PeftType.PREFIX_TUNING
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights={self.init_weights!r} is not known; use None (random) or 'zero'")


class PrefixEncoder(VirtualTokenEncoder):
    """Maps virtual-token indices (B, n) to the flat prefixes (B, n, 2 * layers * d)."""

    def __init__(self, config: PrefixTuningConfig) -> None:
        super().__init__(config.num_virtual_tokens, config.inference_mode)
        n, d = config.num_virtual_tokens, config.token_dim
        width = config.num_layers * 2 * d  # keys and values of every layer
        self.prefix_projection = config.prefix_projection
        if self.prefix_projection and not config.inference_mode:
            self.embedding = nn.Embedding(n, d)
            self.transform = nn.Sequential(
                nn.Linear(d, config.encoder_hidden_size), nn.Tanh(), nn.Linear(config.encoder_hidden_size, width)
            )
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(n, width)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    @property
    def table_is_parameter(self) -> bool:
        return self.inference_mode or not self.prefix_projection

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        prefixes = self.embedding(indices)  # (B, n, d) or (B, n, width)
        return self.transform(prefixes) if hasattr(self, "transform") else prefixes


def prefix_cache(peft_model: nn.Module, batch: int) -> DynamicCache | EncoderDecoderCache:
    """The active adapter's prefixes as a filled KV cache for a batch of `batch` rows."""
    config = peft_model.active_peft_config
    model = peft_model.get_base_model()
    n, layers, heads = config.num_virtual_tokens, config.num_layers, config.num_attention_heads
    table = peft_model.prompt_encoder[peft_model.active_adapter].table()  # (n, layers*2*d)
    table = table.to(getattr(model, "dtype", table.dtype))
    kv = table.unsqueeze(0).expand(batch, -1, -1).reshape(batch, n, layers * 2, heads, config.token_dim // heads)
    submodules = config.num_transformer_submodules
    if submodules == 2:
        kv = torch.cat((kv, kv), dim=2)  # peft's layout for encoder-decoders, see the module docstring
    per_layer = kv.permute(2, 0, 3, 1, 4).split(2 * submodules)  # layers x (2*sub, B, heads, n, head_dim)
    self_attention = DynamicCache([(layer[0], layer[1]) for layer in per_layer])
    if submodules == 1:
        return self_attention
    # The cross-attention cache starts empty: it is filled from the encoder output at the first decoder step.
    return EncoderDecoderCache(self_attention, DynamicCache())


def with_prefix(peft_model: nn.Module, inputs: dict[str, Any], fresh: bool = False) -> dict[str, Any]:
    """Rewrite model inputs for prefix tuning: an empty (or no) cache becomes the prefix cache; the attention mask
    of the layers that see the prefix grows by n; position_ids move past the prefix. `fresh`: always start from
    the prefix alone (generating without a cache re-runs the whole sequence at every step)."""
    inputs = dict(inputs)
    config = peft_model.active_peft_config
    n = config.num_virtual_tokens
    adjust_ids(inputs, config.task_type, n, prefix=True)
    mask_key = "decoder_attention_mask" if config.num_transformer_submodules == 2 else "attention_mask"
    if inputs.get(mask_key) is not None:
        inputs[mask_key] = prepend(inputs[mask_key], n, 1)
    key, cache = passed_cache(inputs)
    if fresh or cache_length(cache) == 0:
        key = key or require_cache_argument(peft_model.get_base_model(), "prefix tuning", *NEEDS_CACHE)
        for name in CACHE_ARGUMENTS:
            inputs.pop(name, None)  # an explicit None under the other name would clash with the prefix cache
        inputs[key] = prefix_cache(peft_model, batch_size(inputs))
    return inputs


def prefix_forward(peft_model: nn.Module, **inputs: Any) -> Any:
    """Forward with the prefixes in every attention layer; fails loudly if the model never read them."""
    model = peft_model.get_base_model()
    if peft_model.base_model.adapters_disabled:
        return model(**inputs)
    inputs = with_prefix(peft_model, inputs)
    key, cache = passed_cache(inputs)
    before = cache_length(cache)
    outputs = model(**inputs)
    if cache_length(cache) == before:  # no attention layer appended its keys to the prefix cache
        raise ValueError(
            f"prefix tuning: {describe_model(model)} ran without reading its KV cache (passed as {key}=) under "
            f"transformers {transformers.__version__}, so the prefixes had no effect; this architecture cannot "
            "take prefix tuning (use prompt tuning, P-tuning or LoRA)"
        )
    return outputs


def prefix_generate(peft_model: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    """`generate` with the prefixes: the first step starts from the prefix cache, later steps extend it."""
    model = peft_model.get_base_model()
    kwargs = generate_inputs(args, kwargs)
    if peft_model.base_model.adapters_disabled:
        return model.generate(**kwargs)
    # Without a cache, models such as Llama and T5 still hand back the cache they were given, and generate would
    # feed it in again with the whole sequence: start from the bare prefix at every step instead.
    config = kwargs.get("generation_config") or model.generation_config
    fresh = not kwargs.get("use_cache", getattr(config, "use_cache", True))
    with rewritten_forward(model, lambda inputs: with_prefix(peft_model, inputs, fresh)):
        return model.generate(**kwargs)


NEEDS_CACHE = (
    "puts learned keys/values into every attention layer through the model's KV cache",
    "use prompt tuning or P-tuning (they prepend embeddings and need no cache) or LoRA",
)


def add_prefix_tuning(model: nn.Module, config: PrefixTuningConfig, adapter_name: str) -> PrefixEncoder:
    """Check the architecture, size the config (key/value heads on grouped-query attention), build the encoder.

    A transformers model that takes no KV cache is refused here; any other module is accepted, as peft accepts
    it (its prefixes can be trained elsewhere, saved and loaded), and refused with the same error at its first
    forward.
    """
    if isinstance(model, transformers.PreTrainedModel):
        require_cache_argument(model, "prefix tuning", *NEEDS_CACHE)
    if any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        raise ValueError(
            "prefix tuning does not work with gradient checkpointing (the prefix cache would be filled twice); "
            "call model.gradient_checkpointing_disable() first, as peft also requires"
        )
    prepare_model(model, config, adapter_name, kv_heads=True)
    return build_on_device(model, lambda: PrefixEncoder(config))


# Hooks prefix tuning registers (see deltatune.core.registry.Method).
PREFIX_HOOKS = dict(
    **PROMPT_HOOKS, forward=prefix_forward, generate=prefix_generate, to_file=file_tensors, from_file=load_file_tensors
)
