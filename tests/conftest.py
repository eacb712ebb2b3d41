"""Shared fixtures: tiny random models built from configs (no network); the CLI tests' tiny chat model and runs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported, which reads them once
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
from helpers.chat_model import make_tiny_model, make_tokenizer  # noqa: E402

from deltatune.cli.data import BUNDLED_EVAL, bundled_path  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def chat_tok():
    """The tiny chat model's tokenizer, with a chat template."""
    return make_tokenizer(chat_template=True)


@pytest.fixture(scope="module")
def plain_tok():
    """The same tokenizer without a chat template (prompts use the human-assistant template)."""
    return make_tokenizer(chat_template=False)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> str:
    """The first 8 rows of the bundled held-out split (generation on all 60 is slow for a unit test)."""
    path = tmp_path_factory.mktemp("data") / "held_out.jsonl"
    with open(bundled_path(BUNDLED_EVAL), encoding="utf-8") as handle:
        path.write_text("".join(handle.readlines()[:8]), encoding="utf-8")
    return str(path)


@pytest.fixture
def run_options(tiny, held_out):
    def make(model: str, out, **extra) -> dict:
        values = dict(
            model=model,
            output=str(out),
            max_steps=4,
            batch_size=4,
            logging_steps=1,
            save_steps=2,
            lr=1e-2,
            eval_data=held_out,
        )
        return {**values, **extra}

    return make
