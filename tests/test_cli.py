"""The command line end to end on a tiny random chat model: every method in the CLI's table, resume,
Ctrl-C, compare, several processes, and the `deltatune` entry point itself (bad input: test_cli_bad_input.py).
The tiny model and run options are fixtures in conftest.py."""

from __future__ import annotations

import io
import json
import os
import signal

import pytest
import torch
from helpers.chat_model import make_tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from deltatune import PeftModel
from deltatune.cli import chat, evaluate, main, merge, train
from deltatune.cli.methods import METHODS
from deltatune.core.registry import method_for


def adapter_tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def logits_of(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


@pytest.mark.parametrize("method", list(METHODS))
def test_train_save_load_chat_eval_merge(method, tiny, tmp_path, run_options):
    out = tmp_path / "run"
    result = train(run_options(tiny, out, method=method))
    # train: the run folder holds the adapter in peft's files, the options used and the loss history
    assert result.steps == 4 and not result.interrupted
    for name in ("adapter_config.json", "adapter_model.safetensors", "run.yaml", "loss_history.json"):
        assert (out / name).is_file(), name
    history = json.loads((out / "loss_history.json").read_text())
    assert [h["step"] for h in history["train"]] == [1, 2, 3, 4]
    assert history["summary"]["method"] == method and history["summary"]["eval_loss"] == result.eval_loss
    assert 0 < result.trainable_params < result.all_params
    # load: the saved adapter on a fresh base gives the same eval loss as the trained model
    scores = evaluate(adapter=str(out), compare_base=True)
    assert scores.eval_loss == pytest.approx(result.eval_loss, rel=1e-5)
    assert scores.base_eval_loss != pytest.approx(scores.eval_loss, rel=1e-6)  # the adapter changes the model
    assert scores.examples == 8 and 0.0 <= scores.exact_match <= 1.0 and len(scores.answers) == 8
    # chat: one prompt, with the base answer beside the tuned one
    stream = io.StringIO()
    turns = chat(
        adapter=str(out),
        prompt="Normalize the date to YYYY-MM-DD.\n5 March 2024",
        compare_base=True,
        max_new_tokens=6,
        out=stream,
    )
    assert len(turns) == 1 and isinstance(turns[0].answer, str) and isinstance(turns[0].base_answer, str)
    streamed = stream.getvalue()  # "[base]  <streamed base answer>\n[tuned] <streamed tuned answer>\n"
    assert streamed.index(turns[0].base_answer) < streamed.index("[tuned]") < streamed.rindex(turns[0].answer)
    # merge: a plain transformers model with the adapter folded in, for methods that can merge
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), str(out))
    ids = torch.tensor([[1, 5, 9, 30, 7, 2]])
    if method_for(peft_model.active_peft_config).can_merge:
        merge(str(out), str(tmp_path / "merged"))
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        torch.testing.assert_close(logits_of(merged, ids), logits_of(peft_model, ids), atol=1e-5, rtol=1e-5)
        assert (out / "adapter_config.json").is_file()  # the adapter folder is left as it was
    else:
        with pytest.raises(TypeError, match="merg"):
            merge(str(out), str(tmp_path / "merged"))


def test_a_run_given_relative_paths_is_read_from_another_folder(tiny, held_out, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(tiny, tmp_path / "model")
    shutil.copy(held_out, tmp_path / "held_out.jsonl")
    monkeypatch.chdir(tmp_path)
    train(dict(model="model", eval_data="held_out.jsonl", output="run", max_steps=1, batch_size=4))
    monkeypatch.chdir(tmp_path / "run")  # eval and chat from elsewhere: run.yaml's paths must still lead to the files
    assert evaluate(adapter=str(tmp_path / "run")).examples == 8
    assert chat(adapter=str(tmp_path / "run"), prompt="hi", max_new_tokens=2, out=None)[0].answer is not None


@pytest.mark.parametrize(
    "text, message", [("model: [unclosed\n", "is not valid YAML"), ("- a\n", "must hold a mapping")]
)
def test_damaged_run_yaml_in_an_adapter_folder(tiny, tmp_path, run_options, text, message):
    out = tmp_path / "run"
    train(run_options(tiny, out, max_steps=1))
    (out / "run.yaml").write_text(text)
    with pytest.raises(ValueError, match=rf"(?s)run\.yaml {message}.*delete it and pass --model"):
        evaluate(adapter=str(out))


def test_lora_run_folder_loads_in_hf_peft(tiny, tmp_path, run_options):
    peft = pytest.importorskip("peft")
    out = tmp_path / "run"
    train(run_options(tiny, out, method="lora", max_steps=2))
    ours = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), str(out))
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), str(out))
    ids = torch.tensor([[1, 5, 9, 30, 7, 2]])
    torch.testing.assert_close(logits_of(theirs, ids), logits_of(ours, ids), atol=1e-5, rtol=1e-5)


def test_training_lowers_held_out_loss(tiny, tmp_path, run_options):
    result = train(run_options(tiny, tmp_path / "run", max_steps=20, batch_size=8, lr=3e-2, save_steps=100))
    scores = evaluate(adapter=str(tmp_path / "run"), compare_base=True)
    assert result.eval_loss < scores.base_eval_loss - 0.1
    assert result.history[-1]["loss"] < result.history[0]["loss"]


class InterruptAt(TrainerCallback):
    """Raises KeyboardInterrupt (a hard Ctrl-C) at the end of step `step`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_resume_gives_the_same_adapter_as_an_uninterrupted_run(tiny, tmp_path, run_options):
    options = dict(max_steps=6, save_steps=2, dropout=0.1)  # dropout: the RNG state must be restored too
    straight = train(run_options(tiny, tmp_path / "straight", **options))
    with pytest.raises(KeyboardInterrupt):
        train(run_options(tiny, tmp_path / "cut", **options), callbacks=[InterruptAt(3)])
    assert (tmp_path / "cut" / "checkpoint-3" / "adapter_model.safetensors").is_file()
    resumed = train(run_options(tiny, tmp_path / "cut", resume=True, **options))
    assert resumed.steps == straight.steps == 6
    expected, got = adapter_tensors(tmp_path / "straight"), adapter_tensors(tmp_path / "cut")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-6)
    steps = [h["step"] for h in resumed.history]  # step 3's loss was never logged: the run stopped in it
    assert steps == sorted(steps) and steps[0] == 1 and steps[-1] == 6


def test_ctrl_c_leaves_a_usable_checkpoint(tiny, tmp_path, run_options):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(run_options(tiny, out, max_steps=8, save_steps=100), callbacks=[InterruptAt(3)])
    checkpoint = out / "checkpoint-3"
    assert checkpoint.is_dir()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), str(checkpoint))
    assert logits_of(loaded, torch.tensor([[1, 5, 9]])).isfinite().all()
    assert chat(adapter=str(out), prompt="hello", max_new_tokens=3, out=None)[0].answer is not None


class SigintAt(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 2:
            os.kill(os.getpid(), signal.SIGINT)


def test_sigint_finishes_the_step_and_saves(tiny, tmp_path, run_options):
    out = tmp_path / "run"
    result = train(run_options(tiny, out, max_steps=8, save_steps=100), callbacks=[SigintAt()])
    assert result.interrupted and result.steps == 3
    assert (out / "checkpoint-3").is_dir() and (out / "adapter_config.json").is_file()
    resumed = train(run_options(tiny, out, max_steps=8, save_steps=100, resume=True))
    assert resumed.steps == 8 and not resumed.interrupted


# ---- the `deltatune` entry point ----------------------------------------------------------------------------
def test_main_runs_every_subcommand(tiny, tmp_path, held_out, capsys):
    out, merged = str(tmp_path / "run"), str(tmp_path / "merged")
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny}\nmax-steps: 3\nbatch_size: 4\nr: 4\nsave_steps: 100\neval_data: {held_out}\n")
    assert main(["train", "--config", str(config), "--output", out, "--max-steps", "2"]) == 0
    assert "adapter in" in capsys.readouterr().out
    run = (tmp_path / "run" / "run.yaml").read_text()
    assert "max_steps: 2\n" in run and "r: 4\n" in run and "batch_size: 4\n" in run  # flags win over the file
    assert (
        main(
            [
                "chat",
                "--adapter",
                out,
                "--prompt",
                "Normalize the date to YYYY-MM-DD.\n5 May 2020",
                "--max-new-tokens",
                "4",
                "--compare-base",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "[base]" in printed and "[tuned]" in printed
    assert main(["eval", "--adapter", out]) == 0
    assert "exact-match" in capsys.readouterr().out
    assert main(["merge", "--adapter", out, "--output", merged]) == 0
    assert os.path.isfile(os.path.join(merged, "config.json"))
    # repeat a run from its own run.yaml
    assert main(["train", "--config", os.path.join(out, "run.yaml"), "--output", str(tmp_path / "again")]) == 0
    torch.testing.assert_close(adapter_tensors(tmp_path / "again"), adapter_tensors(tmp_path / "run"))


def test_main_reports_errors_without_a_traceback(tiny, tmp_path, capsys):
    assert main(["train", "--model", tiny, "--data", str(tmp_path / "nope.json"), "--output", str(tmp_path / "r")]) == 1
    assert "deltatune train: error: data file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--rank", "4"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --rank" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("max_step: 3\n")
    assert main(["train", "--config", str(tmp_path / "bad.yaml")]) == 1
    assert "bad.yaml: unknown option 'max_step'" in capsys.readouterr().err
    assert main(["chat", "--prompt", "hi", "--compare-base", "--model", tiny]) == 1
    assert "--compare-base needs --adapter" in capsys.readouterr().err


def test_chat_repl_streams_and_keeps_history(tiny, tmp_path, run_options):
    out = tmp_path / "run"
    train(run_options(tiny, out, max_steps=1))
    lines = iter(["Normalize the date to YYYY-MM-DD.\n1 May 2001", "and again", "/reset", "third", "/quit"])
    stream = io.StringIO()
    turns = chat(adapter=str(out), max_new_tokens=4, input_fn=lambda _: next(lines), out=stream)
    assert [t.prompt for t in turns] == ["Normalize the date to YYYY-MM-DD.\n1 May 2001", "and again", "third"]
    printed = stream.getvalue()
    assert printed.startswith("Type a message") and all(t.answer.strip() in printed for t in turns)


# On a machine without GPUs, accelerate's `--multi_gpu` launcher is torch.distributed.run (gloo); its `--cpu`
# flag would start a single process.
LAUNCHERS = {
    "torchrun": ["-m", "torch.distributed.run", "--nproc_per_node", "2"],
    "accelerate": [
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ],
}


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_two_processes_give_the_same_adapter_as_one(tiny, tmp_path, held_out, launcher):
    """2 CPU processes (gloo), 2 rows each, equal 1 process with batches of 4."""
    import subprocess
    import sys

    common = ["--model", tiny, "--max-steps", "3", "--dropout", "0", "--eval-data", held_out, "--lr", "1e-2"]
    train(
        dict(
            model=tiny,
            max_steps=3,
            dropout=0.0,
            eval_data=held_out,
            lr=1e-2,
            batch_size=4,
            output=str(tmp_path / "one"),
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [
            sys.executable,
            *LAUNCHERS[launcher],
            "-m",
            "deltatune.cli",
            "train",
            *common,
            "--batch-size",
            "2",
            "--output",
            str(tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("adapter in") == 1  # one process reports
    assert "'epoch': '0.03333'" in two.stdout + two.stderr  # 3 steps x 2 processes x 2 rows of 360: two ran
    expected, got = adapter_tensors(tmp_path / "one"), adapter_tensors(tmp_path / "two")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-5)
    changed = adapter_tensors(tmp_path / "one")
    assert any(v.abs().sum() > 0 for k, v in changed.items() if "lora_B" in k)  # training moved the adapter


def test_compare_tabulates_and_plots_every_method(tiny, tmp_path, held_out):
    import csv

    from deltatune.cli import compare

    out = tmp_path / "cmp"
    options = dict(model=tiny, max_steps=2, batch_size=4, eval_data=held_out, output=str(out), logging_steps=1)
    rows = compare(options, isolate=False)
    assert [r.method for r in rows] == list(METHODS) and all(r.error is None for r in rows)
    with open(out / "comparison.csv", encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    assert [t["method"] for t in table] == list(METHODS)
    for row, line in zip(rows, table, strict=True):
        assert int(line["trainable_params"]) == row.trainable_params > 0
        assert (
            float(line["trainable_percent"]) == pytest.approx(row.trainable_percent) and 0 < row.trainable_percent < 100
        )
        assert float(line["seconds_per_step"]) > 0 and float(line["peak_memory_mb"]) > 0
        assert float(line["eval_loss"]) > 0 and 0 <= float(line["exact_match"]) <= 1
        assert [step for step, _ in row.losses] == [1, 2]
    text = (out / "comparison.md").read_text()
    assert all(f"| {m} |" in text for m in METHODS)
    for png in ("loss_curves.png", "quality_vs_params.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="compare needs --max-steps"):
        compare({**options, "max_steps": None})


def test_compare_in_separate_processes(tiny, tmp_path, held_out):
    from deltatune.cli import compare

    options = dict(model=tiny, max_steps=1, batch_size=4, eval_data=held_out, output=str(tmp_path / "cmp"), r=4)
    [row] = compare(options, methods=["lora"], isolate=True)
    assert row.error is None and row.trainable_params == 2 * 4 * (
        (32 + 32) + (32 + 16)
    )  # r=4 on q_proj (32->32), v_proj (32->16), 2 layers
    assert row.peak_memory_mb > 50  # a fresh process holding torch and the model


def test_compare_keeps_earlier_runs_and_refuses_options_no_compared_method_reads(tiny, tmp_path, held_out, capsys):
    from deltatune.cli import compare

    out = tmp_path / "cmp"
    options = dict(model=tiny, max_steps=1, batch_size=4, eval_data=held_out, output=str(out))
    with pytest.raises(ValueError, match=r"--r does not apply to any method compared \(bitfit, prompt-tuning\)"):
        compare({**options, "r": 4}, methods=["bitfit", "prompt-tuning"], isolate=False)
    compare(options, methods=["bitfit"], isolate=False)
    kept = (out / "bitfit" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match=r"already holds runs of bitfit; pass --overwrite"):
        compare({**options, "seed": 7}, methods=["lora", "bitfit"], isolate=False)
    assert (out / "bitfit" / "adapter_model.safetensors").read_bytes() == kept
    assert not (out / "lora").exists()
    with pytest.raises(FileExistsError, match="holds a train run"):
        compare({**options, "output": str(out / "bitfit")}, methods=["lora"], isolate=False)
    # the command line: a space after a comma is fine, and --overwrite replaces the earlier runs
    assert (
        main(
            [
                "compare",
                "--model",
                tiny,
                "--max-steps",
                "1",
                "--batch-size",
                "4",
                "--eval-data",
                held_out,
                "--output",
                str(out),
                "--methods",
                "bitfit, lora",
                "--overwrite",
                "--in-process",
            ]
        )
        == 0
    )
    assert "| lora |" in capsys.readouterr().out


def test_main_resume_reads_the_runs_own_options(tiny, tmp_path, held_out):
    out = str(tmp_path / "run")
    common = ["--model", tiny, "--eval-data", held_out, "--output", out, "--batch-size", "4"]
    assert main(["train", *common, "--method", "adapter", "--max-steps", "2", "--save-steps", "2"]) == 0
    assert main(["train", "--output", out, "--resume", "--max-steps", "3"]) == 0  # no --method: the run's own
    history = json.loads((tmp_path / "run" / "loss_history.json").read_text())
    assert history["summary"]["method"] == "adapter" and history["summary"]["steps"] == 3


def test_qlora_run_on_a_4bit_base(tmp_path, run_options):
    pytest.importorskip("bitsandbytes")
    tiny = make_tiny_model(str(tmp_path / "model"), hidden_size=64)  # bitsandbytes' CPU 4-bit kernels need >= 64
    out = tmp_path / "run"
    result = train(run_options(tiny, out, max_steps=2, load_in_4bit=True))
    assert result.steps == 2 and "load_in_4bit: true" in (out / "run.yaml").read_text()
    peft_model, _, _ = __import__("deltatune.cli.models", fromlist=["x"]).load_adapter_model(str(out))
    assert any(type(m).__name__ == "Linear4bit" for m in peft_model.modules())  # reloaded on a 4-bit base
    merge(str(out), str(tmp_path / "merged"))  # merged onto the full-precision base
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any(type(m).__name__ == "Linear4bit" for m in merged.modules())
