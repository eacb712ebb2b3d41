"""Scoring and answering: eval loss over response tokens, batched answers (greedy or sampled), exact-match."""

from __future__ import annotations

import math
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy at temperature 0 (the default), else sampled.

    Attributes:
        temperature: 0 picks the most likely token; above 0 samples, higher is more varied (0.7 is common).
        top_p: sample only from the most likely tokens whose probabilities add up to top_p (nucleus sampling).
        repetition_penalty: above 1 makes tokens already in the text less likely (1.1-1.3 curbs loops).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        checks = (
            ("--temperature", self.temperature, self.temperature >= 0, "0 (greedy) or more"),
            ("--top-p", self.top_p, 0 < self.top_p <= 1, "above 0 and at most 1"),
            ("--repetition-penalty", self.repetition_penalty, self.repetition_penalty > 0, "above 0 (1: off)"),
        )
        for flag, value, ok, allowed in checks:
            if not (ok and math.isfinite(value)):
                raise ValueError(f"{flag} {value}: must be {allowed}")

    def generate_kwargs(self) -> dict[str, Any]:
        """The arguments of `model.generate` for this choice."""
        kwargs: dict[str, Any] = {"repetition_penalty": self.repetition_penalty}
        if self.temperature == 0:
            return {**kwargs, "do_sample": False}
        return {**kwargs, "do_sample": True, "temperature": self.temperature, "top_p": self.top_p}


GREEDY = Sampling()


@dataclass(frozen=True)
class Answer:
    """A generated answer and whether the model ended it itself (an end-of-turn token before the token limit)."""

    text: str
    ended: bool


def end_of_turn_ids(model: Any, tokenizer: Any) -> set[int]:
    """The tokens that end a turn: the tokenizer's EOS and the model's generation-config EOS (one or a list)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured] if configured is not None else [])
    return ids


@torch.no_grad()
def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int = 128,
    batch_size: int = 8,
    streamer: Any = None,
    progress: bool = False,
    sampling: Sampling = GREEDY,
) -> list[Answer]:
    """Answers to rendered prompts (left-padded batches); special tokens are dropped from the text."""
    model.eval()
    device = model_device(model)
    stops = end_of_turn_ids(model, tokenizer)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    answers: list[Answer] = []
    try:
        starts = range(0, len(prompts), batch_size)
        for start in tqdm(starts, desc="generating", disable=not progress or len(prompts) <= batch_size):
            batch = tokenizer(
                prompts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(device)
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                streamer=streamer,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=sorted(stops) or None,
                **sampling.generate_kwargs(),
            )
            new_tokens = out[:, batch["input_ids"].shape[1] :]  # (B, new): generate returns prompt + answer
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for text, tokens in zip(texts, new_tokens.tolist(), strict=True):
                answers.append(Answer(text.strip(), any(token in stops for token in tokens)))
    finally:
        tokenizer.padding_side = side
    return answers


def generate(model: Any, tokenizer: Any, prompts: list[str], **options: Any) -> list[str]:
    """The texts of `generate_answers` (same arguments)."""
    return [answer.text for answer in generate_answers(model, tokenizer, prompts, **options)]


def exact_match(answers: list[str], references: list[str]) -> float:
    """Fraction of answers equal to their reference (both stripped of surrounding whitespace)."""
    if not references:
        return 0.0
    return sum(a.strip() == r.strip() for a, r in zip(answers, references, strict=True)) / len(references)
