"""Tiny random transformers models for the LoRA / BitFit / file / trainer tests, and a peft twin helper.

Every builder seeds torch first, so two calls give the same weights; models are in eval mode (no dropout).
"""

from __future__ import annotations

import copy

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BloomConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Qwen2Config,
    RobertaConfig,
    T5Config,
)

VOCAB = 100
TASKS = {
    "CAUSAL_LM": AutoModelForCausalLM,
    "SEQ_2_SEQ_LM": AutoModelForSeq2SeqLM,
    "SEQ_CLS": AutoModelForSequenceClassification,
}

_DECODER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
)
_ENCODER = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    num_labels=3,
)

CONFIGS = {
    "llama": lambda: LlamaConfig(**_DECODER),
    "mistral": lambda: MistralConfig(**_DECODER),
    "qwen2": lambda: Qwen2Config(**_DECODER),
    "bloom": lambda: BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "opt": lambda: OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=64,
        num_attention_heads=4,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
    ),
    "gpt_neox": lambda: GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    ),
    "t5": lambda: T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
    ),
    "bert": lambda: BertConfig(**_ENCODER),
    "roberta": lambda: RobertaConfig(**{**_ENCODER, "max_position_embeddings": 70}, pad_token_id=1),
}

# The task each architecture is tested under (the issue: t5 as SEQ_2_SEQ_LM, bert as a classifier).
DEFAULT_TASK = {"t5": "SEQ_2_SEQ_LM", "bert": "SEQ_CLS", "roberta": "SEQ_CLS"}


def tiny_model(arch: str, task: str | None = None, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of `arch` for `task` (default: the arch's usual task), in eval mode."""
    task = task or DEFAULT_TASK.get(arch, "CAUSAL_LM")
    config = CONFIGS[arch]()
    config.pad_token_id = getattr(config, "pad_token_id", None) or 0
    torch.manual_seed(seed)
    model = TASKS[task].from_config(config)
    return model.eval()


def tiny_inputs(arch: str, batch: int = 3, length: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random token ids (with a padded row) fitting the model's forward, decoder inputs for t5."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, :2] = 0  # left padding on the last row: masks must be honoured the same way
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if arch == "t5":
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 4), generator=gen)
    return inputs


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
