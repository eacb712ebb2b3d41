"""The command line refusing bad input on a tiny random chat model: occupied folders, impossible resumes,
damaged checkpoints and data, options of the wrong type or method; nothing is lost when a command fails."""

from __future__ import annotations

import os
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from deltatune.cli import chat, evaluate, main, merge, train
from deltatune.cli.data import DataError
from deltatune.cli.options import load_options


def adapter_tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


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
    with pytest.raises(
        ValueError, match=r"checkpoint-2 holds a BITFIT adapter, but --method prompt-tuning makes PROMPT_TUNING"
    ):
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
    assert (
        "checkpoint-3 is incomplete (no adapter_model.safetensors, no trainer_state.json); continuing from"
        in caplog.text
    )
    with pytest.raises(
        FileNotFoundError,
        match=r"--resume .*run: not a complete checkpoint of deltatune train \(no trainer_state\.json\)",
    ):
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
        (
            '{"instruction": "a", "output": "b"}\n{"instruction": "c", "input": "d"}\n',
            r"bad\.jsonl, row 2: no 'output' field",
        ),
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
    with pytest.raises(
        DataError, match=r"--max-length 8 is too small for any response .* shortest prompt is \d+ tokens"
    ):
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
