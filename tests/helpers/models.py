"""Tiny random transformers models: one config per architecture, every size changeable by keyword.

`tiny_config("llama")` is the llama every test starts from; a test that needs another shape says so by name,
`tiny_config("llama", hidden_size=64, num_hidden_layers=1)`. `tiny_model` seeds torch before building, so two
calls give the same weights, and returns the model in eval mode (no dropout).
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertConfig,
    BloomConfig,
    DistilBertConfig,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PretrainedConfig,
    Qwen2Config,
    RobertaConfig,
    T5Config,
)

VOCAB = 100

# Grouped-query attention (4 query heads, 2 key/value heads) so head-count bugs show.
_DECODER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    pad_token_id=0,
)
_ENCODER = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    num_labels=3,
    pad_token_id=0,
)

# (config class, its tiny defaults); a pad token everywhere so padded batches and classifier heads work.
ARCHITECTURES: dict[str, tuple[type[PretrainedConfig], dict]] = {
    "llama": (LlamaConfig, _DECODER),
    "mistral": (MistralConfig, _DECODER),
    "qwen2": (Qwen2Config, _DECODER),
    "bloom": (BloomConfig, dict(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, pad_token_id=0)),
    "gpt2": (GPT2Config, dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0)),
    "opt": (
        OPTConfig,  # keeps OPT's own pad id, 1
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            ffn_dim=64,
            num_attention_heads=4,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
        ),
    ),
    "gpt_neox": (
        GPTNeoXConfig,
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            pad_token_id=0,
        ),
    ),
    "t5": (
        T5Config,
        dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0),
    ),
    "bert": (BertConfig, _ENCODER),
    "roberta": (RobertaConfig, {**_ENCODER, "max_position_embeddings": 70, "pad_token_id": 1}),
    "distilbert": (DistilBertConfig, dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64)),
    "gemma3": (Gemma3TextConfig, {**_DECODER, "head_dim": 8}),
}
# The architectures the method tests run over (distilbert and gemma3 are there for one test each).
COMMON_ARCHS = ["llama", "mistral", "qwen2", "bloom", "gpt2", "opt", "gpt_neox", "t5", "bert", "roberta"]

# The task each architecture is tested under when a test names none: t5 translates, the encoders classify.
DEFAULT_TASK = {"t5": "SEQ_2_SEQ_LM", "bert": "SEQ_CLS", "roberta": "SEQ_CLS", "distilbert": "SEQ_CLS"}
TASKS = {
    "CAUSAL_LM": AutoModelForCausalLM,
    "SEQ_2_SEQ_LM": AutoModelForSeq2SeqLM,
    "SEQ_CLS": AutoModelForSequenceClassification,
    "TOKEN_CLS": AutoModelForTokenClassification,
    "QUESTION_ANS": AutoModelForQuestionAnswering,
    "FEATURE_EXTRACTION": AutoModel,
}

# Full-size configs, built on the meta device to count parameters as the papers and peft's docs print them.
FULL_SIZE = {
    "bloom-1b4-zh": (BloomConfig, dict(vocab_size=46145, hidden_size=2048, n_layer=24, n_head=16)),
    "llama-7b": (
        LlamaConfig,
        dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000),
    ),
}


def tiny_config(arch: str, **overrides) -> PretrainedConfig:
    """The tiny config of `arch`, with `overrides` (any config field) in place of the defaults."""
    config_class, defaults = ARCHITECTURES[arch]
    return config_class(**{**defaults, **overrides})


def tiny_model(arch: str, task: str | None = None, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random `arch` model for `task` (default: the arch's usual task), seeded, in eval mode.

    Args:
        arch: a key of `ARCHITECTURES`.
        task: a key of `TASKS`; question answering gets two labels (start and end) unless overridden.
        seed: the torch seed the weights are drawn with.
        **overrides: config fields that differ from the tiny defaults.
    """
    task = task or DEFAULT_TASK.get(arch, "CAUSAL_LM")
    if task == "QUESTION_ANS":
        overrides = {"num_labels": 2, **overrides}
    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    return TASKS[task].from_config(config).eval()


def full_size_on_meta(name: str) -> torch.nn.Module:
    """The causal LM `name` (a key of `FULL_SIZE`) on the meta device: real shapes, no memory."""
    config_class, fields = FULL_SIZE[name]
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config_class(**fields))


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
