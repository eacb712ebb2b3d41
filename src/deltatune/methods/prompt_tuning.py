"""Prompt Tuning: a learned soft prompt in front of the input (Lester et al., 2021, arXiv:2104.08691).

n learned vectors P (n, d) are put before the token embeddings and the frozen model runs on the longer sequence:

    h = model([P ; E(x)])

Only P trains: n x d values (7 x 2048 = 14,336 on bloom-1b4-zh with the tutorials' 7-token text). The prompt can
start at random (`PromptTuningInit.RANDOM`, a "soft" prompt), from the embeddings of a text (`TEXT`, the tutorials'
"hard" prompt, e.g. "下面是一段人与机器人的对话。"), or from random vocabulary rows (`SAMPLE_VOCAB`).
Encoder-decoders keep a second set of n rows, as peft does (only the first n enter the encoder).

TEXT init follows peft's rule: the text's token ids (special tokens included) are cut to n when longer (with a
warning here) and repeated to fill n when shorter.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deltatune.core.config import PeftType, enum_value
from deltatune.methods.virtual_tokens import (
    PromptLearningConfig,
    VirtualTokenEncoder,
    build_on_device,
    input_embeddings,
    prepare_model,
)

logger = logging.getLogger(__name__)


class PromptTuningInit(str, enum.Enum):
    """How the prompt starts: from a text's embeddings, from random vocabulary rows, or at random."""

    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt Tuning settings (peft's field names and defaults).

    Attributes:
        prompt_tuning_init: RANDOM (default), TEXT or SAMPLE_VOCAB.
        prompt_tuning_init_text: the text whose embeddings start the prompt (TEXT only).
        tokenizer_name_or_path: the tokenizer for that text: a name/path for `AutoTokenizer.from_pretrained`,
            or a tokenizer object (written to the file as its `name_or_path`).
        tokenizer_kwargs: extra arguments for `AutoTokenizer.from_pretrained` (TEXT only).
    """

    prompt_tuning_init: PromptTuningInit | str = PromptTuningInit.RANDOM
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: Any = None
    tokenizer_kwargs: dict | None = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.PROMPT_TUNING
        super().__post_init__()
        self.prompt_tuning_init = enum_value(PromptTuningInit, self.prompt_tuning_init, "prompt_tuning_init")
        text_init = self.prompt_tuning_init == PromptTuningInit.TEXT
        # The first words of both errors are peft's, which its tests match.
        if text_init and self.tokenizer_name_or_path in (None, ""):
            raise ValueError(
                f"When prompt_tuning_init='TEXT', tokenizer_name_or_path can't be {self.tokenizer_name_or_path!r}: "
                "a tokenizer turns prompt_tuning_init_text into token ids; pass tokenizer_name_or_path='<model name "
                "or folder>' or tokenizer_name_or_path=<tokenizer object>"
            )
        if text_init and not self.prompt_tuning_init_text:
            raise ValueError(
                f"When prompt_tuning_init='TEXT', prompt_tuning_init_text can't be {self.prompt_tuning_init_text!r}: "
                "give the text whose token embeddings start the prompt"
            )
        if self.tokenizer_kwargs and not text_init:
            raise ValueError("tokenizer_kwargs is only used with prompt_tuning_init=TEXT; remove it or use TEXT")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        tokenizer = self.tokenizer_name_or_path
        if tokenizer is not None and not isinstance(tokenizer, str):
            # A tokenizer object is written by name; peft needs a non-empty name here to read a TEXT config.
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            out["tokenizer_name_or_path"] = name
        return out


class PromptEmbedding(VirtualTokenEncoder):
    """The soft prompt: virtual-token indices (B, n) -> embeddings (B, n, d)."""

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Module) -> None:
        rows = config.num_virtual_tokens * config.num_transformer_submodules
        super().__init__(rows, config.inference_mode)
        self.embedding = nn.Embedding(rows, config.token_dim)
        if config.inference_mode:  # the weights come from a file
            return
        if config.prompt_tuning_init == PromptTuningInit.TEXT:
            self._start_from(word_embeddings, text_token_ids(config, rows))
        elif config.prompt_tuning_init == PromptTuningInit.SAMPLE_VOCAB:
            self._start_from(word_embeddings, torch.randint(0, word_embeddings.num_embeddings, (rows,)).tolist())

    @property
    def table_is_parameter(self) -> bool:
        return True  # the prompt is the embedding itself, so a saved file can be trained further

    def _start_from(self, word_embeddings: nn.Module, token_ids: list[int]) -> None:
        ids = torch.tensor(token_ids, dtype=torch.long, device=word_embeddings.weight.device)
        with torch.no_grad():
            start = word_embeddings(ids).detach().clone().float()  # (rows, d), fp32 as in peft
        self.embedding.weight = nn.Parameter(start)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices)  # (B, n, d)


def load_tokenizer(config: PromptTuningConfig) -> Any:
    """The tokenizer object of the config, loading it by name if needed."""
    tokenizer = config.tokenizer_name_or_path
    if not isinstance(tokenizer, str):
        return tokenizer
    from transformers import AutoTokenizer

    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs["trust_remote_code"] = False  # never run code from a tokenizer repo (nor ask whether to), as in peft
    try:
        return AutoTokenizer.from_pretrained(tokenizer, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"tokenizer_name_or_path={tokenizer!r} could not be loaded ({err}); give a local folder, or pass the "
            "tokenizer object itself as tokenizer_name_or_path"
        ) from None


def text_token_ids(config: PromptTuningConfig, rows: int) -> list[int]:
    """The init text's token ids, cut or repeated to `rows` (peft's rule)."""
    ids = list(load_tokenizer(config)(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ValueError(f"prompt_tuning_init_text={config.prompt_tuning_init_text!r} gives no tokens")
    if len(ids) > rows:
        logger.warning(
            "prompt_tuning_init_text has %d tokens but the prompt has %d rows (num_virtual_tokens=%d); using the "
            "first %d tokens, as peft does (set num_virtual_tokens=len(tokenizer(text)['input_ids']) to use all)",
            len(ids),
            rows,
            config.num_virtual_tokens,
            rows,
        )
    return (ids * math.ceil(rows / len(ids)))[:rows]


def add_prompt_tuning(model: nn.Module, config: PromptTuningConfig, adapter_name: str) -> PromptEmbedding:
    """Size the config from the model and build the soft prompt next to it (the model itself is not changed)."""
    prepare_model(model, config, adapter_name)
    word_embeddings = input_embeddings(model)
    return build_on_device(model, lambda: PromptEmbedding(config, word_embeddings))


@contextlib.contextmanager
def random_start_while_loading(config: Any) -> Iterator[None]:
    """Within the block a prompt is built with random start values: the file's weights replace them anyway, and a
    TEXT start would load the tokenizer the config names (often a hub id, unreachable offline). Other methods'
    configs pass through unchanged."""
    start = getattr(config, "prompt_tuning_init", None)
    if start is None:
        yield
        return
    config.prompt_tuning_init = PromptTuningInit.RANDOM
    try:
        yield
    finally:
        config.prompt_tuning_init = start
