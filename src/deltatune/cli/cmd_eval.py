"""`deltatune eval`: eval loss, perplexity and exact-match of a tuned model on held-out data.

The held-out data defaults to the run's `--eval-data`, or the bundled held-out split when the run used the
bundled sample set. Exact-match compares the greedy answer with the reference output (whitespace-stripped).
`ended` counts the answers the model finished with its end-of-turn token: a tuned chat model that never stops
(it runs to the token limit) is the most common failure of fine-tuned chatbots.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from typing import Any

from deltatune.cli import data as data_mod
from deltatune.cli.generation import eval_loss, exact_match, generate_answers, perplexity
from deltatune.cli.models import load_adapter_model, load_model, resolve_precision
from deltatune.core.files import atomic_write_text

logger = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """Scores on `examples` held-out rows (base_* only with compare_base)."""

    data: str
    examples: int
    eval_loss: float
    perplexity: float
    exact_match: float
    ended: int = 0  # answers the model ended itself with its end-of-turn token (the rest ran to the token limit)
    base_eval_loss: float | None = None
    base_exact_match: float | None = None
    base_ended: int | None = None
    answers: list[str] | None = None


def held_out_source(data: str | None, run: dict[str, Any]) -> str:
    if data:
        return data
    if run.get("eval_data"):
        return run["eval_data"]
    if run and run.get("data"):
        raise ValueError("--data: the run was trained on its own data and has no --eval-data; pass the held-out file")
    return data_mod.bundled_path(data_mod.BUNDLED_EVAL)


def score(
    model: Any,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    template: str,
    max_length: int,
    batch_size: int,
    source: str,
    train_on: str = "all",
) -> tuple[float, float, list[str], int]:
    """(eval loss, exact-match, answers, answers ended with the end-of-turn token) of `model` on checked rows;
    the loss counts the assistant turns the run trained on (`train_on`)."""
    examples = data_mod.tokenize_rows(rows, tokenizer, template, max_length, source, train_on=train_on)
    loss = eval_loss(model, examples, tokenizer.pad_token_id, batch_size)
    pairs = data_mod.prompts_and_answers(rows, tokenizer, template)
    longest = max(len(tokenizer(ref, add_special_tokens=False)["input_ids"]) for _, ref in pairs)
    generated = generate_answers(
        model,
        tokenizer,
        [p for p, _ in pairs],
        max_new_tokens=min(longest + 8, 512),
        batch_size=batch_size,
        progress=True,
    )
    answers = [answer.text for answer in generated]
    ended = sum(answer.ended for answer in generated)
    return loss, exact_match(answers, [ref for _, ref in pairs]), answers, ended


def evaluate(
    adapter: str | None = None,
    data: str | None = None,
    model: str | None = None,
    compare_base: bool = False,
    batch_size: int = 16,
    cache_dir: str | None = None,
    write: bool = True,
    trust_remote_code: bool = False,
    dtype: str = "auto",
    device: str = "auto",
) -> EvalResult:
    """Score the adapter in `adapter` (or the base model when None) on held-out data.

    With `write`, the scores are also saved as `eval.json` in the adapter folder. The base model's own code
    runs only with `trust_remote_code`. `dtype` / `device`: `--dtype` / `--device` (see `deltatune.cli.precision`).
    """
    if compare_base and adapter is None:
        raise ValueError("--compare-base needs --adapter (the base model alone has nothing to compare with)")
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: must be at least 1")
    if adapter is None:
        precision = resolve_precision(model, cache_dir, dtype, device, trust_remote_code)
        loaded = load_model(
            model, cache_dir, device=precision.device, trust_remote_code=trust_remote_code, dtype=precision.dtype
        )
        scored_model, tokenizer, run = loaded.model, loaded.tokenizer, {}
    else:
        scored_model, tokenizer, run = load_adapter_model(
            adapter, model, cache_dir, trust_remote_code=trust_remote_code, dtype=dtype, device=device
        )
    source = held_out_source(data, run)
    # the run's --columns name the columns of its own files (its held-out file), not of other data
    columns = run.get("columns") if source == run.get("eval_data") else None
    rows = data_mod.load_rows(source, flag="--data", columns=columns)
    template, max_length = run.get("template", "auto"), int(run.get("max_length") or 1024)
    setting = (template, max_length, batch_size, source, run.get("train_on", "all"))
    loss, em, answers, ended = score(scored_model, tokenizer, rows, *setting)
    result = EvalResult(source, len(rows), loss, perplexity(loss), em, ended, answers=answers)
    if compare_base and adapter is not None:
        with scored_model.disable_adapter():
            result.base_eval_loss, result.base_exact_match, _, result.base_ended = score(
                scored_model, tokenizer, rows, *setting
            )
    if write and adapter is not None:
        save_scores(result, adapter)
    return result


def save_scores(result: EvalResult, adapter: str) -> str:
    """Write the scores as `eval.json` in the adapter folder; a folder that cannot take it is named in the error."""
    path = os.path.join(adapter, "eval.json")
    try:
        atomic_write_text(
            path, json.dumps({k: v for k, v in asdict(result).items() if k != "answers"}, indent=2) + "\n"
        )
    except OSError as err:
        raise OSError(
            err.errno, f"the scores could not be written to {path} ({err.strerror or err}); they are printed above"
        ) from None
    return path


def report(result: EvalResult) -> str:
    """The scores as a few readable lines."""
    lines = [
        f"held-out data: {result.data} ({result.examples} rows)",
        f"eval loss {result.eval_loss:.4f} | perplexity {result.perplexity:.3f} | exact-match {result.exact_match:.1%} "
        f"| ended with end-of-turn {result.ended}/{result.examples}",
    ]
    if result.base_eval_loss is not None:
        lines.append(
            f"base model: eval loss {result.base_eval_loss:.4f} | perplexity {perplexity(result.base_eval_loss):.3f} "
            f"| exact-match {result.base_exact_match:.1%} "
            f"| ended with end-of-turn {result.base_ended}/{result.examples}"
        )
    return "\n".join(lines)
