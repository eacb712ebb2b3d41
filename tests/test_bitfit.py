"""BitFit: only bias terms train (plus the task head of a classifier); same wrapper, files and printing as LoRA."""

import json

import pytest
import torch
from helpers.models import tiny_inputs, tiny_model
from helpers.peft_pairs import logits, randomize_adapter
from safetensors.torch import load_file

from deltatune import BitFitConfig, LoraConfig, PeftModel, TaskType, get_peft_model

CAUSAL = TaskType.CAUSAL_LM


def bias_names(model) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.endswith("bias")}


def trainable_names(model) -> set[str]:
    prefix = "base_model.model."
    return {n[len(prefix) :] for n, p in model.named_parameters() if p.requires_grad}


def trained_bitfit(arch="bloom", **config_kwargs):
    model = get_peft_model(
        tiny_model(arch), BitFitConfig(task_type=config_kwargs.pop("task_type", CAUSAL), **config_kwargs)
    )
    randomize_adapter(model, scale=0.5)
    return model


def test_freezes_everything_but_the_biases():
    base = tiny_model("bloom")
    expected = bias_names(base)
    bias_values = sum(p.numel() for n, p in base.named_parameters() if n in expected)
    all_values = sum(p.numel() for p in base.parameters())
    model = get_peft_model(base, BitFitConfig(task_type=CAUSAL))
    assert trainable_names(model) == expected
    assert model.get_nb_trainable_parameters() == (bias_values, all_values)


def test_print_trainable_parameters_uses_peft_line(capsys):
    model = get_peft_model(tiny_model("bloom"), BitFitConfig(task_type=CAUSAL))
    trainable, total = model.get_nb_trainable_parameters()
    model.print_trainable_parameters()
    assert capsys.readouterr().out == (
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}\n"
    )


@pytest.mark.parametrize(
    "pattern, expected",
    [
        (["query_key_value"], lambda n: ".query_key_value." in n),
        (["self_attention.dense", "dense_4h_to_h"], lambda n: n.endswith(("self_attention.dense.bias", "h_to_h.bias"))),
        (r".*\.1\..*mlp.*bias", lambda n: ".1.mlp." in n),
    ],
)
def test_bias_pattern_list_or_regex(pattern, expected):
    base = tiny_model("bloom")
    wanted = {n for n in bias_names(base) if expected(n)}
    model = get_peft_model(base, BitFitConfig(task_type=CAUSAL, bias_pattern=pattern))
    assert wanted and trainable_names(model) == wanted


def test_bias_pattern_matching_nothing_lists_modules_with_biases():
    with pytest.raises(ValueError) as error:
        get_peft_model(tiny_model("bloom"), BitFitConfig(bias_pattern=["q_proj"]))
    message = str(error.value)
    assert message.startswith("BitFit found no bias parameter matching bias_pattern=['q_proj'] in BloomForCausalLM;")
    assert "modules with a bias here:" in message and "query_key_value" in message


def test_model_without_biases_is_refused():
    with pytest.raises(ValueError, match="BitFit found no bias parameter in LlamaForCausalLM; this model has no bias"):
        get_peft_model(tiny_model("llama"), BitFitConfig())


def test_disable_adapter_and_unload_restore_the_original_biases():
    model = trained_bitfit()
    inputs = tiny_inputs("bloom")
    original = tiny_model("bloom")
    base_logits, trained_logits = logits(original, inputs), logits(model, inputs)
    assert (trained_logits - base_logits).abs().max() > 1e-3
    with model.disable_adapter():
        assert torch.equal(logits(model, inputs), base_logits)
    assert torch.equal(logits(model, inputs), trained_logits)  # the trained biases are back
    restored = model.unload()
    for name, param in original.named_parameters():
        assert torch.equal(dict(restored.named_parameters())[name], param), name
    get_peft_model(restored, BitFitConfig())  # the unloaded model takes a new BitFit adapter


def test_merge_and_unload_keeps_the_trained_biases():
    model = trained_bitfit()
    inputs = tiny_inputs("bloom")
    expected = logits(model, inputs)
    merged = model.merge_and_unload()
    assert type(merged).__name__ == "BloomForCausalLM"
    assert torch.equal(logits(merged, inputs), expected)


def test_file_round_trip(tmp_path):
    model = trained_bitfit()
    inputs = tiny_inputs("bloom")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "BITFIT" and config["task_type"] == "CAUSAL_LM"
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert set(saved) == {f"base_model.model.{n}" for n in bias_names(tiny_model("bloom"))}
    loaded = PeftModel.from_pretrained(tiny_model("bloom"), tmp_path)
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))
    assert loaded.get_nb_trainable_parameters()[0] == 0
    with loaded.disable_adapter():  # originals were kept before the file's values were copied in
        assert torch.equal(logits(loaded, inputs), logits(tiny_model("bloom"), inputs))
    trainable = PeftModel.from_pretrained(tiny_model("bloom"), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters() == model.get_nb_trainable_parameters()


def test_classifier_trains_its_head_too(tmp_path):
    """As in the paper (and as peft does for LoRA), the fresh classification head trains in full."""
    model = trained_bitfit("bert", task_type=TaskType.SEQ_CLS)
    assert model.active_peft_config.modules_to_save == ["classifier", "score"]
    trainable = trainable_names(model)
    assert {"classifier.modules_to_save.default.weight", "classifier.modules_to_save.default.bias"} <= trainable
    assert all(n.endswith("bias") for n in trainable - {"classifier.modules_to_save.default.weight"})
    assert not any("original_module" in n for n in trainable)
    inputs = tiny_inputs("bert")
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.classifier.weight" in saved
    loaded = PeftModel.from_pretrained(tiny_model("bert"), tmp_path)
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))
    with loaded.disable_adapter():
        assert torch.equal(logits(loaded, inputs), logits(tiny_model("bert"), inputs))


def test_one_bitfit_adapter_per_base_and_no_mixing_with_lora():
    model = get_peft_model(tiny_model("bloom"), BitFitConfig())
    with pytest.raises(ValueError, match="only one BitFit adapter fits on one base"):
        model.add_adapter("second", BitFitConfig())
    assert list(model.peft_config) == ["default"]
    with pytest.raises(ValueError, match="this model holds BITFIT adapters; a LORA adapter needs its own base model"):
        model.add_adapter("lora", LoraConfig())


def test_mixed_batch_with_base_rows_is_refused():
    model = trained_bitfit()
    with pytest.raises(ValueError, match="BitFit trains the base biases in place, so one batch cannot mix"):
        model(**tiny_inputs("bloom"), adapter_names=["default", "__base__", "default"])
    torch.testing.assert_close(
        logits(model, tiny_inputs("bloom"), adapter_names=["default"] * 3),
        logits(model, tiny_inputs("bloom")),
        rtol=0,
        atol=0,
    )
