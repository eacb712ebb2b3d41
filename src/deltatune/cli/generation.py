"""Scoring and answering: eval loss over response tokens, batched greedy answers, exact-match."""

from __future__ import annotations

import math
from typing import Any

import torch
from tqdm.auto import tqdm

from deltatune.cli.data import IGNORE_INDEX, Collator


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def eval_loss(
    model: torch.nn.Module, examples: list[dict[str, list[int]]], pad_token_id: int, batch_size: int = 8
) -> float:
    """Mean cross-entropy per response token over all examples (each token counts once, whatever its batch)."""
    model.eval()
    collate = Collator(pad_token_id)
    device = model_device(model)
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size]).items()}
        labels = batch.pop("labels")  # (B, T)
        logits = model(**batch).logits[:, -labels.shape[1] :]  # (B, T, V); prompt methods may prepend tokens
        shifted = labels[:, 1:]  # token t is predicted at position t-1
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            shifted.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        total += float(losses)
        count += int((shifted != IGNORE_INDEX).sum())
    return total / max(count, 1)


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int = 128,
    batch_size: int = 8,
    streamer: Any = None,
    progress: bool = False,
) -> list[str]:
    """Greedy answers to rendered prompts (left-padded batches); special tokens are dropped from the text."""
    model.eval()
    device = model_device(model)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    answers: list[str] = []
    try:
        starts = range(0, len(prompts), batch_size)
        for start in tqdm(starts, desc="generating", disable=not progress or len(prompts) <= batch_size):
            batch = tokenizer(
                prompts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(device)
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                streamer=streamer,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new_tokens = out[:, batch["input_ids"].shape[1] :]  # (B, new): generate returns prompt + answer
            answers += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
    return answers


def exact_match(answers: list[str], references: list[str]) -> float:
    """Fraction of answers equal to their reference (both stripped of surrounding whitespace)."""
    if not references:
        return 0.0
    return sum(a.strip() == r.strip() for a, r in zip(answers, references, strict=True)) / len(references)
