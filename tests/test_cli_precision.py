"""`--dtype` and `--device` for chat, eval and merge: the base loads as asked (adapter weights in fp32), the choice
is logged, and a device that is not there is refused before anything loads."""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from deltatune.cli import chat, evaluate, merge, train
from deltatune.cli.cmd_chat import load_chat_model


@pytest.fixture(scope="module")
def run_folder(tiny, tmp_path_factory, held_out):
    out = tmp_path_factory.mktemp("precision") / "run"
    train(dict(model=tiny, max_steps=2, batch_size=4, eval_data=held_out, output=str(out)))
    return str(out)


def test_chat_model_loads_in_the_dtype_asked_with_fp32_adapters(run_folder, caplog):
    with caplog.at_level(logging.INFO, logger="deltatune.cli.precision"):
        model, _, _ = load_chat_model(run_folder, None, None, dtype="bf16", device="cpu")
    base = model.get_base_model()
    assert base.model.embed_tokens.weight.dtype == torch.bfloat16
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    assert adapters and all(p.dtype == torch.float32 for p in adapters)
    assert "device cpu, base model in bf16 (--dtype bf16); adapter weights in fp32" in caplog.text


def test_chat_and_eval_run_on_a_bf16_base(run_folder):
    (turn,) = chat(adapter=run_folder, prompt="hello", max_new_tokens=2, dtype="bf16", device="cpu", out=None)
    assert isinstance(turn.answer, str)
    result = evaluate(adapter=run_folder, dtype="bf16", device="cpu", write=False)
    fp32 = evaluate(adapter=run_folder, dtype="fp32", device="cpu", write=False)
    assert result.eval_loss == pytest.approx(fp32.eval_loss, rel=0.05) and result.eval_loss != fp32.eval_loss


def test_merge_saves_the_dtype_asked(run_folder, tmp_path):
    out = merge(adapter=run_folder, output=str(tmp_path / "merged"), dtype="bf16", device="cpu")
    weights = load_file(f"{out}/model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("command", ["chat", "eval", "merge"])
def test_a_device_that_is_not_there_is_refused_in_one_line(run_folder, tmp_path, command, capsys):
    from deltatune.cli import main

    extra = {"chat": ["--prompt", "hi"], "eval": [], "merge": ["--output", str(tmp_path / "m")]}[command]
    assert main([command, "--adapter", run_folder, "--device", "cuda", *extra]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"deltatune {command}: error: --device cuda: no cuda device here; use --device auto or cpu"
    )
    assert not (tmp_path / "m").exists()
