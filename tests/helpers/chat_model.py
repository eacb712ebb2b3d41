"""A tiny random Llama chat model with a small BPE tokenizer, built offline for the command-line tests."""

from __future__ import annotations

import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from helpers.models import tiny_model

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def _corpus() -> list[str]:
    from deltatune.cli.data import BUNDLED_EVAL, BUNDLED_TRAIN, bundled_path

    lines = ["Human: Assistant: user assistant system hello world 0123456789 -"]
    for name in (BUNDLED_TRAIN, BUNDLED_EVAL):
        with open(bundled_path(name), encoding="utf-8") as handle:
            lines += [" ".join(json.loads(line).values()) for line in handle]
    return lines


def make_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes) trained in memory on the sample set."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_corpus(), trainer)
    eos = "<|im_end|>" if chat_template else "</s>"
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token=eos, pad_token="<pad>")
    if chat_template:
        wrapped.chat_template = CHATML
    return wrapped


def make_tiny_model(folder: str, chat_template: bool = True, seed: int = 0, hidden_size: int = 32) -> str:
    """Save a tiny random Llama (attention biases on, so BitFit has something to train) and its tokenizer."""
    tokenizer = make_tokenizer(chat_template)
    model = tiny_model(
        "llama",
        seed=seed,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        vocab_size=len(tokenizer),
        attention_bias=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=512,
    )
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
