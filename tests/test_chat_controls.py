"""Chat controls: the system prompt (--system, /system), sampling options reaching generate, and the count of
answers a model ends itself with its end-of-turn token (reported by eval)."""

import io

import pytest
import torch
from helpers.chat_model import make_tokenizer
from transformers import GenerationMixin

from deltatune.cli import chat
from deltatune.cli.cmd_chat import fit_history, render
from deltatune.cli.generation import Sampling, generate_answers
from deltatune.core.peft_model import PeftModel


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"temperature": -0.1}, "--temperature -0.1: must be 0 (greedy) or more"),
        ({"temperature": float("nan")}, "--temperature nan: must be 0 (greedy) or more"),
        ({"top_p": 0.0}, "--top-p 0.0: must be above 0 and at most 1"),
        ({"top_p": 1.5}, "--top-p 1.5: must be above 0 and at most 1"),
        ({"repetition_penalty": 0.0}, "--repetition-penalty 0.0: must be above 0 (1: off)"),
    ],
)
def test_sampling_options_out_of_range_are_refused_by_flag(options, message):
    with pytest.raises(ValueError) as raised:
        Sampling(**options)
    assert str(raised.value) == message


def test_sampling_turns_into_generate_arguments():
    assert Sampling().generate_kwargs() == {"do_sample": False, "repetition_penalty": 1.0}
    assert Sampling(0.7, 0.9, 1.2).generate_kwargs() == {
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.9,
        "repetition_penalty": 1.2,
    }


@pytest.fixture
def captured(monkeypatch):
    """Every generate call's keyword arguments (the prompt's ids included), through to the real generate."""
    calls = []
    real = GenerationMixin.generate

    def recording(self, *args, **kwargs):
        calls.append(kwargs)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", recording)
    return calls


def prompt_text(call: dict) -> str:
    return make_tokenizer().decode(call["input_ids"][0], skip_special_tokens=False)


def test_chat_sends_system_prompt_and_sampling_options(tiny, captured):
    torch.manual_seed(0)
    chat(model=tiny, prompt="hello", system="Answer in one word.", temperature=0.7, top_p=0.9,
         repetition_penalty=1.2, max_new_tokens=3, out=None)  # fmt: skip
    (call,) = captured
    assert call["do_sample"] is True and (call["temperature"], call["top_p"]) == (0.7, 0.9)
    assert call["repetition_penalty"] == 1.2
    text = prompt_text(call)
    assert "Answer in one word." in text and text.index("Answer in one word.") < text.index("hello")


def test_system_command_sets_the_prompt_and_starts_a_new_conversation(tiny, captured):
    lines = iter(["first message", "/system Be brief.", "second message", "/system", "third message", "/quit"])
    out = io.StringIO()
    turns = chat(model=tiny, input_fn=lambda _: next(lines), max_new_tokens=2, out=out)
    assert len(turns) == 3
    first, second, third = (prompt_text(call) for call in captured)
    assert "Be brief." not in first
    assert "Be brief." in second and "first message" not in second  # a new conversation with the system prompt
    assert "Be brief." not in third and "second message" not in third
    assert "[system prompt set; a new conversation starts]" in out.getvalue()
    assert "[system prompt removed; a new conversation starts]" in out.getvalue()


def test_fitting_the_context_drops_old_turns_but_keeps_the_system_prompt():
    tokenizer = make_tokenizer()
    system = {"role": "system", "content": "hello"}
    turns = [{"role": r, "content": "hello world " * 3} for r in ("user", "assistant") * 3]
    turns.append({"role": "user", "content": "hello"})
    kept = [system, *turns[-3:]]  # the system prompt and the last exchange before the new message
    budget = len(tokenizer(render(kept, "chat", tokenizer), add_special_tokens=False)["input_ids"])
    assert fit_history([system, *turns], "chat", tokenizer, budget) == (kept, 2)


class ScriptedModel(torch.nn.Module):
    """A stand-in whose generate appends fixed tokens to each prompt: what `generate_answers` reads back."""

    def __init__(self, continuations: list[list[int]]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.continuations = continuations

    def generate(self, input_ids, **kwargs):
        return torch.cat([input_ids, torch.tensor(self.continuations)], dim=1)


def test_answers_record_whether_the_model_ended_them():
    tokenizer = make_tokenizer()
    eos, pad, word = tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids("h")
    model = ScriptedModel([[word, eos, pad], [word, word, word]])
    answers = generate_answers(model, tokenizer, ["hello", "hello"], max_new_tokens=3)
    assert [a.ended for a in answers] == [True, False]
    assert [a.text for a in answers] == ["h", "hhh"]


def test_eval_reports_answers_ended_with_the_end_of_turn_token(tiny, tmp_path, run_options):
    from deltatune.cli import evaluate, train
    from deltatune.cli.cmd_eval import report

    train(run_options(tiny, tmp_path / "run", method="lora"))
    result = evaluate(adapter=str(tmp_path / "run"), compare_base=True, write=False)
    assert 0 <= result.ended <= result.examples and result.base_ended is not None
    lines = report(result).splitlines()
    assert lines[1].endswith(f"| ended with end-of-turn {result.ended}/{result.examples}")
    assert lines[2].endswith(f"| ended with end-of-turn {result.base_ended}/{result.examples}")


def test_peft_model_is_what_chat_generates_with(tiny, tmp_path, run_options, captured):
    from deltatune.cli import train

    train(run_options(tiny, tmp_path / "run", method="lora"))
    seen = []
    original = PeftModel.generate

    def spy(self, *args, **kwargs):
        seen.append(type(self))
        return original(self, *args, **kwargs)

    PeftModel.generate = spy
    try:
        chat(adapter=str(tmp_path / "run"), prompt="hello", temperature=0.5, max_new_tokens=2, out=None)
    finally:
        PeftModel.generate = original
    assert seen and captured[-1]["temperature"] == 0.5
