"""LoRA against HF peft (the oracle) on tiny random models: same modules, counts, initial values, logits, files.

Adapters are made non-zero (init_lora_weights=False, then every trainable tensor randomised), so a forward
that ignored the update, or a key that loaded into the wrong place, would change the logits.
"""

import copy
import math

import peft
import pytest
import torch
from helpers.models import COMMON_ARCHS, DEFAULT_TASK, tiny_config, tiny_inputs, tiny_model
from helpers.peft_pairs import (
    ATOL,
    PARITY_ARCHS,
    assert_same_logits,
    copy_to_peft,
    logits,
    lora_pair,
    randomize_adapter,
    trained_pair,
    wrapped_names,
)
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

import deltatune
from deltatune import LoraConfig, NoMatchingPeftModuleError, PeftModel, TaskType, get_peft_model
from deltatune.core.tuner_model import TunerModel
from deltatune.methods.lora.lora import DEFAULT_TARGET_MODULES, LoraLayer
from deltatune.ops.lora_dispatch import use_fast_paths


# ---- parity with peft, per architecture ------------------------------------------------------------------------
@pytest.mark.parametrize("arch", PARITY_ARCHS)
def test_same_weights_give_peft_logits_and_counts(arch):
    ours, theirs = trained_pair(arch)
    inputs = tiny_inputs(arch)
    assert_same_logits(ours, theirs, inputs)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert set(ours.get_adapter_state_dict()) == set(peft.get_peft_model_state_dict(theirs))
    with ours.disable_adapter():  # the adapter really changes the output
        assert (logits(ours, inputs) - logits(theirs, inputs)).abs().max() > 1e-3


@pytest.mark.parametrize("arch", PARITY_ARCHS)
def test_adapter_files_load_across_libraries(arch, tmp_path):
    ours, theirs = trained_pair(arch)
    inputs = tiny_inputs(arch)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    peft_reads_ours = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path / "ours")
    we_read_peft = PeftModel.from_pretrained(tiny_model(arch), tmp_path / "peft")
    assert (
        type(we_read_peft)
        is deltatune.core.task_models.MODEL_TYPE_TO_PEFT_MODEL[TaskType(DEFAULT_TASK.get(arch, "CAUSAL_LM"))]
    )
    assert_same_logits(peft_reads_ours, ours, inputs)
    assert_same_logits(we_read_peft, theirs, inputs)
    assert we_read_peft.get_nb_trainable_parameters()[0] == 0  # loaded for inference: frozen


@pytest.mark.parametrize("arch", PARITY_ARCHS)
def test_merged_equals_unmerged_and_unmerge_restores_the_base(arch):
    ours, _ = trained_pair(arch)
    inputs = tiny_inputs(arch)
    base_weights = {n: p.detach().clone() for n, p in ours.named_parameters() if "base_layer" in n}
    expected = logits(ours, inputs)
    ours.merge_adapter()
    assert any(not torch.equal(p, base_weights[n]) for n, p in ours.named_parameters() if n in base_weights)
    torch.testing.assert_close(logits(ours, inputs), expected, rtol=0, atol=ATOL)
    ours.unmerge_adapter()
    for name, param in ours.named_parameters():
        if name in base_weights:
            torch.testing.assert_close(param, base_weights[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(ours, inputs), expected, rtol=0, atol=ATOL)
    merged = ours.merge_and_unload()
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, inputs), expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_matches_peft_merged_and_unmerged(dtype):
    """fp32 adapters over a half-precision base (as peft); a merge adds in fp32 and rounds once, like peft."""
    base = tiny_model("llama").to(dtype)
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, init_lora_weights=False, target_modules="all-linear"))
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=4, init_lora_weights=False, target_modules="all-linear"))
    assert {p.dtype for p in ours.parameters() if p.requires_grad} == {torch.float32}
    randomize_adapter(ours)
    copy_to_peft(ours, theirs)
    inputs = tiny_inputs("llama")
    assert torch.equal(logits(ours, inputs), logits(theirs, inputs))
    kw = dict(input_ids=inputs["input_ids"][:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(**kw), theirs.generate(**kw))  # the per-generate plan, half precision
    ours.merge_adapter()
    theirs.merge_adapter()
    assert torch.equal(logits(ours, inputs), logits(theirs, inputs))


@pytest.mark.parametrize(
    "arch, target_modules",
    [("gpt2", ["c_attn", "c_fc"]), ("llama", ["embed_tokens", "q_proj"]), ("llama", "all-linear")],
)
def test_bf16_base_reference_path_rounds_once_like_peft(arch, target_modules):
    """Conv1D and embeddings take the reference path: base + fp32 update is rounded to bf16 once, as in peft."""
    base = tiny_model(arch).to(torch.bfloat16)
    config = dict(r=4, init_lora_weights=False, target_modules=target_modules)
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(**config))
    theirs = peft.get_peft_model(base, peft.LoraConfig(**config))
    randomize_adapter(ours)
    copy_to_peft(ours, theirs)
    inputs = tiny_inputs(arch)
    with use_fast_paths(False):
        assert torch.equal(logits(ours, inputs), logits(theirs, inputs))
    assert torch.equal(logits(ours, inputs), logits(theirs, inputs))


# ---- which modules are adapted ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "arch, target_modules",
    [
        ("llama", ["q_proj", "down_proj"]),  # names
        ("llama", ["self_attn.v_proj", "model.layers.1.mlp.up_proj"]),  # dotted suffix, full name
        ("bloom", r".*\.1.*query_key_value"),  # the tutorials' regex (full match)
        ("llama", r".*layers\.0\.(self_attn|mlp)\.(q|up)_proj"),
        ("llama", "all-linear"),
        ("gpt2", "all-linear"),
        ("t5", "all-linear"),
        ("bert", "all-linear"),
        ("opt", "all-linear"),
    ],
)
def test_target_modules_select_the_same_modules_as_peft(arch, target_modules):
    ours, theirs = lora_pair(arch, target_modules=target_modules)
    expected = wrapped_names(theirs, peft.tuners.lora.LoraLayer)
    assert expected and wrapped_names(ours, LoraLayer) == expected
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_all_linear_leaves_the_lm_head_and_adds_a_second_adapter_to_the_same_layers():
    model = get_peft_model(tiny_model("llama"), LoraConfig(target_modules="all-linear", r=2))
    first = wrapped_names(model, LoraLayer)
    assert "lm_head" not in first and len(first) == 2 * 7
    model.add_adapter("second", LoraConfig(target_modules="all-linear", r=2))
    assert wrapped_names(model, LoraLayer) == first  # no LoRA inside LoRA (lora_A is an nn.Linear too)
    assert all("second" in model.get_submodule(f"base_model.model.{n}").adapters for n in first)


@pytest.mark.parametrize("arch", COMMON_ARCHS)
def test_default_targets_per_architecture_equal_peft(arch):
    model_type = tiny_config(arch).model_type
    assert DEFAULT_TARGET_MODULES[model_type] == TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type]
    ours, theirs = lora_pair(arch)
    expected = wrapped_names(theirs, peft.tuners.lora.LoraLayer)
    assert expected and wrapped_names(ours, LoraLayer) == expected
    assert ours.active_peft_config.target_modules == set(DEFAULT_TARGET_MODULES[model_type])  # in the config, as peft
    assert ours.active_peft_config.target_modules == theirs.active_peft_config.target_modules


@pytest.mark.parametrize(
    "target_modules, exclude_modules",
    [
        ("all-linear", ["down_proj", "model.layers.0.self_attn.q_proj"]),
        (["q_proj", "v_proj", "up_proj"], r".*\.1\..*"),
        (["q_proj", "v_proj"], {"v_proj"}),
    ],
)
def test_exclude_modules_leaves_out_what_peft_leaves_out(target_modules, exclude_modules, tmp_path):
    ours, theirs = lora_pair("llama", target_modules=target_modules, exclude_modules=exclude_modules)
    expected = wrapped_names(theirs, peft.tuners.lora.LoraLayer)
    assert expected and wrapped_names(ours, LoraLayer) == expected
    theirs.save_pretrained(tmp_path)  # peft's file names the exclusions: loading it wraps the same modules
    assert wrapped_names(PeftModel.from_pretrained(tiny_model("llama"), tmp_path), LoraLayer) == expected


def test_exclude_modules_that_remove_every_target_are_refused():
    with pytest.raises(
        ValueError,
        match=r"All modules were excluded: exclude_modules=\['q_proj'\] removes every module "
        r"target_modules=\['q_proj'\] "
        r"selects \(model.layers.0.self_attn.q_proj, .*exclude fewer modules",
    ):
        get_peft_model(tiny_model("llama"), LoraConfig(target_modules=["q_proj"], exclude_modules=["q_proj"]))


@pytest.mark.parametrize("layers, pattern", [([1], None), (0, "layers"), ([0, 1], ["layers"])])
def test_layers_to_transform_like_peft(layers, pattern):
    ours, theirs = lora_pair(
        "llama", target_modules=["q_proj", "v_proj"], layers_to_transform=layers, layers_pattern=pattern
    )
    expected = wrapped_names(theirs, peft.tuners.lora.LoraLayer)
    assert wrapped_names(ours, LoraLayer) == expected
    assert ours.peft_config["default"].layers_to_transform == layers  # an int stays an int, as in peft
    wanted = [layers] if isinstance(layers, int) else layers
    assert {int(n.split(".")[2]) for n in expected} == set(wanted)


def test_modules_to_save_makes_a_trainable_copy_saved_with_the_adapter():
    ours, theirs = lora_pair("bloom", modules_to_save=["word_embeddings"], target_modules=["query_key_value"])
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    wrapper = ours.get_base_model().transformer.word_embeddings
    assert wrapper.original_module.weight.requires_grad is False
    assert wrapper.modules_to_save["default"].weight.requires_grad is True
    keys = set(ours.get_adapter_state_dict())
    assert keys == set(peft.get_peft_model_state_dict(theirs))
    assert "base_model.model.transformer.word_embeddings.weight" in keys


# ---- options ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", [True, "gaussian", False])
def test_init_lora_weights_draws_what_peft_draws(init):
    ours, theirs = lora_pair("llama", init_lora_weights=init, target_modules=["q_proj", "embed_tokens"], r=4)
    mine, reference = ours.get_adapter_state_dict(), peft.get_peft_model_state_dict(theirs)
    assert set(mine) == set(reference) - {"base_model.model.model.embed_tokens.base_layer.weight"}
    for key in mine:
        assert torch.equal(mine[key], reference[key]), key
    inputs = tiny_inputs("llama")
    with ours.disable_adapter():
        base = logits(ours, inputs)
    if init is False:
        assert (logits(ours, inputs) - base).abs().max() > 1e-3
        assert all(v.abs().sum() > 0 for v in mine.values())
    else:  # B (or embedding A) starts at zero: the adapted model starts equal to the base
        assert torch.equal(logits(ours, inputs), base)
        a = mine["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
        if init == "gaussian":
            assert 0.1 < a.std().item() < 0.5  # normal with std 1/r = 0.25
        else:
            assert a.abs().max() <= 1 / math.sqrt(32)  # Kaiming-uniform bound with a=sqrt(5): 1/sqrt(fan_in)


@pytest.mark.parametrize("use_rslora, expected_scale", [(False, 16 / 4), (True, 16 / 2)])
def test_use_rslora_scale(use_rslora, expected_scale):
    ours, theirs = lora_pair("llama", r=4, lora_alpha=16, use_rslora=use_rslora, init_lora_weights=False)
    layer = ours.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.adapters["default"].scaling == expected_scale
    copy_to_peft(ours, theirs)
    assert_same_logits(ours, theirs, tiny_inputs("llama"))


def test_rank_and_alpha_patterns_like_peft():
    ours, theirs = lora_pair(
        "llama",
        target_modules=["q_proj", "v_proj"],
        r=4,
        lora_alpha=8,
        init_lora_weights=False,
        rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
        alpha_pattern={"q_proj": 24},
    )
    for name in wrapped_names(ours, LoraLayer):
        adapter = ours.get_base_model().get_submodule(name).adapters["default"]
        reference = theirs.get_base_model().get_submodule(name)
        assert adapter.lora_A.weight.shape == reference.lora_A["default"].weight.shape, name
        assert adapter.scaling == reference.scaling["default"], name
    layers = ours.get_base_model().model.layers
    assert [layers[i].self_attn.q_proj.adapters["default"].lora_A.out_features for i in (0, 1)] == [4, 6]
    assert layers[0].self_attn.v_proj.adapters["default"].lora_A.out_features == 2
    randomize_adapter(ours)
    copy_to_peft(ours, theirs)
    assert_same_logits(ours, theirs, tiny_inputs("llama"))


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
@pytest.mark.parametrize("arch", ["bloom", "opt"])
def test_bias_option_counts_and_saved_keys_like_peft(arch, bias):
    ours, theirs = trained_pair(arch, bias=bias)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    keys = set(ours.get_adapter_state_dict())
    assert keys == set(peft.get_peft_model_state_dict(theirs))
    bias_keys = {k for k in keys if k.endswith("bias")}
    assert (len(bias_keys) > 0) == (bias != "none")
    assert_same_logits(ours, theirs, tiny_inputs(arch))


def test_bias_all_with_a_classifier_head_counts_like_peft():
    """peft also writes the frozen head's bias and a second copy of the trained one; we write neither but read both."""
    ours, theirs = trained_pair("bert", bias="all")
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    peft_only = {"base_model.model.classifier.original_module.bias", "base_model.model.classifier.modules_to_save.bias"}
    assert set(ours.get_adapter_state_dict()) == set(peft.get_peft_model_state_dict(theirs)) - peft_only


def test_embedding_lora_matches_peft_and_files_load_both_ways(tmp_path):
    ours, theirs = trained_pair("llama", target_modules=["embed_tokens", "v_proj"])
    layer = ours.get_base_model().model.embed_tokens
    assert isinstance(layer, LoraLayer) and layer.kind == "embedding"
    inputs = tiny_inputs("llama")
    assert_same_logits(ours, theirs, inputs)
    theirs.save_pretrained(tmp_path / "peft")  # peft adds the base embedding matrix to such files
    ours.save_pretrained(tmp_path / "ours")
    assert_same_logits(PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "peft"), ours, inputs)
    assert_same_logits(peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "ours"), ours, inputs)
    ours.merge_adapter()
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), rtol=0, atol=ATOL)


def test_layers_expose_peft_attribute_layout():
    """Code written against peft reads `layer.lora_A["default"].weight`, `lora_embedding_A`, `scaling`."""
    ours, theirs = trained_pair("llama", target_modules=["embed_tokens", "v_proj"], lora_alpha=16)
    ours.add_adapter("other", LoraConfig(r=2, lora_alpha=2, target_modules=["v_proj"]))
    theirs.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["v_proj"]))
    mine, peft_layer = (m.get_base_model().model.layers[0].self_attn.v_proj for m in (ours, theirs))
    assert mine.scaling == peft_layer.scaling == {"default": 4.0, "other": 1.0}
    assert set(mine.lora_A) == set(mine.lora_B) == {"default", "other"}
    torch.testing.assert_close(mine.lora_A["default"].weight, peft_layer.lora_A["default"].weight, rtol=0, atol=0)
    for name in ("default", "other"):  # "other" is freshly drawn in each library: shapes only
        assert mine.lora_B[name].weight.shape == peft_layer.lora_B[name].weight.shape
        assert mine.lora_A[name] is mine.adapters[name].lora_A  # a view: training through it trains the adapter
    embed, peft_embed = (m.get_base_model().model.embed_tokens for m in (ours, theirs))
    torch.testing.assert_close(embed.lora_embedding_B["default"], peft_embed.lora_embedding_B["default"])
    assert mine.lora_embedding_A == {} and set(embed.lora_A) == set()


def test_embedding_lora_on_a_scaled_embedding_matches_peft_merged_and_unmerged():
    """Gemma 3's embedding multiplies by embed_scale in its forward; peft scales the update too."""
    base = tiny_model("gemma3", tie_word_embeddings=False)
    lora = dict(r=4, init_lora_weights=False, target_modules=["embed_tokens", "q_proj"])
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(**lora))
    theirs = peft.get_peft_model(base, peft.LoraConfig(**lora))
    randomize_adapter(ours)
    copy_to_peft(ours, theirs)
    inputs = tiny_inputs("llama")
    expected = logits(theirs, inputs)
    assert_same_logits(ours, theirs, inputs)
    ours.merge_adapter()
    torch.testing.assert_close(logits(ours, inputs), expected, rtol=0, atol=ATOL)


def test_gpt2_conv1d_sets_fan_in_fan_out_and_matches_peft():
    ours, theirs = trained_pair("gpt2", target_modules=["c_attn", "c_proj", "c_fc"])
    assert {ours.get_base_model().get_submodule(n).kind for n in wrapped_names(ours, LoraLayer)} == {"conv1d"}
    assert ours.peft_config["default"].fan_in_fan_out is theirs.peft_config["default"].fan_in_fan_out is True
    assert_same_logits(ours, theirs, tiny_inputs("gpt2"))


def test_lora_dropout_only_in_training_mode():
    model = get_peft_model(tiny_model("llama"), LoraConfig(lora_dropout=0.5, init_lora_weights=False))
    inputs = tiny_inputs("llama")
    model.eval()
    assert torch.equal(logits(model, inputs), logits(model, inputs))
    model.train()
    assert not torch.equal(logits(model, inputs), logits(model, inputs))


# ---- bad settings --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("r", [0, -2])
def test_rank_must_be_positive(r):
    with pytest.raises(ValueError, match=rf"r={r} must be a positive integer \(the LoRA rank\); try r=8"):
        LoraConfig(r=r)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5])
def test_dropout_must_be_in_zero_one(dropout):
    with pytest.raises(ValueError, match=rf"lora_dropout={dropout} is outside \[0.0, 1.0\); use a dropout probability"):
        LoraConfig(lora_dropout=dropout)


def test_unknown_task_type_lists_the_known_ones():
    with pytest.raises(
        ValueError,
        match="Invalid task type: 'CAUSAL'. Must be one of the following task types: SEQ_CLS, SEQ_2_SEQ_LM, CAUSAL_LM",
    ):
        LoraConfig(task_type="CAUSAL")


def test_unknown_bias_and_init_are_refused():
    with pytest.raises(ValueError, match="bias='some' is not known; use 'none', 'all' or 'lora_only'"):
        LoraConfig(bias="some")
    with pytest.raises(ValueError, match="init_lora_weights='svd' is not known; use True, False, 'gaussian', 'pissa'"):
        LoraConfig(init_lora_weights="svd")


def test_target_matching_nothing_lists_the_module_names():
    model = tiny_model("llama")
    with pytest.raises(NoMatchingPeftModuleError) as error:  # a ValueError, as in peft
        get_peft_model(model, LoraConfig(target_modules=["query_key_value"]))
    message = str(error.value)
    assert message.startswith(
        "Target modules ['query_key_value'] not found in the base model: target_modules=['query_key_value'] matched "
        "no module of LlamaForCausalLM;"
    )
    for name in ("q_proj", "v_proj", "down_proj", "embed_tokens"):
        assert name in message
    assert not any(isinstance(m, LoraLayer) for m in model.modules())  # nothing half-applied


def test_layers_to_transform_with_a_regex_is_refused():
    with pytest.raises(ValueError, match="layers_to_transform cannot be used with a string target_modules"):
        LoraConfig(target_modules=r".*q_proj", layers_to_transform=[0])


def test_layers_pattern_needs_layers_to_transform():
    with pytest.raises(
        ValueError,
        match=r"layers_pattern='layers' only tells where the layer index is; give "
        r"layers_to_transform=\[...\] too",
    ):
        LoraConfig(target_modules=["q_proj"], layers_pattern="layers")


def test_modules_to_save_matching_nothing_is_refused_before_any_change():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"modules_to_save=\['head'\] matched no module; modules with weights"):
        get_peft_model(model, LoraConfig(modules_to_save=["head"]))
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


def test_a_failed_add_adapter_leaves_the_model_as_it_was():
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=2))
    names = {n for n, _ in model.named_parameters()}
    with pytest.raises(ValueError, match="modules_to_save"):
        model.add_adapter("second", LoraConfig(modules_to_save=["head"]))
    with pytest.raises(ValueError, match="matched no module"):
        model.add_adapter("second", LoraConfig(target_modules=["nope"]))
    with pytest.raises(TypeError, match="not LlamaRMSNorm"):  # fails after q_proj got its adapter: undone
        model.add_adapter("second", LoraConfig(target_modules=["q_proj", "input_layernorm"]))
    assert list(model.peft_config) == ["default"]
    assert {n for n, _ in model.named_parameters()} == names


def test_unsupported_target_type_is_named():
    with pytest.raises(TypeError, match="LoRA supports nn.Linear, Conv1D, nn.Embedding, nn.Conv1d.* not LlamaRMSNorm"):
        get_peft_model(tiny_model("llama"), LoraConfig(target_modules=["input_layernorm"]))


@pytest.mark.parametrize("wrapper", [PeftModel, TunerModel])
def test_attributes_read_before_init_finishes_raise_attribute_error(wrapper):
    """DeepSpeed ZeRO-3's zero.Init reads attributes of a module before its __init__ has run."""
    unfinished = wrapper.__new__(wrapper)
    with pytest.raises(AttributeError):
        _ = unfinished.peft_config
    assert not hasattr(unfinished, "training")


def test_targeted_names_are_recorded_and_an_unused_exclude_warns_like_peft():
    with pytest.warns(UserWarning, match=r"You have passed exclude_modules=\['nothere'\] but no modules were excluded"):
        model = get_peft_model(tiny_model("llama"), LoraConfig(target_modules=["q_proj"], exclude_modules=["nothere"]))
    assert model.targeted_module_names == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    model.add_adapter("other", LoraConfig(target_modules=["v_proj", "q_proj"]))
    assert model.base_model.targeted_module_names == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.v_proj",
    ]


def test_a_pattern_key_matching_no_target_warns_like_peft():
    config = LoraConfig(target_modules=["q_proj"], rank_pattern={"q_proj": 4, "typo_key": 2}, alpha_pattern={"q": 3})
    with pytest.warns(RuntimeWarning) as caught:
        get_peft_model(tiny_model("llama"), config)
    assert sorted(str(w.message) for w in caught) == [
        "The following alpha_pattern keys did not match any targeted module and were ignored: ['q'].",
        "The following rank_pattern keys did not match any targeted module and were ignored: ['typo_key'].",
    ]


@pytest.mark.parametrize("arch, target", [("llama", "q_proj"), ("llama", "embed_tokens"), ("gpt2", "c_attn")])
def test_layers_print_under_peft_names(arch, target):
    ours, theirs = lora_pair(arch, target_modules=[target])
    mine = next(m for n, m in ours.named_modules() if n.endswith(target))
    peft_layer = next(m for n, m in theirs.named_modules() if n.endswith(target))
    assert repr(mine).split("(")[0] == repr(peft_layer).split("(")[0]  # lora.Linear / lora.Embedding
