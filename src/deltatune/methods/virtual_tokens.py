"""Virtual-token plumbing shared by Prompt Tuning, P-Tuning and Prefix Tuning.

The three methods put `n = num_virtual_tokens` learned vectors in front of every sequence. They differ only in
where the vectors enter the model:

    prompt tuning, P-tuning:  inputs_embeds = [P ; E(x)]                      P: (n, d) from the prompt encoder
    prefix tuning:            K_l = [Pk_l ; K_l(x)],  V_l = [Pv_l ; V_l(x)]    for every attention layer l

This module holds what they share: the config fields (peft's `PromptLearningConfig`), filling the model's sizes
into the config, the encoder base class whose output table is what the adapter file stores (`prompt_embeddings`,
as in peft), attention masks / labels / token type ids stretched over the virtual tokens, the per-task forward
of the two embedding methods, and `generate` run through the same input rewriting so that the KV cache works.
Prefix tuning's cache building lives in prefix_tuning.py.

Behaviour follows peft 0.21.2, including what the returned tensors look like:
- logits keep the virtual positions (peft never strips them): a causal LM with n virtual tokens returns
  (B, n + T, V) logits; its labels are padded with -100 so the loss covers only the real tokens.
- position_ids are dropped for the embedding methods (with a warning) and shifted by n for prefix tuning.
- token_type_ids are kept for SEQ_CLS, TOKEN_CLS and QUESTION_ANS (zeros over the virtual tokens) and dropped
  with a warning for the other tasks.
Where peft 0.21.2 is broken we do the evident thing instead: TOKEN_CLS labels are padded with -100 (peft's loss
crashes on the length mismatch); QUESTION_ANS start/end positions are shifted by n (peft scores them against the
wrong tokens), and QUESTION_ANS keeps token_type_ids (and, for prefix tuning, position_ids) as the other
classifier tasks do (peft silently drops both there). Inference-loaded adapters count 0 trainable parameters
(peft leaves the loaded prompt trainable). `PeftModel.unload()` gives the unchanged base model back (peft has no
unload for prompt methods and raises AttributeError).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import transformers
from torch import nn

from deltatune.core.config import PeftConfig, TaskType
from deltatune.core.targeting import wrap_modules_to_save
from deltatune.kv_cache import cache_length, passed_cache

logger = logging.getLogger(__name__)

# Tasks whose token_type_ids are kept (peft drops them for the others).
KEEPS_TOKEN_TYPES = {TaskType.SEQ_CLS, TaskType.TOKEN_CLS, TaskType.QUESTION_ANS}


@dataclass
class PromptLearningConfig(PeftConfig):
    """Fields every prompt method has (peft's `PromptLearningConfig`); the sizes are filled from the model.

    Attributes:
        num_virtual_tokens: how many learned vectors go in front of each sequence (the tutorials use 10-20). None
            (peft's default) is allowed in the config but must be set before the adapter is added to a model.
        token_dim: width of one virtual token; None takes the model's hidden size (for prefix tuning on
            grouped-query attention: key/value heads x head size).
        num_transformer_submodules: 2 for encoder-decoder models (peft keeps a second set of rows), else 1.
        num_attention_heads: heads the prefix is split into; None takes the model's (key/value) heads.
        num_layers: layers that get a prefix; None takes the model's layer count.
        modules_to_save: modules trained in full beside the prompt; `PeftModel` adds the classifier heads
            for SEQ_CLS / TOKEN_CLS / QUESTION_ANS, as peft does.
    """

    is_prompt_learning: ClassVar[bool] = True

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_virtual_tokens is not None:  # None waits for the model, as in peft; checked again when added
            check_num_virtual_tokens(self)


def check_num_virtual_tokens(config: PromptLearningConfig) -> None:
    """Raise unless `config.num_virtual_tokens` is a positive integer (None included: a model needs a number)."""
    n = config.num_virtual_tokens
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(
            f"num_virtual_tokens={n!r} is invalid: it must be a positive integer, the number of learned tokens put "
            f"in front of each sequence (e.g. {type(config).__name__}(num_virtual_tokens=20, ...))"
        )


# ---- filling the model's sizes into the config ------------------------------------------------------------


def _first_attr(model_config: Any, names: tuple[str, ...]) -> Any:
    for name in names:
        value = getattr(model_config, name, None)
        if value is not None:
            return value
    return None


def prepare_config(config: PromptLearningConfig, model: nn.Module, kv_heads: bool) -> None:
    """Fill num_layers, token_dim, num_attention_heads, encoder_hidden_size and the submodule count in place.

    `kv_heads`: size the tokens for the key/value heads (prefix tuning on grouped-query attention, where
    keys and values have fewer heads than queries).
    """
    model_config = getattr(model, "config", None)
    if hasattr(model_config, "get_text_config"):
        model_config = model_config.get_text_config()
    wanted = {
        "num_layers": ("num_hidden_layers", "num_layers", "n_layer"),
        "token_dim": ("hidden_size", "n_embd", "d_model"),
        "num_attention_heads": ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"),
    }
    for field_name, names in wanted.items():
        if getattr(config, field_name) is None:
            value = _first_attr(model_config, names)
            if value is None:
                raise ValueError(
                    f"cannot read {field_name} from {type(model).__name__}'s config (looked for {', '.join(names)}); "
                    f"set {field_name}=... in the {type(config).__name__}"
                )
            setattr(config, field_name, value)
    num_kv_heads = getattr(model_config, "num_key_value_heads", None)
    if kv_heads and num_kv_heads is not None:
        head_dim = getattr(model_config, "head_dim", None) or config.token_dim // config.num_attention_heads
        config.token_dim, config.num_attention_heads = head_dim * num_kv_heads, num_kv_heads
    if hasattr(config, "encoder_hidden_size") and config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 2 if config.task_type == TaskType.SEQ_2_SEQ_LM else 1


def input_embeddings(model: nn.Module) -> nn.Module:
    """The model's token embedding table (the prompt is built in its space)."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    if embeddings is None:
        raise ValueError(
            f"{type(model).__name__} has no input embeddings (get_input_embeddings()); prompt methods need one"
        )
    return embeddings


def model_device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters())).device


def prepare_model(model: nn.Module, config: PromptLearningConfig, adapter_name: str, kv_heads: bool = False) -> None:
    """What every prompt method does before building its encoder: check the task, size the config, and give
    `modules_to_save` (PeftModel has added the task's head there, as peft does) a trainable copy."""
    check_num_virtual_tokens(config)
    if config.task_type is None:
        known = ", ".join(t.value for t in TaskType)
        raise ValueError(
            f"{type(config).__name__} needs task_type (one of: {known}): it decides where the virtual tokens go"
        )
    prepare_config(config, model, kv_heads)
    wrap_modules_to_save(model, config.modules_to_save, adapter_name)


# ---- the encoder base class --------------------------------------------------------------------------------


class VirtualTokenEncoder(nn.Module):
    """Base of the three prompt encoders: `embedding` has one row per virtual token, `forward` maps rows to outputs.

    In inference mode (an adapter loaded from a file) the encoder is only `embedding`, holding the stored output
    table, as in peft.
    """

    def __init__(self, num_rows: int, inference_mode: bool) -> None:
        super().__init__()
        self.num_rows = num_rows
        self.inference_mode = inference_mode

    @property
    def table_is_parameter(self) -> bool:
        """Whether the output table is the embedding itself (no network on top), so a file can be trained on."""
        return self.inference_mode

    def table(self) -> torch.Tensor:
        """The output for every virtual token, (num_rows, width); this is what the adapter file stores."""
        if self.inference_mode:
            return self.embedding.weight
        indices = torch.arange(self.num_rows, device=self.embedding.weight.device)
        return self(indices.unsqueeze(0))[0]  # (rows, width)

    def load_table(self, values: torch.Tensor, source: str) -> None:
        """Put a stored table (`prompt_embeddings`) back; only possible when the table is the parameter."""
        if not self.table_is_parameter:
            raise ValueError(
                f"{source}: the file holds the prompt encoder's output (prompt_embeddings), not its "
                f"{type(self).__name__} weights, so training cannot resume from it; load it with "
                "is_trainable=False (as peft requires), or keep training the PeftModel that saved it"
            )
        weight = self.embedding.weight
        if tuple(values.shape) != tuple(weight.shape):
            raise ValueError(
                f"{source}: prompt_embeddings has shape {tuple(values.shape)} but this model's prompt needs "
                f"{tuple(weight.shape)} (num_virtual_tokens x width); the adapter was made for another base model"
            )
        with torch.no_grad():
            weight.copy_(values.to(weight.dtype))


def build_on_device(model: nn.Module, make: Callable[[], nn.Module]) -> nn.Module:
    """Create the encoder directly on the model's device (no CPU copy of a 200M-parameter LSTM for a meta model)."""
    with torch.device(model_device(model)):
        return make()


# ---- rewriting the inputs -------------------------------------------------------------------------------------

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def batch_size(inputs: dict[str, Any]) -> int:
    for key in ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds"):
        if inputs.get(key) is not None:
            return inputs[key].shape[0]
    raise ValueError("give input_ids or inputs_embeds: the virtual tokens are added per row of the batch")


def prepend(values: torch.Tensor | None, n: int, fill: float) -> torch.Tensor | None:
    """`values` (B, T) with n columns of `fill` in front, (B, n + T); masks must be 2-D."""
    if values is None:
        return None
    if values.dim() != 2:
        raise ValueError(
            f"prompt methods extend a 2-D (batch, length) mask or id tensor over the virtual tokens; got shape "
            f"{tuple(values.shape)} (pass the tokenizer's attention_mask, not a 4-D mask)"
        )
    front = torch.full((values.shape[0], n), fill, dtype=values.dtype, device=values.device)
    return torch.cat((front, values), dim=1)


def adjust_ids(inputs: dict[str, Any], task: TaskType, n: int, prefix: bool, warn: bool = True) -> None:
    """position_ids and token_type_ids as peft treats them (see the module docstring). `warn`: say so when the
    caller's ids are dropped (not for the ones `generate` makes itself)."""
    if inputs.get("position_ids") is not None:
        if prefix:
            inputs["position_ids"] = inputs["position_ids"] + n  # real tokens come after the n prefix positions
        else:
            if warn:
                _warn_once("position_ids are not used with prompt tuning / P-tuning (as in peft); ignoring them")
            inputs.pop("position_ids")
    if inputs.get("token_type_ids") is not None:
        if task not in KEEPS_TOKEN_TYPES:
            _warn_once(f"token_type_ids are not used for task_type={task.value} with prompt methods (as in peft)")
            inputs.pop("token_type_ids")
        elif not prefix:
            inputs["token_type_ids"] = prepend(inputs["token_type_ids"], n, 0)


def shift_targets(inputs: dict[str, Any], task: TaskType, n: int) -> None:
    """Targets indexed by position follow the tokens, which now start at n (causal and token labels get -100)."""
    if inputs.get("labels") is not None and task in (TaskType.CAUSAL_LM, TaskType.TOKEN_CLS):
        inputs["labels"] = prepend(inputs["labels"], n, -100)
    if task == TaskType.QUESTION_ANS:
        for key in ("start_positions", "end_positions"):
            if inputs.get(key) is not None:
                inputs[key] = inputs[key] + n


def prompt_table(peft_model: nn.Module, n: int) -> torch.Tensor:
    """The active adapter's first n virtual-token embeddings, (n, d)."""
    return peft_model.prompt_encoder[peft_model.active_adapter].table()[:n]


def refuse_unseen_cache(inputs: dict[str, Any], method: str) -> None:
    """Raise when a call continues a KV cache that is not among its inputs: the mask covers more tokens than the
    call brings, yet no filled Cache was passed. A transformers release that hands the cache over in a new way
    would otherwise end in a shape error deep inside attention."""
    mask, tokens = inputs.get("attention_mask"), inputs.get("input_ids")
    tokens = inputs.get("inputs_embeds") if tokens is None else tokens
    if mask is None or tokens is None or mask.shape[1] <= tokens.shape[1]:
        return
    raise ValueError(
        f"{method}: this step continues a KV cache ({mask.shape[1]} masked positions for {tokens.shape[1]} new "
        f"tokens) that deltatune cannot find among the model's inputs ({', '.join(sorted(inputs))}) under "
        f"transformers {transformers.__version__}; generate with use_cache=False, or install a transformers "
        "release that deltatune supports (see the README's compatibility table)"
    )


def with_prompt_embeddings(peft_model: nn.Module, inputs: dict[str, Any], warn: bool = True) -> dict[str, Any]:
    """Rewrite model inputs for prompt tuning / P-tuning: [prompt ; token embeddings], masks and targets extended.

    A causal LM that continues from a non-empty KV cache already holds the prompt there, so only its attention
    mask is extended; an encoder-decoder whose encoder already ran (`encoder_outputs`) likewise.
    """
    inputs = dict(inputs)
    config = peft_model.active_peft_config
    task, n = config.task_type, config.num_virtual_tokens
    adjust_ids(inputs, task, n, prefix=False, warn=warn)
    continuing = cache_length(passed_cache(inputs)[1]) > 0 and task != TaskType.SEQ_2_SEQ_LM
    if not continuing and inputs.get("encoder_outputs") is None:
        refuse_unseen_cache(inputs, config.peft_type.value)
    inputs["attention_mask"] = prepend(inputs.get("attention_mask"), n, 1)
    if inputs["attention_mask"] is None:
        del inputs["attention_mask"]
    if continuing or inputs.get("encoder_outputs") is not None:
        return inputs
    embeds = inputs.pop("inputs_embeds", None)
    input_ids = inputs.pop("input_ids", None)
    if embeds is None:
        if input_ids is None:
            raise ValueError("give input_ids or inputs_embeds: the prompt is put in front of them")
        embeds = input_embeddings(peft_model.get_base_model())(input_ids)  # (B, T, d)
    prompts = prompt_table(peft_model, n).to(embeds.dtype)  # (n, d)
    inputs["inputs_embeds"] = torch.cat((prompts.expand(embeds.shape[0], -1, -1), embeds), dim=1)  # (B, n+T, d)
    shift_targets(inputs, task, n)
    return inputs


# ---- forward, generate, files (the registry hooks) ----------------------------------------------------------


def prompt_forward(peft_model: nn.Module, **inputs: Any) -> Any:
    """Forward of prompt tuning / P-tuning: the base model on [prompt ; tokens]."""
    model = peft_model.get_base_model()
    if peft_model.base_model.adapters_disabled:
        return model(**inputs)
    return model(**with_prompt_embeddings(peft_model, inputs))


@contextlib.contextmanager
def rewritten_forward(model: nn.Module, rewrite: Callable[[dict[str, Any]], dict[str, Any]]) -> Iterator[None]:
    """Within the block, every call of `model` rewrites its keyword inputs first (how `generate` sees the
    virtual tokens at every step, cache or not). `functools.wraps` keeps the signature generate inspects."""
    had_own = "forward" in model.__dict__
    original = model.forward

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        return original(*args, **rewrite(kwargs))

    model.forward = forward
    try:
        yield
    finally:
        if had_own:
            model.forward = original
        else:
            del model.forward


def generate_inputs(args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """generate(input_ids, ...) or generate(input_ids=...): one keyword dict."""
    if len(args) > 1:
        raise TypeError("generate takes the input ids as its only positional argument; pass the rest by keyword")
    if args:
        kwargs = {**kwargs, "input_ids": args[0]}
    return kwargs


def prompt_generate(peft_model: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    """`generate` with the prompt: encoder-decoders get [prompt ; tokens] as the encoder input once; decoder-only
    models rewrite every step (the prompt goes into the KV cache at the first step, then only masks grow)."""
    model = peft_model.get_base_model()
    kwargs = generate_inputs(args, kwargs)
    if peft_model.base_model.adapters_disabled:
        return model.generate(**kwargs)
    if getattr(model.config, "is_encoder_decoder", False):
        return model.generate(**with_prompt_embeddings(peft_model, kwargs))
    with rewritten_forward(model, lambda inputs: with_prompt_embeddings(peft_model, inputs, warn=False)):
        return model.generate(**kwargs)


def file_tensors(peft_model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's file layout for prompt methods: the encoder's output table as `prompt_embeddings`, and trained
    heads under `base_model.<module>` (peft keeps the transformers model directly at `base_model`)."""
    encoder = peft_model.prompt_encoder[adapter_name]
    was_training = encoder.training
    encoder.eval()  # the stored prompt must not depend on dropout
    try:
        with torch.no_grad():
            table = encoder.table().detach().cpu()
    finally:
        encoder.train(was_training)
    out = {"prompt_embeddings": table}
    out.update({"base_model." + key.removeprefix("base_model.model."): value for key, value in tensors.items()})
    return out


def load_file_tensors(
    peft_model: nn.Module, weights: dict[str, torch.Tensor], adapter_name: str, source: str
) -> dict[str, torch.Tensor]:
    """Inverse of `file_tensors`: load `prompt_embeddings`, return the rest under our internal key prefix."""
    weights = dict(weights)
    if "prompt_embeddings" not in weights:
        raise ValueError(
            f"{source}: no 'prompt_embeddings' tensor; a {peft_model.peft_config[adapter_name].peft_type.value} "
            f"adapter file stores its prompt there (found: {sorted(weights)[:5]})"
        )
    peft_model.prompt_encoder[adapter_name].load_table(weights.pop("prompt_embeddings"), source)
    return {"base_model.model." + k.removeprefix("base_model."): v for k, v in weights.items()}


def refuse_mixed_batch(config: PromptLearningConfig, adapter_names: Sequence[str]) -> None:
    """A prompt goes before the whole batch, so rows cannot each pick their adapter."""
    raise ValueError(
        "adapter_names (one adapter per row) is for layer adapters such as LoRA; a prompt method puts one "
        "prompt before the whole batch: call set_adapter(name) and run each adapter's rows separately"
    )


# Hooks every prompt method registers (see deltatune.core.registry.Method).
PROMPT_HOOKS = dict(one_adapter_at_a_time=True, refuse_rows=refuse_mixed_batch)
# ... and those of the methods that put their prompt among the input embeddings (prompt tuning, P-tuning).
EMBEDDING_HOOKS = dict(
    **PROMPT_HOOKS, forward=prompt_forward, generate=prompt_generate, to_file=file_tensors, from_file=load_file_tensors
)
