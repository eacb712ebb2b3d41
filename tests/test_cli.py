"""The command line end to end on a tiny random chat model: every method in the CLI's table, resume,
Ctrl-C, bad input, and the `deltatune` entry point itself."""

from __future__ import annotations

import io
import json
import os
import re
import signal

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from deltatune import PeftModel
from deltatune.cli import chat, evaluate, main, merge, train
from deltatune.cli.data import BUNDLED_EVAL, DataError, bundled_path
from deltatune.cli.methods import METHODS
from deltatune.cli.options import load_options
from deltatune.tuners import method_for
from tiny_chat_model import make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"))


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
        values = dict(model=model, output=str(out), max_steps=4, batch_size=4, logging_steps=1, save_steps=2, lr=1e-2,
                      eval_data=held_out)  # fmt: skip
        return {**values, **extra}

    return make


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
    turns = chat(adapter=str(out), prompt="Normalize the date to YYYY-MM-DD.\n5 March 2024", compare_base=True,
                 max_new_tokens=6, out=stream)  # fmt: skip
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


@pytest.mark.parametrize("text, message", [("model: [unclosed\n", "is not valid YAML"), ("- a\n", "must hold a mapping")])
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


# ---- bad input ------------------------------------------------------------------------------------------------
def test_output_folder_holding_another_run_is_refused(tiny, tmp_path, run_options):
    out = tmp_path / "run"
    train(run_options(tiny, out, max_steps=1))
    with pytest.raises(FileExistsError, match=r"already holds another run .*--overwrite"):
        train(run_options(tiny, out, max_steps=1))
    kept = adapter_tensors(out)
    with pytest.raises(DataError, match="not found"):  # a new run that cannot start leaves the old one
        train(run_options(tiny, out, max_steps=2, overwrite=True, data=str(tmp_path / "missing.jsonl")))
    with pytest.raises(OSError, match="--model"):
        train(run_options(str(tmp_path / "no-model"), out, max_steps=2, overwrite=True))
    assert adapter_tensors(out).keys() == kept.keys() and (out / "run.yaml").is_file()
    assert train(run_options(tiny, out, max_steps=2, overwrite=True)).steps == 2
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a deltatune run"):
        train(run_options(tiny, tmp_path / "mine", max_steps=1, overwrite=True))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


def test_resume_with_nothing_to_resume(tiny, tmp_path, run_options):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(run_options(tiny, tmp_path / "empty", resume=True))


def test_resume_of_another_method_or_shape_is_refused_and_keeps_the_run(tiny, tmp_path, run_options):
    out = tmp_path / "run"
    train(run_options(tiny, out, method="bitfit", max_steps=2, save_steps=2))
    before = (out / "run.yaml").read_text()
    with pytest.raises(ValueError, match=r"checkpoint-2 holds a BITFIT adapter, but --method prompt-tuning makes PROMPT_TUNING"):
        train(run_options(tiny, out, method="prompt-tuning", max_steps=4, resume=True))
    lora = tmp_path / "lora"
    train(run_options(tiny, lora, r=8, max_steps=2, save_steps=2))
    lora_before = (lora / "run.yaml").read_text()
    with pytest.raises(ValueError, match="shape"):  # same method, another rank: the checkpoint does not fit
        train(run_options(tiny, lora, r=4, max_steps=4, resume=True))
    # the runs' own options are kept, so a plain --resume still continues them
    assert (out / "run.yaml").read_text() == before and (lora / "run.yaml").read_text() == lora_before


def test_resume_of_a_finished_run_or_with_a_new_lr_is_refused(tiny, tmp_path, run_options):
    out = tmp_path / "run"
    train(run_options(tiny, out, max_steps=2, save_steps=2))
    with pytest.raises(ValueError, match=r"--resume continues with the run's learning rate 0.01 .*not --lr 0.5"):
        train(run_options(tiny, out, max_steps=4, resume=True, lr=0.5))  # Trainer would keep 0.01, run.yaml say 0.5
    assert "lr: 0.01\n" in (out / "run.yaml").read_text()
    with pytest.raises(ValueError, match=r"checkpoint-2 is at step 2, and --max-steps is 2: nothing is left to train"):
        train(run_options(tiny, out, max_steps=2, resume=True))


def test_resume_skips_an_incomplete_checkpoint_and_refuses_a_folder_that_is_none(tiny, tmp_path, run_options, caplog):
    out = tmp_path / "run"
    train(run_options(tiny, out, max_steps=2, save_steps=2))
    (out / "checkpoint-3").mkdir()  # a save cut short
    (out / "checkpoint-3" / "adapter_config.json").write_text("{}")
    assert train(run_options(tiny, out, max_steps=3, resume=True)).steps == 3
    assert "checkpoint-3 is incomplete (no adapter_model.safetensors, trainer_state.json); continuing from" in caplog.text
    with pytest.raises(FileNotFoundError, match=r"--resume .*run: not a checkpoint of deltatune train \(no trainer_state\.json\)"):
        train(run_options(tiny, tmp_path / "other", max_steps=3, resume=str(out)))


@pytest.mark.parametrize("damage", ["truncated", "a pickle"])
def test_resume_from_a_damaged_checkpoint_says_so_without_unpickling(tiny, tmp_path, run_options, damage):
    import pickle

    out = tmp_path / "run"
    train(run_options(tiny, out, max_steps=2, save_steps=2))
    optimizer = out / "checkpoint-2" / "optimizer.pt"
    if damage == "truncated":
        optimizer.write_bytes(optimizer.read_bytes()[:50])
    else:
        optimizer.write_bytes(pickle.dumps(Unpickled(str(tmp_path / "unpickled")), protocol=2))
    with pytest.raises(ValueError, match=r"--resume: .*checkpoint-2 is damaged .*resume from an earlier checkpoint"):
        train(run_options(tiny, out, max_steps=3, resume=True))
    assert not (tmp_path / "unpickled").exists()


class Unpickled:
    """Unpickling this makes a folder: torch.load(weights_only=True) must refuse it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


@pytest.mark.parametrize(
    "content, message",
    [
        (None, r"data file .*missing\.jsonl not found"),
        ("this is not json\n", r"bad\.jsonl, row 1: not valid JSON"),
        ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "input": "d"}\n', r"bad\.jsonl, row 2: no 'output' field"),
        ("", r"bad\.jsonl holds no rows"),
    ],
)
def test_bad_data_is_refused_with_file_and_row(tiny, tmp_path, run_options, content, message):
    path = tmp_path / ("missing.jsonl" if content is None else "bad.jsonl")
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        train(run_options(tiny, tmp_path / "run", data=str(path)))
    assert not (tmp_path / "run").exists()  # nothing written for a run that cannot start


def test_max_length_too_small_for_any_response(tiny, tmp_path, run_options):
    with pytest.raises(DataError, match=r"--max-length 8 is too small for any response .* shortest prompt is \d+ tokens"):
        train(run_options(tiny, tmp_path / "run", max_length=8))


def test_unknown_method_and_foreign_option(tiny, tmp_path, run_options):
    with pytest.raises(ValueError, match=r"--method 'sparse' is not known; use one of: lora, bitfit"):
        train(run_options(tiny, tmp_path / "run", method="sparse"))
    with pytest.raises(ValueError, match=r"--r does not apply to --method bitfit .*--r is for lora"):
        train(run_options(tiny, tmp_path / "run", method="bitfit", r=4))
    with pytest.raises(ValueError, match=r"unknown option 'rank'"):
        train(run_options(tiny, tmp_path / "run", rank=4))


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("max_steps: ten\n", r"bad\.yaml: option 'max_steps' must be an integer, not 'ten'"),
        ("r: [4]\n", r"bad\.yaml: option 'r' must be an integer, not \[4\]"),
        ("load_in_4bit: maybe\n", r"bad\.yaml: option 'load_in_4bit' must be true/false, not 'maybe'"),
    ],
)
def test_config_values_of_the_wrong_type_are_refused(tmp_path, capsys, yaml_text, message):
    (tmp_path / "bad.yaml").write_text(yaml_text)
    assert main(["train", "--config", str(tmp_path / "bad.yaml"), "--output", str(tmp_path / "run")]) == 1
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_config_values_written_as_yaml_strings_are_read_as_numbers():
    # YAML 1.1 reads `1e-3` as a string; "4" and "no" are what a hand-written file often holds
    options = load_options(None, {"lr": "1e-3", "r": "4", "load_in_4bit": "no", "output": 2024})
    assert options.lr == 1e-3 and options.method_options["r"] == 4 and options.load_in_4bit is False
    assert options.output == "2024"


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(grad_accum=0), r"--grad-accum 0: must be at least 1"),
        (dict(batch_size=0), r"--batch-size 0: must be at least 1"),
        (dict(logging_steps=0), r"--logging-steps 0: must be at least 1"),
        (dict(max_steps=-1), r"--max-steps -1: must be at least 1"),
        (dict(max_steps=None, epochs=0), r"--epochs 0: must be above 0"),
        (dict(lr=0), r"--lr 0: the learning rate must be above 0"),
    ],
)
def test_values_no_run_can_use_are_refused_before_anything_is_written(tiny, tmp_path, run_options, values, message):
    with pytest.raises(ValueError, match=message):
        train(run_options(tiny, tmp_path / "run", **values))
    assert not (tmp_path / "run").exists()


def test_chat_eval_and_output_arguments_that_cannot_work(tiny, tmp_path, run_options):
    out = tmp_path / "run"
    train(run_options(tiny, out, max_steps=1))
    for prompt in ("", "  \n"):
        with pytest.raises(ValueError, match=r"--prompt is empty; give the message to answer, or leave --prompt out"):
            chat(adapter=str(out), prompt=prompt, out=None)
    with pytest.raises(ValueError, match=r"--max-new-tokens 0: must be at least 1"):
        chat(adapter=str(out), prompt="hi", max_new_tokens=0, out=None)
    with pytest.raises(ValueError, match=r"--batch-size 0: must be at least 1"):
        evaluate(adapter=str(out), batch_size=0)
    with pytest.raises(ValueError, match=r"--compare-base needs --adapter"):  # was ignored: one score printed
        evaluate(model=tiny, compare_base=True)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(FileExistsError, match=r"--output .*file is a file; give a folder"):
        train(run_options(tiny, tmp_path / "file", max_steps=1))
    with pytest.raises(FileExistsError, match=r"--output .*file is a file; give a folder"):
        merge(str(out), str(tmp_path / "file"))
    assert (tmp_path / "file").read_text() == "mine"


def test_merge_overwrite_that_fails_keeps_the_old_merged_model(tiny, tmp_path, run_options, monkeypatch):
    import transformers

    out, merged = tmp_path / "run", tmp_path / "merged"
    train(run_options(tiny, out, max_steps=1))
    merge(str(out), str(merged))
    before = {p.name: p.read_bytes() for p in merged.iterdir()}

    def disk_full(self, folder, **kwargs):
        with open(os.path.join(folder, "model.safetensors"), "wb") as handle:
            handle.write(b"\x00" * 10)
        raise OSError("No space left on device")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        merge(str(out), str(merged), overwrite=True)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in merged.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["merged", "run"]  # no temporary folders left
    merge(str(out), str(merged), overwrite=True)
    assert AutoModelForCausalLM.from_pretrained(merged) is not None
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds files that are not a model"):
        merge(str(out), str(tmp_path / "mine"), overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


# ---- the `deltatune` entry point ----------------------------------------------------------------------------
def test_main_runs_every_subcommand(tiny, tmp_path, held_out, capsys):
    out, merged = str(tmp_path / "run"), str(tmp_path / "merged")
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny}\nmax-steps: 3\nbatch_size: 4\nr: 4\nsave_steps: 100\neval_data: {held_out}\n")
    assert main(["train", "--config", str(config), "--output", out, "--max-steps", "2"]) == 0
    assert "adapter in" in capsys.readouterr().out
    run = (tmp_path / "run" / "run.yaml").read_text()
    assert "max_steps: 2\n" in run and "r: 4\n" in run and "batch_size: 4\n" in run  # flags win over the file
    assert main(["chat", "--adapter", out, "--prompt", "Normalize the date to YYYY-MM-DD.\n5 May 2020", "--max-new-tokens", "4", "--compare-base"]) == 0
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
    "accelerate": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no"],
}  # fmt: skip


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_two_processes_give_the_same_adapter_as_one(tiny, tmp_path, held_out, launcher):
    """2 CPU processes (gloo), 2 rows each, equal 1 process with batches of 4."""
    import subprocess
    import sys

    common = ["--model", tiny, "--max-steps", "3", "--dropout", "0", "--eval-data", held_out, "--lr", "1e-2"]
    train(dict(model=tiny, max_steps=3, dropout=0.0, eval_data=held_out, lr=1e-2, batch_size=4, output=str(tmp_path / "one")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, *LAUNCHERS[launcher], "-m", "deltatune.cli", "train", *common,
                          "--batch-size", "2", "--output", str(tmp_path / "two")], env=env, capture_output=True, text=True)  # fmt: skip
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
        assert float(line["trainable_percent"]) == pytest.approx(row.trainable_percent) and 0 < row.trainable_percent < 100
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
    assert row.error is None and row.trainable_params == 2 * 4 * ((32 + 32) + (32 + 16))  # r=4 on q_proj (32->32), v_proj (32->16), 2 layers
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
    assert main(["compare", "--model", tiny, "--max-steps", "1", "--batch-size", "4", "--eval-data", held_out,
                 "--output", str(out), "--methods", "bitfit, lora", "--overwrite", "--in-process"]) == 0  # fmt: skip
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
