"""`deltatune chat`: talk to a tuned model (tokens stream as they are generated), or ask one `--prompt`.

`--compare-base` answers each prompt twice, with the adapter switched off and on, so the effect of the
fine-tune is visible side by side. Without `--adapter` the base model answers alone.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from transformers import TextStreamer

from deltatune.cli import data as data_mod
from deltatune.cli.generation import generate
from deltatune.cli.models import load_adapter_model, load_model

HELP = "Type a message and press Enter; /reset starts a new conversation, /quit (or Ctrl-D) leaves."


@dataclass
class Turn:
    """One exchange: the user's message, the tuned (or only) answer, and the base answer if asked."""

    prompt: str
    answer: str
    base_answer: str | None = None


class _Streamer(TextStreamer):
    """TextStreamer writing to a chosen stream (tests pass a StringIO)."""

    def __init__(self, tokenizer: Any, out: TextIO) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()


def load_chat_model(adapter: str | None, model: str | None, cache: str | None) -> tuple[Any, Any, str]:
    """(model, tokenizer, template): the adapter on its base, or the base model alone."""
    if adapter is None:
        loaded = load_model(model, cache)
        return loaded.model, loaded.tokenizer, "auto"
    peft_model, tokenizer, run = load_adapter_model(adapter, model, cache)
    return peft_model, tokenizer, run.get("template", "auto")


def answer(
    model: Any,
    tokenizer: Any,
    history: list[dict[str, str]],
    template: str,
    max_new_tokens: int,
    out: TextIO | None,
    label: str = "",
) -> str:
    """Generate the reply to `history` (streamed to `out` when given)."""
    prompt = data_mod.render_prompt(history, data_mod.resolve_template(template, tokenizer), tokenizer)
    if out is not None and label:
        out.write(label)
    streamer = _Streamer(tokenizer, out) if out is not None else None
    return generate(model, tokenizer, [prompt], max_new_tokens=max_new_tokens, streamer=streamer)[0]


def reply(
    model: Any,
    tokenizer: Any,
    history: list[dict[str, str]],
    template: str,
    max_new_tokens: int,
    compare_base: bool,
    out: TextIO | None,
) -> Turn:
    """One turn; with `compare_base` the base answer (adapter disabled) comes first."""
    base = None
    if compare_base:
        with model.disable_adapter():
            base = answer(model, tokenizer, history, template, max_new_tokens, out, "[base]  ")
    tuned = answer(model, tokenizer, history, template, max_new_tokens, out, "[tuned] " if compare_base else "")
    return Turn(history[-1]["content"], tuned, base)


def chat(
    adapter: str | None = None,
    prompt: str | None = None,
    model: str | None = None,
    compare_base: bool = False,
    max_new_tokens: int = 128,
    template: str | None = None,
    cache_dir: str | None = None,
    input_fn: Callable[[str], str] = input,
    out: TextIO | str | None = "-",
) -> list[Turn]:
    """Answer `prompt` once, or run the interactive loop (reading with `input_fn`) until /quit or EOF.

    Answers stream to `out` ("-": the current sys.stdout; None: nowhere).

    Returns:
        The turns of the session, in order.
    """
    if compare_base and adapter is None:
        raise ValueError("--compare-base needs --adapter (the base model alone has nothing to compare with)")
    if prompt is not None and not prompt.strip():
        raise ValueError("--prompt is empty; give the message to answer, or leave --prompt out to chat interactively")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    out = sys.stdout if out == "-" else out
    chat_model, tokenizer, run_template = load_chat_model(adapter, model, cache_dir)
    template = template or run_template
    if prompt is not None:
        return [
            reply(
                chat_model,
                tokenizer,
                [{"role": "user", "content": prompt}],
                template,
                max_new_tokens,
                compare_base,
                out,
            )
        ]
    if out is not None:
        out.write(HELP + "\n")
    turns: list[Turn] = []
    history: list[dict[str, str]] = []
    while True:
        try:
            text = input_fn(">>> ").strip()
        except EOFError:
            break
        if text in ("/quit", "/exit"):
            break
        if text == "/reset" or not text:
            history = [] if text == "/reset" else history
            continue
        history.append({"role": "user", "content": text})
        turn = reply(chat_model, tokenizer, history, template, max_new_tokens, compare_base, out)
        history.append({"role": "assistant", "content": turn.answer})
        turns.append(turn)
    return turns
