"""(IA)³ against peft (the oracle) on tiny random models: counts, outputs, files both ways, merging, several
adapters, mixed batches, 4/8-bit bases, convolutions and bad configs.

Vectors start random (init_ia3_weights=False, drawn from the same seed in both libraries), so a forward that
ignored a vector, or a key that loaded into the wrong place, would change the logits.
"""

import copy
import warnings

import peft
import pytest
import torch
from helpers.models import COMMON_ARCHS, DEFAULT_TASK, tiny_inputs, tiny_model
from peft.utils import (
    TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
)
from torch import nn
from transformers import LlamaForCausalLM

from deltatune import IA3Config, LoraConfig, NoMatchingPeftModuleError, PeftModel, get_peft_model
from deltatune.methods.ia3 import DEFAULT_TARGET_MODULES, FEEDFORWARD_MODULES, IA3Layer
from deltatune.methods.lora.lora import DEFAULT_TARGET_MODULES as LORA_DEFAULTS

pytestmark = [
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False"),  # peft's note on GPT-2's Conv1D
    pytest.mark.filterwarnings("ignore:Unmerge result can be inaccurate"),
]
# Every architecture of the tiny-model helpers has peft defaults for (IA)^3: bias-free Linear (llama), Linear
# with biases (opt, bloom), Conv1D (gpt2), encoders with a classifier head (bert, roberta), t5's encoder-decoder.
ARCHS = COMMON_ARCHS


def both(base, **kwargs):
    """(peft model, deltatune model) on copies of `base`, each vector drawn from the same seed."""
    kwargs.setdefault("task_type", DEFAULT_TASK.get(base.config.model_type, "CAUSAL_LM"))
    kwargs.setdefault("init_ia3_weights", False)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**kwargs))
    torch.manual_seed(1)
    ours = get_peft_model(copy.deepcopy(base), IA3Config(**kwargs))
    return theirs, ours


def logits(model, **inputs) -> torch.Tensor:
    """The logits for the tiny inputs of the model's architecture (or for `inputs`)."""
    inputs = inputs or tiny_inputs(model.config.model_type)
    with torch.no_grad():
        return model(**inputs).logits


def layers(model) -> dict[str, IA3Layer]:
    return {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, IA3Layer)}


@pytest.mark.parametrize("arch", ARCHS)
def test_default_targets_counts_and_logits_equal_peft(arch, capsys):
    base = tiny_model(arch)
    theirs, ours = both(base)
    peft_layers = {n for n, m in theirs.get_base_model().named_modules() if isinstance(m, peft.tuners.ia3.IA3Layer)}
    assert set(layers(ours)) == peft_layers and len(peft_layers) >= 4  # the default targets, as peft chooses them
    theirs.print_trainable_parameters()
    ours.print_trainable_parameters()
    peft_line, our_line = capsys.readouterr().out.strip().splitlines()
    assert our_line == peft_line
    assert ours.peft_config["default"].fan_in_fan_out == theirs.peft_config["default"].fan_in_fan_out
    assert ours.peft_config["default"].feedforward_modules == theirs.peft_config["default"].feedforward_modules
    assert set(ours.get_adapter_state_dict()) == set(peft.get_peft_model_state_dict(theirs))
    assert torch.equal(logits(ours), logits(theirs))
    change = (logits(ours) - logits(base)).abs().max()
    assert change > 1e-2 * logits(base).abs().max()  # the vectors really change the output


@pytest.mark.parametrize("arch", ARCHS)
def test_vector_shapes_follow_feedforward_modules(arch):
    _, ours = both(tiny_model(arch))
    for name, layer in layers(ours).items():
        vector = layer.adapters["default"].ia3_l
        feedforward = name.endswith(tuple(FEEDFORWARD_MODULES[ours.config.model_type]))
        assert vector.shape == ((1, layer.in_features) if feedforward else (layer.out_features, 1)), name


def test_default_init_is_ones_and_starts_equal_to_base():
    base = tiny_model("llama")
    ours = get_peft_model(copy.deepcopy(base), IA3Config(task_type="CAUSAL_LM"))
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in ours.named_parameters() if "ia3_l" in n)
    assert torch.equal(logits(ours), logits(base))


def test_feedforward_scales_the_input_and_attention_the_output():
    """The formulas: down_proj(x) = W (l ⊙ x), k_proj(x) = l ⊙ (W x)."""
    _, ours = both(tiny_model("llama"))
    x = torch.randn(2, 3, 64)
    down = ours.get_base_model().model.layers[0].mlp.down_proj
    expected = torch.nn.functional.linear(x * down.adapters["default"].ia3_l, down.base_layer.weight)
    torch.testing.assert_close(down(x), expected)
    k = ours.get_base_model().model.layers[0].self_attn.k_proj
    x = torch.randn(2, 3, 32)
    expected = k.base_layer(x) * k.adapters["default"].ia3_l.flatten()
    torch.testing.assert_close(k(x), expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_files_load_across_libraries(arch, tmp_path):
    base = tiny_model(arch)
    theirs, ours = both(base)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # our config file holds only fields peft knows
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        peft_reads_ours = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    we_read_peft = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    assert torch.equal(logits(peft_reads_ours), logits(ours))
    assert torch.equal(logits(we_read_peft), logits(theirs))
    assert we_read_peft.get_nb_trainable_parameters()[0] == 0  # loaded for inference: frozen
    assert we_read_peft.peft_config["default"].feedforward_modules == theirs.peft_config["default"].feedforward_modules


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_equals_peft_and_unmerge_restores_the_base(arch):
    theirs, ours = both(tiny_model(arch))
    base_weights = {n: p.detach().clone() for n, p in ours.named_parameters() if "base_layer" in n}
    expected = logits(ours)
    ours.merge_adapter()
    theirs.merge_adapter()
    peft_params = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        if name in base_weights:
            assert torch.equal(param, peft_params[name]), name  # same products, same rounding
    assert any(not torch.equal(p, base_weights[n]) for n, p in ours.named_parameters() if n in base_weights)
    torch.testing.assert_close(logits(ours), expected, rtol=1e-4, atol=1e-5)
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do"):  # peft's warning
        ours.merge_adapter()  # and nothing is merged twice
    torch.testing.assert_close(logits(ours), expected, rtol=1e-4, atol=1e-5)
    with pytest.warns(UserWarning, match=r"Unmerge result can be inaccurate for \(IA\)\^3"):
        ours.unmerge_adapter()
    for name, param in ours.named_parameters():
        if name in base_weights:  # divided by l + 1e-8 again: exact up to rounding (and 1e-8 / l)
            torch.testing.assert_close(param, base_weights[name], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(logits(ours), expected, rtol=1e-4, atol=1e-5)
    merged = ours.merge_and_unload()
    assert not any(isinstance(m, IA3Layer) for m in merged.modules())
    torch.testing.assert_close(logits(merged), expected, rtol=1e-4, atol=1e-5)


def test_disable_adapter_gives_the_base_also_when_merged():
    base = tiny_model("opt")
    _, ours = both(base)
    adapted = logits(ours)
    with ours.disable_adapter():
        torch.testing.assert_close(logits(ours), logits(base), rtol=0, atol=1e-6)
    ours.merge_adapter()
    with ours.disable_adapter(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(logits(ours), logits(base), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits(ours), adapted, rtol=1e-4, atol=1e-5)


def test_safe_merge_refuses_a_vector_with_nan_and_merges_nothing_there():
    _, ours = both(tiny_model("llama"))
    layer = ours.get_base_model().model.layers[1].self_attn.v_proj
    before = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.adapters["default"].ia3_l[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default seems to be broken"):
        ours.merge_adapter(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, before) and not layer.merged_adapters


def test_two_adapters_switch_and_multiply_like_peft():
    base = tiny_model("gpt2")
    theirs, ours = both(base)
    for model, config_class in ((theirs, peft.IA3Config), (ours, IA3Config)):
        torch.manual_seed(2)
        model.add_adapter("other", config_class(task_type="CAUSAL_LM", init_ia3_weights=False))
    assert torch.equal(logits(ours), logits(theirs))  # "default" still active
    theirs.set_adapter("other")
    ours.set_adapter("other")
    assert torch.equal(logits(ours), logits(theirs))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    theirs.base_model.set_adapter(["default", "other"])
    ours.base_model.set_adapter(["default", "other"])
    assert torch.equal(logits(ours), logits(theirs))  # both vectors, multiplied


def test_mixed_batch_rows_equal_each_adapter_alone():
    base = tiny_model("llama")
    _, ours = both(base)
    torch.manual_seed(2)
    ours.add_adapter("other", IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False))
    alone = {}
    for name in ("default", "other"):
        ours.set_adapter(name)
        alone[name] = logits(ours)
    alone["__base__"] = logits(base)
    rows = ["other", "__base__", "default"]  # one per row of the tiny inputs
    with torch.no_grad():
        mixed = ours(**tiny_inputs("llama"), adapter_names=rows).logits
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], alone[name][i], rtol=1e-4, atol=1e-5)


def test_half_precision_base_keeps_fp32_vectors_and_peft_outputs():
    theirs, ours = both(tiny_model("llama").to(torch.bfloat16), init_ia3_weights=True)
    assert all(p.dtype == torch.float32 for n, p in ours.named_parameters() if "ia3_l" in n)
    with torch.no_grad():  # non-trivial values, the same in both
        for name, layer in layers(ours).items():
            vector = torch.linspace(0.5, 1.5, layer.adapters["default"].ia3_l.numel())
            layer.adapters["default"].ia3_l.copy_(vector.view_as(layer.adapters["default"].ia3_l))
            theirs.get_base_model().get_submodule(name).ia3_l["default"].copy_(layer.adapters["default"].ia3_l)
    assert torch.equal(logits(ours), logits(theirs))


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_base_equals_peft_and_merge_and_unload_dequantizes(bits, tmp_path):
    pytest.importorskip("bitsandbytes")
    from deltatune.quantization import bitsandbytes_config

    tiny_model("llama").save_pretrained(tmp_path)
    quant = bitsandbytes_config(load_in_4bit=bits == 4, load_in_8bit=bits == 8, compute_dtype=torch.float32)
    base = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map={"": "cpu"}).train()
    theirs, ours = both(base)
    assert type(layers(ours)["model.layers.0.mlp.down_proj"].base_layer).__name__.startswith("Linear")
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="Cannot merge ia3 layers when the model is loaded in"):
        ours.merge_adapter()
    expected = logits(ours)
    merged = ours.merge_and_unload()  # dequantised first, so the merge is exact
    assert not any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in merged.modules())
    torch.testing.assert_close(logits(merged), expected, rtol=1e-4, atol=1e-4)


def test_default_tables_are_peft_s_for_the_architectures_lora_knows():
    for model_type in set(LORA_DEFAULTS) & set(TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING):
        assert DEFAULT_TARGET_MODULES[model_type] == TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING[model_type]
        assert FEEDFORWARD_MODULES[model_type] == TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING[model_type]
    assert set(DEFAULT_TARGET_MODULES) == set(LORA_DEFAULTS) & set(TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING)


def test_feedforward_modules_must_be_a_subset_of_target_modules():
    kwargs = dict(target_modules=["k_proj", "v_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ValueError, match="`feedforward_modules` should be a subset of `target_modules`") as peft_err:
        peft.IA3Config(**kwargs)
    with pytest.raises(ValueError, match="`feedforward_modules` should be a subset of `target_modules`") as err:
        IA3Config(**kwargs)
    assert str(err.value).startswith(str(peft_err.value))
    assert "['down_proj']" in str(err.value)
    IA3Config(target_modules=".*proj", feedforward_modules=["down_proj"])  # a regex is not checked (as peft)


def test_bad_configs_are_refused_by_type_and_message():
    gpt2 = tiny_model("gpt2")
    gpt2.config.model_type = "unknown-arch"
    with pytest.raises(ValueError, match="Please specify `target_modules` in `peft_config`"):
        get_peft_model(copy.deepcopy(gpt2), IA3Config())
    with pytest.raises(ValueError, match="Please specify `feedforward_modules` in `peft_config`"):
        get_peft_model(copy.deepcopy(gpt2), IA3Config(target_modules=["c_attn"]))
    get_peft_model(copy.deepcopy(gpt2), IA3Config(target_modules=["c_attn"], feedforward_modules=[]))
    with pytest.raises(NoMatchingPeftModuleError, match="Target modules .* not found in the base model"):
        get_peft_model(tiny_model("llama"), IA3Config(target_modules=["nope"]))
    with pytest.raises(TypeError, match="IA3 supports nn.Linear, Conv1D, nn.Conv2d, nn.Conv3d and .* not Embedding"):
        get_peft_model(tiny_model("llama"), IA3Config(target_modules=["embed_tokens"], feedforward_modules=[]))
    lora = get_peft_model(tiny_model("llama"), LoraConfig(target_modules=["k_proj"]))
    with pytest.raises(ValueError, match="holds LORA adapters; a IA3 adapter needs its own base model"):
        lora.add_adapter("ia3", IA3Config())


def test_feedforward_names_match_as_suffix_or_regex_like_peft():
    base = tiny_model("llama")
    for targets, feedforward in (
        (["k_proj", "down_proj", "proj"], ["proj"]),  # "proj" ends every name: all scale their input
        (["k_proj", "down_proj"], "model\\.layers\\.1\\.self_attn\\.k_proj"),
    ):
        theirs, ours = both(base, target_modules=targets, feedforward_modules=feedforward)
        for name, layer in layers(ours).items():
            peft_layer = theirs.get_base_model().get_submodule(name)
            assert layer.adapters["default"].feedforward == peft_layer.is_feedforward, (feedforward, name)
        assert torch.equal(logits(ours), logits(theirs))


class ConvNet(nn.Module):
    """Two convolutions (`first`, `second`: grouped when asked) and a linear head."""

    def __init__(self, conv: type[nn.Module], groups: int) -> None:
        super().__init__()
        self.first = conv(4, 8, 3, padding=1)
        self.second = conv(8, 8, 3, groups=groups)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.second(torch.relu(self.first(x)))  # (B, 8, spatial...)
        return self.head(hidden.flatten(2).mean(-1))


@pytest.mark.parametrize(("conv", "groups"), [(nn.Conv2d, 1), (nn.Conv2d, 4), (nn.Conv3d, 1)])
def test_convolutions_equal_peft_unmerged_and_merged(conv, groups):
    torch.manual_seed(0)
    base = ConvNet(conv, groups).eval()
    x = torch.randn((2, 4, 6, 6) if conv is nn.Conv2d else (2, 4, 5, 5, 5))
    kwargs = dict(target_modules=["first", "second"], feedforward_modules=["second"], init_ia3_weights=False)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**kwargs))
    torch.manual_seed(1)
    ours = get_peft_model(copy.deepcopy(base), IA3Config(**kwargs))
    assert ours.base_model.model.second.adapters["default"].ia3_l.shape == (1, 8) + (1,) * (x.dim() - 2)
    assert set(ours.get_adapter_state_dict()) == set(peft.get_peft_model_state_dict(theirs))
    with torch.no_grad():
        expected = theirs(x)
        assert torch.equal(ours(x), expected)
        assert (ours(x) - base(x)).abs().max() > 1e-3
        ours.merge_adapter()
        theirs.merge_adapter()
        for name, param in theirs.named_parameters():
            if "base_layer" in name:
                assert torch.equal(dict(ours.named_parameters())[name], param), name
        torch.testing.assert_close(ours(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_add_weighted_adapter_sums_vectors_like_peft(arch):
    theirs, ours = both(tiny_model(arch), target_modules=None)
    for model, config_class in ((theirs, peft.IA3Config), (ours, IA3Config)):
        torch.manual_seed(2)
        kwargs = {"target_modules": ["c_attn"], "feedforward_modules": []} if arch == "gpt2" else {}
        model.add_adapter("other", config_class(task_type="CAUSAL_LM", init_ia3_weights=False, **kwargs))
        model.add_weighted_adapter(["default", "other"], [0.3, 0.7], "mix")
        model.set_adapter("mix")
    assert ours.peft_config["mix"].target_modules == theirs.peft_config["mix"].target_modules
    assert ours.peft_config["mix"].feedforward_modules == theirs.peft_config["mix"].feedforward_modules
    assert torch.equal(logits(ours), logits(theirs))
    for name, layer in layers(ours).items():  # the formula, layer by layer
        parts = [(w, layer.adapters[n].ia3_l) for n, w in (("default", 0.3), ("other", 0.7)) if n in layer.adapters]
        assert torch.allclose(layer.adapters["mix"].ia3_l, sum(w * v for w, v in parts)), name


def test_add_weighted_adapter_refuses_lora_options_and_unequal_lengths():
    _, ours = both(tiny_model("llama"))
    with pytest.raises(ValueError, match=r"combine linearly .* combination_type='cat'"):
        ours.add_weighted_adapter(["default"], [1.0], "mix", combination_type="cat")
    with pytest.raises(ValueError, match="1 adapters but 2 weights"):
        ours.add_weighted_adapter(["default"], [1.0, 2.0], "mix")
    with pytest.raises(ValueError, match="Adapter missing does not exist"):
        ours.add_weighted_adapter(["missing"], [1.0], "mix")
    assert list(ours.peft_config) == ["default"]
