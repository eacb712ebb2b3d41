"""Adapter files: peft's two-file layout, atomic writes, AutoPeftModel*, and a clear error for every bad file."""

import json
import logging
import os

import peft
import pytest
import torch
from helpers.models import tiny_inputs, tiny_model
from helpers.peft_pairs import logits, randomize_adapter
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import deltatune
import deltatune.core.files
from deltatune import (
    AutoPeftModelForCausalLM,
    AutoPeftModelForSequenceClassification,
    LoraConfig,
    PeftConfig,
    PeftModel,
    TaskType,
    get_peft_config,
    get_peft_model,
)


def saved_lora(folder, arch="llama", **kwargs):
    """A LoRA adapter with random values saved in `folder`; returns the model."""
    settings = dict(task_type=TaskType.CAUSAL_LM, r=4, init_lora_weights=False)
    config = LoraConfig(**{**settings, **kwargs})
    model = get_peft_model(tiny_model(arch), config)
    randomize_adapter(model)
    model.save_pretrained(folder)
    return model


def test_save_writes_peft_layout(tmp_path):
    model = saved_lora(tmp_path)
    # README.md is peft's model card
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["inference_mode"] is True  # as peft writes it
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["r"] == 4
    assert model.active_peft_config.inference_mode is False  # the live config is untouched
    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in weights
    assert not any(".adapters." in k or ".default." in k or "base_layer" in k for k in weights)
    peft_config = peft.PeftConfig.from_pretrained(tmp_path)  # peft reads our config
    assert peft_config.r == 4 and set(peft_config.target_modules) == {"q_proj", "v_proj"}


def test_a_failed_write_leaves_the_previous_file(tmp_path, monkeypatch):
    saved_lora(tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, init_lora_weights=False))

    def half_written(tensors, path, metadata=None):
        with open(path, "wb") as handle:
            handle.write(b"\x00" * 10)
        raise OSError("disk full")

    monkeypatch.setattr(deltatune.core.files, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]  # no temp


def test_asking_for_a_pickled_file_is_refused_before_anything_is_written(tmp_path):
    model = get_peft_model(tiny_model("llama"), LoraConfig())
    with pytest.raises(ValueError, match=r"safe_serialization=False.*deltatune writes safetensors only"):
        model.save_pretrained(tmp_path, safe_serialization=False)
    assert not os.listdir(tmp_path)


def test_a_save_cut_short_between_the_two_files_leaves_the_previous_pair(tmp_path, monkeypatch):
    saved_lora(tmp_path, r=4)
    before = {name: (tmp_path / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=8, init_lora_weights=False))
    made = []

    def mkstemp(*args, **kwargs):  # the disk fills up after the first file of the pair
        if made:
            raise OSError("No space left on device")
        made.append(1)
        return real_mkstemp(*args, **kwargs)

    real_mkstemp = deltatune.core.files.tempfile.mkstemp
    monkeypatch.setattr(deltatune.core.files.tempfile, "mkstemp", mkstemp)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert {name: (tmp_path / name).read_bytes() for name in before} == before  # not r=8 weights beside an r=4 config
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path)).peft_config["default"].r == 4


def test_save_into_a_file_path_is_refused(tmp_path):
    model = get_peft_model(tiny_model("llama"), LoraConfig())
    target = tmp_path / "file.txt"
    target.write_text("x")
    with pytest.raises(ValueError, match=r"save_directory=.*file.txt is a file; give a folder"):
        model.save_pretrained(target)


def test_selected_adapters_only(tmp_path):
    model = get_peft_model(tiny_model("llama"), LoraConfig())
    model.add_adapter("other", LoraConfig(r=2))
    model.save_pretrained(tmp_path, selected_adapters=["other"])
    assert sorted(os.listdir(tmp_path)) == ["README.md", "other"]  # the card is for the folder, as peft
    assert json.loads((tmp_path / "other" / "adapter_config.json").read_text())["r"] == 2


def test_subfolder_reads_the_adapter_in_that_sub_folder_like_peft(tmp_path):
    inputs = tiny_inputs("llama")
    saved_lora(tmp_path / "outer")  # another adapter in the folder itself: must not be the one read
    inner = saved_lora(tmp_path / "outer" / "sub", r=2)
    for library in (deltatune, peft):
        loaded = library.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "outer", subfolder="sub")
        torch.testing.assert_close(logits(loaded, inputs), logits(inner, inputs), rtol=0, atol=1e-5)
    model = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "outer")
    model.load_adapter(tmp_path / "outer", adapter_name="inner", subfolder="sub")
    model.set_adapter("inner")
    torch.testing.assert_close(logits(model, inputs), logits(inner, inputs), rtol=0, atol=1e-5)


def test_selected_adapters_must_be_known(tmp_path):
    model = get_peft_model(tiny_model("llama"), LoraConfig())
    with pytest.raises(ValueError, match=r"selected_adapters=\['nope'\] names no adapter of this model; it has: "):
        model.save_pretrained(tmp_path, selected_adapters=["nope"])
    assert not os.listdir(tmp_path)


# ---- bad files ---------------------------------------------------------------------------------------------------
def test_missing_weights_file(tmp_path):
    saved_lora(tmp_path)
    os.remove(tmp_path / "adapter_model.safetensors")
    base = tiny_model("llama")
    with pytest.raises(FileNotFoundError) as error:
        PeftModel.from_pretrained(base, tmp_path)
    assert not any("lora" in n for n, _ in base.named_parameters())  # the base was not touched
    assert str(error.value) == (
        f"{tmp_path}/adapter_model.safetensors not found: the adapter folder must hold adapter_model.safetensors "
        "next to adapter_config.json (save it with model.save_pretrained(folder))"
    )


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"adapter_config.json not found: an adapter folder holds"):
        PeftModel.from_pretrained(tiny_model("llama"), tmp_path)


def test_config_that_is_not_json(tmp_path):
    saved_lora(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{ not json")
    with pytest.raises(ValueError, match=r"adapter_config.json is not valid JSON .*; save the adapter again"):
        PeftConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("keep", [0, 7, 200, -16])
def test_truncated_weights_file(tmp_path, keep):
    saved_lora(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    with pytest.raises(ValueError) as error:
        PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    message = str(error.value)
    assert message.startswith(f"{path} could not be read (")
    assert message.endswith("the file is truncated or damaged, save the adapter again")


def test_pickled_adapter_is_refused_without_unpickling(tmp_path):
    saved_lora(tmp_path)
    os.remove(tmp_path / "adapter_model.safetensors")
    marker = tmp_path / "unpickled"

    class Payload:  # unpickling this would create `marker`
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import pickle

    (tmp_path / "adapter_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ValueError) as error:
        PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    message = str(error.value)
    assert "adapter_model.bin is a pickled PyTorch file, which deltatune refuses to load" in message
    assert "s.save_file(torch.load('adapter_model.bin', weights_only=True), 'adapter_model.safetensors')" in message
    assert not marker.exists()


def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path):
    saved_lora(tmp_path)
    wider = tiny_model("llama", hidden_size=48)
    with pytest.raises(ValueError) as error:
        PeftModel.from_pretrained(wider, tmp_path)
    assert str(error.value) == (
        f"{tmp_path}: base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight has shape (4, 32) in the adapter "
        "file but (4, 48) in this model (size mismatch); the adapter was trained on a different base model "
        "(load it onto the model it was made for, or pass ignore_mismatched_sizes=True to skip such tensors)"
    )


def test_failed_load_adapter_leaves_no_half_loaded_adapter(tmp_path):
    saved_lora(tmp_path / "small", r=2)
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4))
    weights = load_file(tmp_path / "small" / "adapter_model.safetensors")
    weights["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"] = torch.zeros(16, 3)  # wrong rank
    save_file(weights, tmp_path / "small" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"v_proj.lora_B.weight has shape \(16, 3\) in the adapter file but \(16, 2\)"):
        model.load_adapter(tmp_path / "small", "small")
    assert list(model.peft_config) == ["default"]
    assert not any(".small." in n for n, _ in model.named_parameters())


def test_adapter_of_another_architecture_is_refused(tmp_path):
    saved_lora(tmp_path, arch="opt", target_modules=["fc1"])
    with pytest.raises(ValueError, match=r"target_modules=\['fc1'\] matched no module of LlamaForCausalLM"):
        PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    saved_lora(tmp_path / "opt_q", arch="opt", target_modules=["q_proj"])  # q_proj exists in both: keys differ
    with pytest.raises(
        ValueError,
        match=r"4 tensors in the adapter file have no place in this model, e.g. "
        r"\['base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_A.weight'",
    ):
        PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "opt_q")
    saved_lora(tmp_path / "llama_q", target_modules=["q_proj"])
    weights = load_file(tmp_path / "llama_q" / "adapter_model.safetensors")
    weights["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 32)
    save_file(weights, tmp_path / "llama_q" / "adapter_model.safetensors")
    with pytest.raises(
        ValueError,
        match=r"1 tensors in the adapter file have no place in this model, e.g. "
        r"\['base_model.model.model.layers.0.mlp.up_proj.lora_A.weight'\]",
    ):
        PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "llama_q")


@pytest.mark.parametrize(
    "text, message",
    [
        ("[1, 2]\n", r"adapter_config\.json must hold a JSON object of config fields, not list"),
        ('{"peft_type": "LORA", "r": "eight"}', r"adapter_config\.json: a field has a value of the wrong type"),
    ],
)
def test_config_of_the_wrong_shape_or_types(tmp_path, text, message):
    saved_lora(tmp_path)
    (tmp_path / "adapter_config.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path))


def test_unknown_config_key_warns_and_loads(tmp_path):
    model = saved_lora(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["lora_magic"] = 3
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning) as caught:
        loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert [str(w.message) for w in caught] == [
        "Unexpected keyword arguments ['lora_magic'] for class LoraConfig, these are ignored. "
        f"({tmp_path}/adapter_config.json: keys deltatune does not know)"
    ]
    assert torch.equal(logits(loaded, tiny_inputs("llama")), logits(model, tiny_inputs("llama")))


def test_a_config_without_peft_type_is_refused_like_peft(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"foo": "bar", "r": 8}')
    message = r"^The LoraConfig config that is trying to be loaded is missing required keys: \{'peft_type'\}\."
    with pytest.raises(TypeError, match=message + r" \(.*adapter_config\.json holds no adapter config"):
        LoraConfig.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match=message):
        peft.LoraConfig.from_pretrained(tmp_path)


def test_from_json_file_gives_the_fields_like_peft(tmp_path):
    config = LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
    config.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    fields = LoraConfig.from_json_file(path)
    assert fields == config.to_dict() and fields["r"] == 4
    path.write_text(json.dumps({**fields, "runtime_config": {"ephemeral_gpu_offload": True}}))
    assert LoraConfig.from_json_file(path) == fields  # peft's per-run options are dropped, as in peft


def test_peft_default_keys_do_not_warn(tmp_path, caplog, recwarn):
    theirs = peft.get_peft_model(
        tiny_model("t5", "SEQ_2_SEQ_LM"), peft.LoraConfig(task_type="SEQ_2_SEQ_LM", target_modules="all-linear")
    )
    theirs.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert len(written) > 25  # peft writes every one of its fields
    with caplog.at_level(logging.WARNING, logger="deltatune"):
        loaded = PeftModel.from_pretrained(tiny_model("t5", "SEQ_2_SEQ_LM"), tmp_path)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert not [w for w in recwarn if "Unexpected keyword arguments" in str(w.message)]
    assert loaded.active_peft_config.task_type == TaskType.SEQ_2_SEQ_LM


def test_unknown_peft_type_in_file(tmp_path):
    saved_lora(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["peft_type"] = "VERA"
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"adapter_config.json: peft_type='VERA' is not a method deltatune has; known: LORA"
    ):
        PeftConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "config_dict",
    [
        # The tutorials' LoRA settings as a dict (*用 hugging face 做参数微调* imports get_peft_config too).
        {
            "peft_type": "LORA",
            "task_type": "SEQ_2_SEQ_LM",
            "inference_mode": False,
            "r": 8,
            "lora_alpha": 32,
            "lora_dropout": 0.1,
        },
        # peft's README example (less a field peft has since dropped).
        {
            "peft_type": "PREFIX_TUNING",
            "task_type": "SEQ_2_SEQ_LM",
            "inference_mode": False,
            "num_virtual_tokens": 20,
            "token_dim": 768,
            "num_transformer_submodules": 1,
            "num_attention_heads": 12,
            "num_layers": 12,
            "encoder_hidden_size": 768,
            "prefix_projection": False,
        },
        {"peft_type": "P_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 10, "encoder_hidden_size": 128},
        # Everything peft writes for a LoRA config, its own keys included.
        peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"]).to_dict(),
    ],
)
def test_get_peft_config_builds_the_config_peft_builds(config_dict):
    ours, theirs = get_peft_config(config_dict), peft.get_peft_config(config_dict)
    assert type(ours).__name__ == type(theirs).__name__
    theirs_dict = theirs.to_dict()
    for name, value in ours.to_dict().items():
        expected = theirs_dict[name]
        expected = sorted(expected) if isinstance(expected, set) else getattr(expected, "value", expected)
        assert value == expected, name


def test_get_peft_config_without_peft_type():
    with pytest.raises(KeyError, match="peft_type"):
        peft.get_peft_config({"r": 8})
    with pytest.raises(KeyError, match=r"get_peft_config: the dict has no 'peft_type' \(keys: r\); add one"):
        get_peft_config({"r": 8})


# ---- AutoPeftModel* ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "arch, auto_class, peft_auto, base_class",
    [
        ("llama", AutoPeftModelForCausalLM, peft.AutoPeftModelForCausalLM, AutoModelForCausalLM),
        (
            "bert",
            AutoPeftModelForSequenceClassification,
            peft.AutoPeftModelForSequenceClassification,
            AutoModelForSequenceClassification,
        ),
    ],
)
def test_auto_peft_model_loads_base_and_adapter(tmp_path, arch, auto_class, peft_auto, base_class):
    tiny_model(arch).save_pretrained(tmp_path / "base")
    task = TaskType.SEQ_CLS if arch == "bert" else TaskType.CAUSAL_LM
    model = get_peft_model(
        base_class.from_pretrained(tmp_path / "base"), LoraConfig(task_type=task, r=4, init_lora_weights=False)
    )
    randomize_adapter(model)
    assert model.active_peft_config.base_model_name_or_path == str(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    inputs = tiny_inputs(arch)
    expected = logits(model, inputs)
    loaded = auto_class.from_pretrained(tmp_path / "adapter")
    assert type(loaded).__name__ == (
        "PeftModelForCausalLM" if arch == "llama" else "PeftModelForSequenceClassification"
    )
    torch.testing.assert_close(logits(loaded, inputs), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        logits(peft_auto.from_pretrained(tmp_path / "adapter"), inputs), expected, rtol=0, atol=1e-5
    )


def test_auto_peft_model_without_base_path(tmp_path):
    saved_lora(tmp_path)  # built from a config: no base path to record
    with pytest.raises(ValueError, match=r"adapter_config.json has no base_model_name_or_path; load the base model"):
        AutoPeftModelForCausalLM.from_pretrained(tmp_path)
