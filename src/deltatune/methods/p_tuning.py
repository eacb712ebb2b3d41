"""P-Tuning: a soft prompt produced by a small network (Liu et al., 2021, "GPT Understands, Too", arXiv:2103.10385).

Like prompt tuning the virtual tokens are put before the token embeddings, but each comes out of a prompt
encoder instead of being trained directly, which ties the tokens together and helps training converge:

    MLP:   P = W3 relu(W2 relu(W1 e + b1) + b2) + b3                 e: (n, d) learned input rows
    LSTM:  P = MLP2(BiLSTM(e))                                        BiLSTM: encoder_num_layers layers

    h = model([P ; E(x)])

With the default encoder_hidden_size (the model's hidden size d) the MLP holds n*d + 3(d*d + d) parameters
(12,609,536 on bloom-1b4-zh with n = 10); the LSTM far more (193,030,144). The adapter file stores only P, the
encoder's output (`prompt_embeddings`, (n, d)), as peft does: it is all inference needs, but training cannot
resume from it.
"""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from deltatune.core.config import PeftType, check_range, enum_value
from deltatune.methods.virtual_tokens import PromptLearningConfig, VirtualTokenEncoder, build_on_device, prepare_model


class PromptEncoderReparameterizationType(str, enum.Enum):
    """The network that produces the prompt: a 3-layer MLP (recommended) or a bidirectional LSTM + MLP."""

    MLP = "MLP"
    LSTM = "LSTM"


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-Tuning settings (peft's field names and defaults).

    Attributes:
        encoder_reparameterization_type: MLP (default) or LSTM.
        encoder_hidden_size: hidden width of the prompt encoder; None takes the model's hidden size.
        encoder_num_layers: LSTM layers (the MLP always has 2 hidden layers, 3 linear; other values warn, as in peft).
        encoder_dropout: dropout between LSTM layers.
    """

    encoder_reparameterization_type: PromptEncoderReparameterizationType | str = PromptEncoderReparameterizationType.MLP
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        self.peft_type = PeftType.P_TUNING
        super().__post_init__()
        self.encoder_reparameterization_type = enum_value(
            PromptEncoderReparameterizationType, self.encoder_reparameterization_type, "encoder_reparameterization_type"
        )
        if self.encoder_hidden_size is not None:
            check_range("encoder_hidden_size", self.encoder_hidden_size, 1, None, "use a positive width or None")
        check_range("encoder_num_layers", self.encoder_num_layers, 1, None, "use at least one layer")
        check_range("encoder_dropout", self.encoder_dropout, 0.0, 1.0, "use a probability such as 0.1")


class PromptEncoder(VirtualTokenEncoder):
    """Virtual-token indices (B, n) -> prompt embeddings (B, n, d) through an MLP or a BiLSTM + MLP."""

    def __init__(self, config: PromptEncoderConfig) -> None:
        rows = config.num_virtual_tokens * config.num_transformer_submodules
        super().__init__(rows, config.inference_mode)
        d, hidden = config.token_dim, config.encoder_hidden_size
        self.encoder_type = config.encoder_reparameterization_type
        self.embedding = nn.Embedding(rows, d)
        if config.inference_mode:  # only the stored output table is needed
            return
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            self.lstm_head = nn.LSTM(
                input_size=d,
                hidden_size=hidden,
                num_layers=config.encoder_num_layers,
                dropout=config.encoder_dropout,
                bidirectional=True,
                batch_first=True,
            )
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, d))
            return
        if config.encoder_num_layers != 2:  # peft's words, which its tests compare: "2 MLP layers" = 2 hidden layers
            warnings.warn(
                "for MLP, the argument `encoder_num_layers` is ignored. Exactly 2 MLP layers are used.", stacklevel=2
            )
        self.mlp_head = nn.Sequential(
            nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, d)
        )

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        inputs = self.embedding(indices)  # (B, n, d)
        if self.inference_mode:
            return inputs
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            inputs = self.lstm_head(inputs)[0]  # (B, n, 2*hidden)
        return self.mlp_head(inputs)  # (B, n, d)


def add_p_tuning(model: nn.Module, config: PromptEncoderConfig, adapter_name: str) -> PromptEncoder:
    """Size the config from the model (encoder_hidden_size defaults to its hidden size) and build the encoder."""
    prepare_model(model, config, adapter_name)
    return build_on_device(model, lambda: PromptEncoder(config))
