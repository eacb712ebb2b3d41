"""`transformers.Trainer` whose training loss skips the full logits where that is known to help: on the CPU.

A causal LM's loss normally materialises batch x tokens x vocabulary logits, then their log-softmax and their
gradient: with SmolLM2's 49,152-word vocabulary that is ~100 MB each for 4 x 128 tokens, more than all of
LoRA's activations. `LeanLossTrainer` computes the same loss with `deltatune.ops.lean_causal_lm_loss` (the
lm_head and cross-entropy a chunk of tokens at a time). On the CPU that cut the peak by ~200 MB and the step
time by a few percent (benchmarks/RESULTS.md); on a GPU the smaller launches made the step slower, so there,
and wherever the lean loss would not equal the model's own, it is plain `Trainer.compute_loss`.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from deltatune.core.peft_model import PeftModel
from deltatune.ops.cross_entropy import lean_causal_lm_loss, lean_loss_refusal

LEAN_INPUTS = {"input_ids", "attention_mask", "labels"}


class LeanLossTrainer(Trainer):
    """A Trainer (used like one) that trains with the lean loss when all of these hold, else Trainer's own:

    - the model is a deltatune `PeftModel` with a layer method (LoRA, BitFit, adapters...; not a prompt method,
      not AdaLoRA, whose regulariser lives in the model's forward) over a decoder-only model with a plain head;
    - it runs in one process (a distributed wrapper must see the forward itself) on the CPU, without fp16/bf16
      (accelerate puts their autocast around the model's forward, which the lean loss does not call);
    - the batch holds only input_ids, attention_mask and labels, and no label smoother or custom loss is set.

    The loss is normalised as the model's would be: by the counted tokens, or by Trainer's `num_items_in_batch`
    when it passes one (gradient accumulation).
    """

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        if return_outputs or not self._lean_loss_fits(model, inputs):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        items = num_items_in_batch if self.model_accepts_loss_kwargs else None
        return lean_causal_lm_loss(
            model, inputs["input_ids"], inputs["labels"], inputs.get("attention_mask"), num_items_in_batch=items
        )

    def _lean_loss_fits(self, model: torch.nn.Module, inputs: dict[str, Any]) -> bool:
        if not isinstance(model, PeftModel) or not model.training or self.label_smoother or self.compute_loss_func:
            return False
        if self.args.fp16 or self.args.bf16:
            return False
        if set(inputs) - LEAN_INPUTS or "labels" not in inputs or inputs["input_ids"].device.type != "cpu":
            return False
        return lean_loss_refusal(model) is None
