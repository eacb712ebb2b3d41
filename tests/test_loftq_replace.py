"""replace_lora_weights_loftq: LoftQ factors for a model loaded straight into 4 bits, checked against peft.

peft 0.21.2's `_loftq_init_new` hard-codes a CUDA compute device; the oracle is its source with that one line set
to "cpu" (as for `loftq_init` in test_lora_init.py).
"""

import json
import logging

import peft
import peft.utils.loftq_utils as peft_loftq
import pytest
import torch
from helpers.peft_on_cpu import loftq_function_on_cpu
from helpers.quant import load, save_tiny_llama
from safetensors.torch import load_file

from deltatune import LoraConfig, get_peft_model, replace_lora_weights_loftq
from deltatune.methods.lora.lora import LoraLayer
from deltatune.quantization import dequantized_weight

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.arange(40).reshape(4, 10) % 100


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    save_tiny_llama(folder)
    return folder


@pytest.fixture
def peft_replace_on_cpu(monkeypatch):
    monkeypatch.setattr(peft_loftq, "_loftq_init_new", loftq_function_on_cpu("_loftq_init_new"))


def ours_4bit(folder, **config):
    return get_peft_model(load(folder, 4), LoraConfig(**{"r": 4, "lora_alpha": 4, "target_modules": TARGETS, **config}))


def lora_layers(model) -> dict[str, LoraLayer]:
    return {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer)}


def factors(model) -> dict[str, torch.Tensor]:
    return {
        f"{n}.{k}": getattr(m.adapters["default"], k).weight.detach().clone()
        for n, m in lora_layers(model).items()
        for k in ("lora_A", "lora_B")
    }


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_factors_and_logits_equal_peft(model_dir, peft_replace_on_cpu):
    ours = ours_4bit(model_dir)
    theirs = peft.get_peft_model(load(model_dir, 4), peft.LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS))
    assert replace_lora_weights_loftq(ours, model_path=str(model_dir)) == list(lora_layers(ours))
    peft_loftq.replace_lora_weights_loftq(theirs, model_path=str(model_dir))
    theirs_factors = {
        n.removeprefix("base_model.model.").replace(".default.weight", ""): p.detach()
        for n, p in theirs.named_parameters()
        if "lora_" in n
    }
    ours_factors = factors(ours)
    assert ours_factors.keys() == theirs_factors.keys() and len(ours_factors) == 28
    for name, value in ours_factors.items():
        assert torch.equal(value, theirs_factors[name]), name
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=0)


def test_adapter_carries_the_quantisation_error(model_dir):
    """B A is the best rank-r fit of W - Q: what is left of W - Q is exactly its singular values past r, and
    the logits come closer to the full-precision model's (by 13% here: a random weight's quantisation error is
    close to full rank, so rank 4 of 64 takes a small part of it)."""
    original = load(model_dir)
    ours = ours_4bit(model_dir)
    quantized_error = (logits(ours) - logits(original)).abs().mean()
    replace_lora_weights_loftq(ours, model_path=model_dir)
    for name, layer in lora_layers(ours).items():
        error = original.get_submodule(name).weight - dequantized_weight(layer.base_layer)
        singular = torch.linalg.svdvals(error)
        left = (error - layer.adapters["default"].delta_weight()).norm()
        torch.testing.assert_close(left, singular[4:].norm(), rtol=1e-4, atol=1e-6)
    assert (logits(ours) - logits(original)).abs().mean() < 0.9 * quantized_error


def test_default_path_is_the_local_folder_the_model_came_from(model_dir):
    ours, other = ours_4bit(model_dir), ours_4bit(model_dir)
    replace_lora_weights_loftq(ours)  # config._name_or_path is model_dir
    replace_lora_weights_loftq(other, model_path=model_dir / "model.safetensors")  # the file itself
    expected = factors(other)
    for name, value in factors(ours).items():
        assert torch.equal(value, expected[name]), name


def test_sharded_checkpoint_is_read_through_its_index(model_dir, tmp_path):
    load(model_dir).save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and not (tmp_path / "model.safetensors").exists()
    sharded, single = ours_4bit(model_dir), ours_4bit(model_dir)
    replace_lora_weights_loftq(sharded, model_path=tmp_path)
    replace_lora_weights_loftq(single, model_path=model_dir)
    expected = factors(single)
    for name, value in factors(sharded).items():
        assert torch.equal(value, expected[name]), name


def test_callback_returning_false_rolls_that_layer_back(model_dir):
    ours = ours_4bit(model_dir)
    before = factors(ours)
    seen = []

    def keep_attention_only(model, name):
        assert model is ours
        seen.append(name)
        return "self_attn" in name

    kept = replace_lora_weights_loftq(ours, model_path=model_dir, callback=keep_attention_only)
    assert seen == list(lora_layers(ours)) and kept == [n for n in seen if "self_attn" in n] and len(kept) == 8
    after = factors(ours)
    for name, value in after.items():
        assert torch.equal(value, before[name]) == ("mlp" in name), name


def test_a_second_adapter_is_set_by_name_and_the_first_is_left(model_dir):
    ours = ours_4bit(model_dir)
    ours.add_adapter("other", LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]))
    before = factors(ours)
    assert replace_lora_weights_loftq(ours, model_path=model_dir, adapter_name="other") == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    assert all(torch.equal(v, before[n]) for n, v in factors(ours).items())  # "default" untouched
    q_proj = lora_layers(ours)["model.layers.0.self_attn.q_proj"]
    assert q_proj.adapters["other"].lora_A.weight.shape == (2, 64)
    assert q_proj.adapters["other"].lora_B.weight.abs().sum() > 0


def test_scale_other_than_one_warns_as_peft_fits_at_scale_one(model_dir, caplog):
    ours = ours_4bit(model_dir, lora_alpha=8)
    with caplog.at_level(logging.WARNING, logger="deltatune"):
        replace_lora_weights_loftq(ours, model_path=model_dir)
    assert "set lora_alpha = r" in caplog.text


def test_bad_inputs_name_the_problem_and_the_fix(model_dir, tmp_path):
    full_precision = get_peft_model(load(model_dir), LoraConfig(r=4, target_modules=TARGETS))
    with pytest.raises(
        ValueError,
        match=r"no LoRA adapter 'default' on a bitsandbytes 4-bit layer: load the base "
        r"with load_in_4bit",
    ):
        replace_lora_weights_loftq(full_precision, model_path=model_dir)
    with pytest.raises(ValueError, match=r"found no LoRA adapter 'missing'"):
        replace_lora_weights_loftq(ours_4bit(model_dir), model_path=model_dir, adapter_name="missing")
    with pytest.raises(
        FileNotFoundError,
        match=r"no model.safetensors or model.safetensors.index.json at .*pass "
        r"model_path= the folder of the unquantised model",
    ):
        replace_lora_weights_loftq(ours_4bit(model_dir), model_path=tmp_path)
    with pytest.raises(ValueError, match=r"the model's name_or_path 'some/hub-id' is not a local folder"):
        hub_named = ours_4bit(model_dir)
        hub_named.get_base_model().config._name_or_path = "some/hub-id"
        replace_lora_weights_loftq(hub_named)
    with pytest.raises(ValueError, match=r"DoRA adapter, whose magnitude would no longer match"):
        replace_lora_weights_loftq(ours_4bit(model_dir, use_dora=True), model_path=model_dir)


def test_a_file_of_another_model_is_refused_by_tensor_name(model_dir, tmp_path):
    state = load_file(model_dir / "model.safetensors")
    from safetensors.torch import save_file

    save_file({k: v for k, v in state.items() if "q_proj" not in k}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({}))
    with pytest.raises(
        KeyError,
        match=r"holds no tensor 'model.layers.0.self_attn.q_proj.weight' or "
        r"'layers.0.self_attn.q_proj.weight': is it the full-precision version",
    ):
        replace_lora_weights_loftq(ours_4bit(model_dir), model_path=tmp_path)
