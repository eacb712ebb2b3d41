"""The command line against hostile or broken input (issue 16): a model folder shipping Python code (run only
with --trust-remote-code, never after a prompt), pickled weights (refused, never unpickled), a damaged
conversion in the cache (rebuilt), data nested too deeply, an empty saved dataset, a null field, a bad
--target-modules regex, and `chat` past a model's context or on a line that is not UTF-8. Each fails with one
line naming the option or file and the fix, or goes on with a note."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers.chat_model import CHATML, make_tiny_model, make_tokenizer
from helpers.models import tiny_model

from deltatune.cli import chat, main
from deltatune.cli.data import DataError, load_rows
from deltatune.cli.models import SOURCE_FILE, load_model
from deltatune.cli.options import load_options

# ---- a model folder that ships code -------------------------------------------------------------------------
EVIL_CONFIG = """open({marker!r}, "w").write("ran")
from transformers import LlamaConfig


class EvilConfig(LlamaConfig):
    model_type = "evil"
"""
EVIL_MODEL = """from transformers import LlamaForCausalLM

from .configuration_evil import EvilConfig


class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
"""


@pytest.fixture
def evil(tmp_path, monkeypatch) -> tuple[str, str]:
    """(model folder whose config needs its own code, marker file that code writes when it runs)."""
    folder, marker = str(tmp_path / "evil"), str(tmp_path / "MARKER")
    make_tiny_model(folder)
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    config["model_type"] = "evil"  # not a transformers architecture: only the folder's code can read it
    config["auto_map"] = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilModel",
    }
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle)
    with open(os.path.join(folder, "configuration_evil.py"), "w", encoding="utf-8") as handle:
        handle.write(EVIL_CONFIG.format(marker=marker))
    with open(os.path.join(folder, "modeling_evil.py"), "w", encoding="utf-8") as handle:
        handle.write(EVIL_MODEL)
    monkeypatch.setattr("transformers.dynamic_module_utils.HF_MODULES_CACHE", str(tmp_path / "modules"))
    return folder, marker


def test_model_code_does_not_run_when_stdin_says_yes(evil, monkeypatch, capsys):
    folder, marker = evil
    monkeypatch.setattr("sys.stdin", io.StringIO("y\ny\n"))  # transformers used to ask "[y/N]" on stdin
    assert main(["chat", "--model", folder, "--prompt", "hi", "--max-new-tokens", "2"]) == 1
    err = capsys.readouterr().err
    assert not os.path.exists(marker)
    assert err.count("\n") == 1 and "--trust-remote-code" in err and folder in err
    assert "Do you wish to run the custom code" not in err


def test_model_code_does_not_run_in_a_piped_session(evil, tmp_path):
    folder, marker = evil
    done = subprocess.run(
        [sys.executable, "-m", "deltatune.cli", "chat", "--model", folder, "--prompt", "hi", "--max-new-tokens", "2"],
        input="y\n",
        capture_output=True,
        text=True,
        env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")},
        timeout=300,
    )
    assert done.returncode == 1 and not os.path.exists(marker)
    assert "error: --model" in done.stderr and "pass --trust-remote-code" in done.stderr


def test_trust_remote_code_runs_the_folders_code(evil):
    folder, marker = evil
    [turn] = chat(model=folder, prompt="hi", max_new_tokens=2, trust_remote_code=True, out=None)
    assert os.path.exists(marker) and isinstance(turn.answer, str)


def test_every_command_takes_trust_remote_code():
    from deltatune.cli import build_parser

    parser = build_parser()
    for command in (["train"], ["compare"], ["chat"], ["eval"], ["merge", "--adapter", "a", "--output", "o"]):
        assert parser.parse_args([*command, "--trust-remote-code"]).trust_remote_code is True
    assert load_options(None, {"trust_remote_code": True}).to_yaml_dict()["trust_remote_code"] is True


# ---- pickled weights ----------------------------------------------------------------------------------------
@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called: a pickle would have been unpickled")

    monkeypatch.setattr(torch, "load", refuse)


def test_pickled_weights_are_refused_not_unpickled(tiny, tmp_path, no_unpickling):
    folder = tmp_path / "pickled"
    make_tiny_model(str(folder))
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not even read")
    with pytest.raises(ValueError, match=r"pytorch_model.bin, a pickled PyTorch file; deltatune reads safetensors"):
        load_model(str(folder))


def test_pickled_weights_beside_safetensors_are_left_alone(tmp_path, no_unpickling):
    folder = tmp_path / "both"
    make_tiny_model(str(folder))
    (folder / "pytorch_model.bin").write_bytes(b"never opened")
    assert load_model(str(folder)).model is not None


# ---- a damaged conversion in the cache ----------------------------------------------------------------------
def write_tiny_gguf(path: str, hidden: int = 16, heads: int = 2, ffn: int = 32) -> str:
    """A one-layer Llama GGUF (float32, random) with the tiny chat tokenizer: converts in a second or two."""
    import gguf

    tokenizer = make_tokenizer(chat_template=True)
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    tokens = [t for t, _ in sorted(state["model"]["vocab"].items(), key=lambda item: item[1])]
    special = set(tokenizer.all_special_tokens) | {"<|im_start|>", "<|im_end|>"}
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(1)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(1)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]])
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(CHATML)
    rng = np.random.default_rng(0)
    kv = hidden // heads
    shapes = {"token_embd": (len(tokens), hidden), "output": (len(tokens), hidden), "output_norm": (hidden,)}
    shapes |= {f"blk.0.{n}": (hidden,) for n in ("attn_norm", "ffn_norm")}
    shapes |= {"blk.0.attn_q": (hidden, hidden), "blk.0.attn_k": (kv, hidden), "blk.0.attn_v": (kv, hidden)}
    shapes |= {"blk.0.attn_output": (hidden, hidden), "blk.0.ffn_gate": (ffn, hidden), "blk.0.ffn_up": (ffn, hidden)}
    shapes |= {"blk.0.ffn_down": (hidden, ffn)}
    for name, shape in shapes.items():
        values = np.ones(shape) if len(shape) == 1 else rng.standard_normal(shape) * 0.02
        writer.add_tensor(name + ".weight", values.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> str:
    return write_tiny_gguf(str(tmp_path_factory.mktemp("gguf") / "tiny.gguf"))


def _truncate(path: str) -> None:
    os.truncate(path, os.path.getsize(path) // 2)


def _same_size_garbage(path: str) -> None:
    size = os.path.getsize(path)
    with open(path, "wb") as handle:
        handle.write(b"{" * size)


DAMAGE = {
    "truncated weights": ("model.safetensors", _truncate),
    "deleted weights": ("model.safetensors", os.remove),
    "corrupt config": ("config.json", _same_size_garbage),
    "corrupt tokenizer": ("tokenizer.json", _truncate),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_conversion_in_the_cache_is_rebuilt(tiny_gguf, tmp_path, damage, caplog):
    cache = str(tmp_path / "cache")
    folder = load_model(tiny_gguf, cache).path
    assert folder == os.path.join(cache, "tiny")
    name, harm = DAMAGE[damage]
    harm(os.path.join(folder, name))
    with caplog.at_level(logging.WARNING, logger="deltatune.cli.models"):
        loaded = load_model(tiny_gguf, cache)
    assert loaded.path == folder and loaded.model.config.hidden_size == 16
    warning = f"cached conversion in {folder} is damaged ({name}"
    assert any(warning in r.getMessage() and "converting again" in r.getMessage() for r in caplog.records)
    assert "--model" not in caplog.text
    assert not [n for n in os.listdir(cache) if n.startswith(".")]  # no temp folder left behind


def test_a_sound_conversion_is_not_redone(tiny_gguf, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    folder = load_model(tiny_gguf, cache).path
    files = json.loads(open(os.path.join(folder, SOURCE_FILE), encoding="utf-8").read())["files"]
    assert files["model.safetensors"] == os.path.getsize(os.path.join(folder, "model.safetensors"))
    monkeypatch.setattr("deltatune.cli.models._plain_copy", lambda *a: pytest.fail("converted again"))
    assert load_model(tiny_gguf, cache).path == folder


def test_a_cache_that_still_fails_to_load_names_the_cache_folder(tiny_gguf, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    folder = load_model(tiny_gguf, cache).path
    monkeypatch.setattr("deltatune.cli.models.cache_damage", lambda *a: None)  # damage the check cannot see
    _same_size_garbage(os.path.join(folder, "tokenizer.json"))
    with pytest.raises(OSError, match=rf"converted copy of .*tiny.gguf in {folder} does not load .*delete that"):
        load_model(tiny_gguf, cache)


def test_two_processes_converting_at_once_both_load(tiny_gguf, tmp_path):
    cache = str(tmp_path / "cache")
    code = "import sys; from deltatune.cli.models import load_model; print(load_model(sys.argv[1], sys.argv[2]).path)"
    runs = [
        subprocess.Popen([sys.executable, "-c", code, tiny_gguf, cache], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0]
    assert all(out.strip() == os.path.join(cache, "tiny") for out in outputs)
    assert load_model(tiny_gguf, cache).path == os.path.join(cache, "tiny")


# ---- data and options ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_data_nested_too_deeply_is_refused(tmp_path, suffix):
    path = tmp_path / ("deep" + suffix)
    nested = "[" * 100_000 + "]" * 100_000
    path.write_text(nested if suffix == ".json" else '{"instruction": ' + nested + "}\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}.*nested too deeply"):
        load_rows(str(path))


def test_empty_saved_dataset_is_refused(tmp_path):
    import datasets

    features = datasets.Features({"instruction": datasets.Value("string"), "output": datasets.Value("string")})
    empty = datasets.Dataset.from_dict({"instruction": [], "output": []}, features=features)  # datasets 3.0 needs them
    empty.save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(DataError, match=r"empty(: the saved dataset)? holds no rows"):
        load_rows(str(tmp_path / "empty"))


def test_null_instruction_is_refused(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": null, "output": "b"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}, row 2: 'instruction' is null"):
        load_rows(str(path))


def test_invalid_target_modules_regex_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"--target-modules '\.\*\[q_proj' is not a valid regular expression"):
        load_options(None, {"target_modules": ".*[q_proj"})
    config = tmp_path / "run.yaml"
    config.write_text("target_modules: '(q_proj'\n", encoding="utf-8")
    with pytest.raises(ValueError, match="--target-modules"):
        load_options(str(config), {})


def test_config_nested_too_deeply_is_refused(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("lr: " + "[" * 5000 + "]" * 5000 + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"--config {config}: nested too deeply"):
        load_options(str(config), {})


# ---- chat past a model's context ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> str:
    """A tiny GPT-2 (learned absolute positions: no token past n_positions=48 can be read) with a chat template."""
    folder = str(tmp_path_factory.mktemp("gpt2") / "model")
    tokenizer = make_tokenizer(chat_template=True)
    model = tiny_model(
        "gpt2",
        n_positions=48,
        n_embd=16,
        n_layer=1,
        n_head=2,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def feeder(lines: list[str]):
    queue = list(lines)

    def read(_prompt: str) -> str:
        if not queue:
            raise EOFError
        return queue.pop(0)

    return read


def test_a_long_chat_drops_its_oldest_turns_instead_of_crashing(tiny_gpt2):
    out = io.StringIO()
    lines = ["hello world"] * 6 + ["\udcff\udcfe not utf-8", "hello " * 60, "world"]
    turns = chat(model=tiny_gpt2, max_new_tokens=8, input_fn=feeder(lines), out=out)
    text = out.getvalue()
    assert [t.prompt for t in turns] == ["hello world"] * 6 + ["world"]  # the session went on to the end
    assert "oldest exchange(s) left out to fit the model's context" in text
    assert "that line is not valid UTF-8 text; it was skipped" in text
    assert "that message does not fit in the model's context of 48 tokens" in text


def test_a_prompt_too_long_for_the_context_is_an_error(tiny_gpt2):
    with pytest.raises(ValueError, match=r"--prompt does not fit in the model's context of 48 tokens"):
        chat(model=tiny_gpt2, prompt="hello " * 60, max_new_tokens=8, out=None)
    with pytest.raises(ValueError, match=r"--max-new-tokens 48: the model reads at most 48 tokens"):
        chat(model=tiny_gpt2, prompt="hello", max_new_tokens=48, out=None)
    with pytest.raises(ValueError, match="--prompt is not valid UTF-8"):
        chat(model=tiny_gpt2, prompt="\udcff", max_new_tokens=8, out=None)


def test_a_line_that_is_not_utf8_is_skipped(tiny):
    out = io.StringIO()
    turns = chat(model=tiny, max_new_tokens=2, input_fn=feeder(["hello", "caf\udce9", "world"]), out=out)
    assert [t.prompt for t in turns] == ["hello", "world"]
    assert "that line is not valid UTF-8 text; it was skipped" in out.getvalue()


@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])
def test_piped_stdin_with_a_line_that_is_not_utf8(tiny, errors):
    done = subprocess.run(
        [sys.executable, "-m", "deltatune.cli", "chat", "--model", tiny, "--max-new-tokens", "2"],
        input=b"hello\ncaf\xe9\nworld\n",
        capture_output=True,
        env={**os.environ, "PYTHONIOENCODING": f"utf-8:{errors}"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    assert done.stdout.count(b">>> ") == 4 and b"not valid UTF-8" in done.stdout
