"""`deltatune chat`: talk to a tuned model (tokens stream as they are generated), or ask one `--prompt`.

`--compare-base` answers each prompt twice, with the adapter switched off and on, so the effect of the
fine-tune is visible side by side. Without `--adapter` the base model answers alone.

The conversation is kept within the model's context (`max_position_embeddings`; a model with learned absolute
positions such as GPT-2 cannot read past it): the oldest exchanges are left out once the prompt and
`--max-new-tokens` no longer fit, and a message too long on its own is refused, the session going on.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from transformers import TextStreamer

from deltatune.cli import data as data_mod
from deltatune.cli.generation import GREEDY, Sampling, generate
from deltatune.cli.models import load_adapter_model, load_model

logger = logging.getLogger(__name__)

HELP = (
    "Type a message and press Enter; /reset starts a new conversation, /system TEXT sets the system prompt (and "
    "starts a new conversation; /system alone removes it), /quit (or Ctrl-D) leaves."
)


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


def load_chat_model(
    adapter: str | None, model: str | None, cache: str | None, trust_remote_code: bool = False
) -> tuple[Any, Any, str]:
    """(model, tokenizer, template): the adapter on its base, or the base model alone."""
    if adapter is None:
        loaded = load_model(model, cache, trust_remote_code=trust_remote_code)
        return loaded.model, loaded.tokenizer, "auto"
    peft_model, tokenizer, run = load_adapter_model(adapter, model, cache, trust_remote_code=trust_remote_code)
    return peft_model, tokenizer, run.get("template", "auto")


def render(history: list[dict[str, str]], template: str, tokenizer: Any) -> str:
    """The prompt text for `history`: what the model reads before it answers."""
    return data_mod.render_prompt(history, data_mod.resolve_template(template, tokenizer), tokenizer)


def context_size(model: Any) -> int | None:
    """Tokens the model can read at once, virtual tokens of a prompt method deducted (None: no known limit)."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not isinstance(limit, int):
        return None
    peft_config = getattr(model, "active_peft_config", None)
    return limit - int(getattr(peft_config, "num_virtual_tokens", 0) or 0)


def fit_history(
    history: list[dict[str, str]], template: str, tokenizer: Any, budget: int
) -> tuple[list[dict[str, str]] | None, int]:
    """(the latest exchanges whose prompt fits in `budget` tokens, how many older exchanges were left out);
    (None, n) when even the last message alone does not fit."""
    head = history[:1] if history and history[0]["role"] == "system" else []  # the system prompt always stays
    turns, dropped = history[len(head) :], 0
    while len(tokenizer(render(head + turns, template, tokenizer), add_special_tokens=False)["input_ids"]) > budget:
        if len(turns) < 3:
            return None, dropped
        turns, dropped = turns[2:], dropped + 1  # one user message and its answer
    return head + turns, dropped


def note(out: TextIO | None, text: str) -> None:
    """A line for the person chatting (in the session's stream; logged when there is none)."""
    if out is None:
        logger.warning(text)
    else:
        out.write(f"[{text}]\n")
        out.flush()


def is_text(line: str) -> bool:
    """False for a line that was not UTF-8: stdin decodes such bytes to surrogate escapes ('\\udcff')."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def answer(
    model: Any,
    tokenizer: Any,
    history: list[dict[str, str]],
    template: str,
    max_new_tokens: int,
    out: TextIO | None,
    label: str = "",
    sampling: Sampling = GREEDY,
) -> str:
    """Generate the reply to `history` (streamed to `out` when given)."""
    prompt = render(history, template, tokenizer)
    if out is not None and label:
        out.write(label)
    streamer = _Streamer(tokenizer, out) if out is not None else None
    return generate(model, tokenizer, [prompt], max_new_tokens=max_new_tokens, streamer=streamer, sampling=sampling)[0]


def reply(
    model: Any,
    tokenizer: Any,
    history: list[dict[str, str]],
    template: str,
    max_new_tokens: int,
    compare_base: bool,
    out: TextIO | None,
    sampling: Sampling = GREEDY,
) -> Turn:
    """One turn; with `compare_base` the base answer (adapter disabled) comes first."""
    base = None
    if compare_base:
        with model.disable_adapter():
            base = answer(model, tokenizer, history, template, max_new_tokens, out, "[base]  ", sampling)
    label = "[tuned] " if compare_base else ""
    tuned = answer(model, tokenizer, history, template, max_new_tokens, out, label, sampling)
    return Turn(history[-1]["content"], tuned, base)


@dataclass
class Session:
    """A chat with one model: answers messages, keeping the conversation within the model's context."""

    model: Any
    tokenizer: Any
    template: str
    max_new_tokens: int
    compare_base: bool
    out: TextIO | None
    sampling: Sampling = GREEDY
    system: str | None = None  # the system prompt every conversation starts with

    def __post_init__(self) -> None:
        self.context = context_size(self.model)
        if self.context is not None and self.max_new_tokens >= self.context:
            raise ValueError(
                f"--max-new-tokens {self.max_new_tokens}: the model reads at most {self.context} tokens, prompt "
                "and answer together; give a smaller --max-new-tokens"
            )

    def fit(self, history: list[dict[str, str]]) -> tuple[list[dict[str, str]] | None, int]:
        """`fit_history` within the model's context less the answer's --max-new-tokens."""
        if self.context is None:
            return history, 0
        return fit_history(history, self.template, self.tokenizer, self.context - self.max_new_tokens)

    def too_long(self, what: str) -> str:
        return (
            f"{what} does not fit in the model's context of {self.context} tokens beside the answer's "
            f"--max-new-tokens {self.max_new_tokens}; shorten it, or give a smaller --max-new-tokens"
        )

    def reply(self, history: list[dict[str, str]]) -> Turn:
        return reply(
            self.model,
            self.tokenizer,
            history,
            self.template,
            self.max_new_tokens,
            self.compare_base,
            self.out,
            self.sampling,
        )

    def opening(self) -> list[dict[str, str]]:
        """A new conversation: the system prompt, if there is one."""
        return [{"role": "system", "content": self.system}] if self.system else []

    def answer_prompt(self, prompt: str) -> Turn:
        """The answer to `--prompt`; a prompt that is not text or does not fit is an error."""
        if not is_text(prompt):
            raise ValueError("--prompt is not valid UTF-8 text; give the message as UTF-8")
        history, _ = self.fit([*self.opening(), {"role": "user", "content": prompt}])
        if history is None:
            raise ValueError(self.too_long("--prompt"))
        return self.reply(history)

    def run(self, input_fn: Callable[[str], str]) -> list[Turn]:
        """The interactive loop, until /quit or EOF; a line that cannot be answered is skipped with a note."""
        if self.out is not None:
            self.out.write(HELP + "\n")
        turns: list[Turn] = []
        history = self.opening()
        while (text := self.read(input_fn)) is not None:
            if text == "/reset" or not text:
                history = self.opening() if text == "/reset" else history
                continue
            if text == "/system" or text.startswith("/system "):
                self.system = text.removeprefix("/system").strip() or None
                note(self.out, f"system prompt {'set' if self.system else 'removed'}; a new conversation starts")
                history = self.opening()
                continue
            fitted, dropped = self.fit([*history, {"role": "user", "content": text}])
            if fitted is None:
                note(self.out, self.too_long("that message") + "; it was not sent")
                continue
            if dropped:
                note(self.out, f"the {dropped} oldest exchange(s) left out to fit the model's context")
            turn = self.reply(fitted)
            history = [*fitted, {"role": "assistant", "content": turn.answer}]
            turns.append(turn)
        return turns

    def read(self, input_fn: Callable[[str], str]) -> str | None:
        """The next message (None: /quit or EOF); lines that are not UTF-8 text are skipped with a note."""
        while True:
            try:
                text = input_fn(">>> ").strip()
            except EOFError:
                return None
            except UnicodeDecodeError:  # a strict stdin; the usual one gives surrogate escapes, seen below
                text = "\udcff"
            if is_text(text):
                return None if text in ("/quit", "/exit") else text
            note(self.out, "that line is not valid UTF-8 text; it was skipped (the conversation goes on)")


def chat(
    adapter: str | None = None,
    prompt: str | None = None,
    model: str | None = None,
    compare_base: bool = False,
    max_new_tokens: int = 128,
    template: str | None = None,
    cache_dir: str | None = None,
    trust_remote_code: bool = False,
    input_fn: Callable[[str], str] = input,
    out: TextIO | str | None = "-",
    system: str | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
) -> list[Turn]:
    """Answer `prompt` once, or run the interactive loop (reading with `input_fn`) until /quit or EOF.

    Answers stream to `out` ("-": the current sys.stdout; None: nowhere). The model folder's own code runs
    only with `trust_remote_code`. `system` is the system prompt each conversation starts with; `temperature`
    (0: greedy), `top_p` and `repetition_penalty` choose how tokens are picked (see `Sampling`).

    Returns:
        The turns of the session, in order.
    """
    if compare_base and adapter is None:
        raise ValueError("--compare-base needs --adapter (the base model alone has nothing to compare with)")
    if prompt is not None and not prompt.strip():
        raise ValueError("--prompt is empty; give the message to answer, or leave --prompt out to chat interactively")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    sampling = Sampling(temperature, top_p, repetition_penalty)  # checked before the model loads
    out = sys.stdout if out == "-" else out
    chat_model, tokenizer, run_template = load_chat_model(adapter, model, cache_dir, trust_remote_code)
    session = Session(
        chat_model, tokenizer, template or run_template, max_new_tokens, compare_base, out, sampling, system or None
    )
    if prompt is not None:
        return [session.answer_prompt(prompt)]
    if input_fn is input and hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")  # a line of other bytes is then skipped, not fatal
    return session.run(input_fn)
