"""LoraConfig(lora_bias=True): a trainable bias on B beside the low-rank product, checked against peft.

h = W x + b + s (B A x + b_B)        merged: b <- b + s b_B
"""

import re

import peft
import pytest
import torch
from helpers.models import tiny_inputs, tiny_model
from helpers.peft_pairs import copy_to_peft, logits, lora_pair, randomize_adapter
from safetensors.torch import load_file

from deltatune import AdaLoraConfig, LoraConfig, PeftModel, PeftWarning, get_peft_model
from deltatune.methods.lora.lora import LoraLayer

ATOL = 1e-5
# bloom and qwen2 adapt biased nn.Linear layers, gpt2 a biased Conv1D
TARGETS = {"bloom": ["query_key_value", "dense_4h_to_h"], "qwen2": ["q_proj", "v_proj"], "gpt2": ["c_attn", "c_fc"]}


def bias_pair(arch: str, **kwargs):
    ours, theirs = lora_pair(arch, r=4, lora_alpha=8, target_modules=TARGETS[arch], lora_bias=True, **kwargs)
    randomize_adapter(ours)
    copy_to_peft(ours, theirs)
    return ours, theirs


def lora_biases(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if n.endswith("lora_B.default.bias") or n.endswith("lora_B.bias")}


@pytest.mark.parametrize("arch", sorted(TARGETS))
def test_outputs_gradients_and_counts_equal_peft(arch):
    ours, theirs = bias_pair(arch)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert len(lora_biases(ours)) == 4
    inputs = tiny_inputs(arch)
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), rtol=0, atol=ATOL)
    for model in (ours, theirs):  # eval mode: gpt2's own dropout would draw differently in the two
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
    peft_grads = {n.replace(".default", ""): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for name, param in ours.named_parameters():
        if param.requires_grad:
            key = name.replace(".adapters.default", "")
            torch.testing.assert_close(param.grad, peft_grads[key], rtol=0, atol=ATOL, msg=key)
    assert all(b.grad.abs().sum() > 0 for b in lora_biases(ours).values())


def test_default_init_zeroes_the_bias_and_the_model_starts_at_the_base():
    base = tiny_model("bloom")
    model = get_peft_model(tiny_model("bloom"), LoraConfig(target_modules=TARGETS["bloom"], lora_bias=True))
    assert all(torch.equal(b, torch.zeros_like(b)) for b in lora_biases(model).values())
    inputs = tiny_inputs("bloom")
    torch.testing.assert_close(logits(model, inputs), logits(base, inputs), rtol=0, atol=0)


def test_the_bias_alone_shifts_the_output_by_scale_times_bias():
    model = get_peft_model(
        tiny_model("bloom"), LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value"], lora_bias=True)
    )
    layer = model.base_model.model.transformer.h[0].self_attention.query_key_value
    adapter = layer.adapters["default"]
    with torch.no_grad():
        adapter.lora_B.bias.copy_(torch.linspace(-1, 1, 96))
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x) + 2.0 * adapter.lora_B.bias, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["bloom", "gpt2"])
def test_merge_adds_the_scaled_bias_like_peft_and_unmerge_restores(arch):
    ours, theirs = bias_pair(arch)
    inputs = tiny_inputs(arch)
    unmerged = logits(ours, inputs)
    base_biases = {n: p.detach().clone() for n, p in ours.named_parameters() if n.endswith("base_layer.bias")}
    ours.merge_adapter()
    theirs.merge_adapter()
    torch.testing.assert_close(logits(ours, inputs), unmerged, rtol=0, atol=ATOL)
    peft_biases = dict(theirs.named_parameters())
    for name, bias in base_biases.items():
        now = dict(ours.named_parameters())[name]
        assert not torch.equal(now, bias), name  # the merge moved the base bias
        torch.testing.assert_close(now, peft_biases[name], rtol=0, atol=1e-6, msg=name)
    ours.unmerge_adapter()
    for name, bias in base_biases.items():
        torch.testing.assert_close(dict(ours.named_parameters())[name], bias, rtol=0, atol=1e-6, msg=name)
    merged = ours.merge_and_unload()
    torch.testing.assert_close(logits(merged, inputs), unmerged, rtol=0, atol=ATOL)


def test_a_base_without_bias_warns_and_refuses_to_merge():
    warning = (
        "`lora_bias=True` was passed but the targeted layer of type Linear has no bias: adapter 'default' will work "
        "unmerged but cannot be merged"
    )
    with pytest.warns(PeftWarning, match=re.escape(warning)):
        model = get_peft_model(
            tiny_model("llama"), LoraConfig(target_modules=["q_proj"], lora_bias=True, init_lora_weights=False)
        )
    weight = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    with pytest.raises(
        RuntimeError,
        match=r"Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias: adapter 'default', "
        r"base layer Linear; keep it unmerged",
    ):
        model.merge_adapter()
    assert torch.equal(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, weight)


def test_files_hold_peft_keys_and_load_both_ways(tmp_path):
    ours, theirs = bias_pair("qwen2")
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    ours_file, peft_file = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "theirs"))
    assert ours_file.keys() == peft_file.keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias" in ours_file
    for key, value in ours_file.items():
        assert torch.equal(value, peft_file[key]), key
    inputs = tiny_inputs("qwen2")
    expected = logits(ours, inputs)
    from_peft = PeftModel.from_pretrained(tiny_model("qwen2"), tmp_path / "theirs")
    assert from_peft.peft_config["default"].lora_bias is True
    torch.testing.assert_close(logits(from_peft, inputs), expected, rtol=0, atol=ATOL)
    into_peft = peft.PeftModel.from_pretrained(tiny_model("qwen2"), tmp_path / "ours")
    torch.testing.assert_close(logits(into_peft, inputs), expected, rtol=0, atol=ATOL)


def test_mixed_batch_with_a_bias_adapter_equals_each_adapter_alone():
    model, _ = bias_pair("bloom")
    model.add_adapter("plain", LoraConfig(r=4, target_modules=TARGETS["bloom"], init_lora_weights=False))
    inputs = tiny_inputs("bloom")
    names = ["default", "plain", "__base__"]
    mixed = logits(model, inputs, adapter_names=names)
    for row, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                alone = logits(model, inputs)
        else:
            model.set_adapter(name)
            alone = logits(model, inputs)
        torch.testing.assert_close(mixed[row], alone[row], rtol=0, atol=ATOL, msg=name)


def test_refusals_name_the_option_and_the_fix():
    with pytest.raises(
        ValueError,
        match=r"The argument lora_bias=True is only supported with init_lora_weights=True or False \(as in peft\), "
        r"got init_lora_weights='pissa'",
    ):
        LoraConfig(lora_bias=True, init_lora_weights="pissa")
    with pytest.raises(
        ValueError, match=r"The argument lora_bias=True is not supported for DoRA, please pass use_dora=False"
    ):
        LoraConfig(lora_bias=True, use_dora=True)
    with pytest.raises(ValueError, match=r"AdaLoraConfig does not support lora_bias=True"):
        AdaLoraConfig(lora_bias=True, total_step=10)
    with pytest.raises(
        ValueError,
        match=r"lora_bias=True is not supported for Embedding \(as in peft\), and adapter 'default' targets one",
    ):
        get_peft_model(tiny_model("llama"), LoraConfig(target_modules=["embed_tokens"], lora_bias=True))
    model, _ = bias_pair("bloom")
    model.add_adapter("other", LoraConfig(target_modules=TARGETS["bloom"]))
    with pytest.raises(ValueError, match=r"cannot combine adapters with lora_bias set \('default'\)"):
        model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "both", combination_type="cat")
    assert not any(isinstance(m, LoraLayer) and "both" in m.adapters for m in model.modules())
