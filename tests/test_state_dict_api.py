"""peft's low-level adapter API (get/set_peft_model_state_dict, get/set_base_model_state_dict,
inject_adapter_in_model), compared with real peft on tiny models."""

import copy
import warnings

import peft
import pytest
import torch
from helpers.models import tiny_inputs, tiny_model
from helpers.peft_pairs import copy_to_peft, lora_pair, randomize_adapter
from helpers.prompts import make_pair
from torch import nn
from transformers import AutoModelForCausalLM

import deltatune
from deltatune import (
    LoraConfig,
    PeftModel,
    PeftWarning,
    PromptTuningConfig,
    get_base_model_state_dict,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)


def assert_same_tensors(mine: dict, theirs: dict) -> None:
    assert sorted(mine) == sorted(theirs)
    for key, value in mine.items():
        torch.testing.assert_close(value, theirs[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize(
    "settings",
    [
        dict(r=4, init_lora_weights=False),
        dict(r=4, init_lora_weights=False, use_dora=True),
        dict(r=4, init_lora_weights=False, bias="all", modules_to_save=["lm_head"]),
    ],
    ids=["lora", "dora", "bias-all-modules-to-save"],
)
def test_lora_state_dict_equals_peft(settings):
    ours, theirs = lora_pair("llama", **settings)
    randomize_adapter(ours)
    copy_to_peft(ours, theirs)
    assert_same_tensors(get_peft_model_state_dict(ours), peft.get_peft_model_state_dict(theirs))


def test_another_adapter_name_is_not_in_the_keys_as_peft():
    ours, theirs = lora_pair("llama", r=4, init_lora_weights=False)
    ours.add_adapter("other", LoraConfig(task_type="CAUSAL_LM", r=2, init_lora_weights=False))
    theirs.add_adapter("other", peft.LoraConfig(task_type="CAUSAL_LM", r=2, init_lora_weights=False))
    peft.set_peft_model_state_dict(theirs, get_peft_model_state_dict(ours, adapter_name="other"), "other")
    mine = get_peft_model_state_dict(ours, adapter_name="other")
    assert_same_tensors(mine, peft.get_peft_model_state_dict(theirs, adapter_name="other"))
    assert all(v.shape[0] == 2 for k, v in mine.items() if "lora_A" in k)  # the r=2 adapter, not "default"
    with pytest.raises(ValueError, match=r"adapter_name='nope' is not an adapter of this model; it has: default"):
        get_peft_model_state_dict(ours, adapter_name="nope")


def test_prompt_tuning_state_dict_equals_peft():
    ours, theirs = make_pair(
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        "llama",
        "CAUSAL_LM",
    )
    mine = get_peft_model_state_dict(ours)
    assert list(mine) == ["prompt_embeddings"]
    assert_same_tensors(mine, peft.get_peft_model_state_dict(theirs))


@pytest.mark.parametrize("save_embedding_layers", ["auto", True, False])
def test_targeted_embeddings_are_saved_as_peft_saves_them(save_embedding_layers):
    settings = dict(r=4, init_lora_weights=False, target_modules=["q_proj", "embed_tokens"])
    ours, theirs = lora_pair("llama", **settings)
    copy_to_peft(ours, theirs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mine = get_peft_model_state_dict(ours, save_embedding_layers=save_embedding_layers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model_state_dict(theirs, save_embedding_layers=save_embedding_layers)
    assert_same_tensors(mine, reference)
    saved = "base_model.model.model.embed_tokens.base_layer.weight" in mine
    assert saved == (save_embedding_layers != False)  # noqa: E712 ("auto" counts as yes here)
    told = any("embedding layers found in `target_modules`" in str(w.message) for w in caught)
    assert told == (save_embedding_layers == "auto")


def test_untargeted_embeddings_are_saved_only_when_asked():
    ours, theirs = lora_pair("llama", r=4, init_lora_weights=False)
    copy_to_peft(ours, theirs)
    mine = get_peft_model_state_dict(ours, save_embedding_layers=True)
    assert_same_tensors(mine, peft.get_peft_model_state_dict(theirs, save_embedding_layers=True))
    assert "base_model.model.model.embed_tokens.weight" in mine and "base_model.model.lm_head.weight" in mine
    assert not any("embed_tokens" in k for k in get_peft_model_state_dict(ours))  # "auto": vocab not resized


def test_set_peft_model_state_dict_reports_keys_as_peft():
    source, _ = lora_pair("llama", r=4, init_lora_weights=False)
    randomize_adapter(source)
    state = get_peft_model_state_dict(source)
    given = dict(state)
    target, theirs = lora_pair("llama", seed=9, r=4, init_lora_weights=False)
    result = set_peft_model_state_dict(target, state)
    assert state == given  # the caller's dict is left as it was
    assert not result.unexpected_keys
    assert not any("lora" in k for k in result.missing_keys)
    assert "base_model.model.lm_head.weight" in result.missing_keys  # base weights are listed, as torch and peft do
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(target(**inputs).logits, source(**inputs).logits, rtol=0, atol=0)
    reference = peft.set_peft_model_state_dict(theirs, state)
    assert not reference.unexpected_keys and not any("lora" in k for k in reference.missing_keys)


def test_set_peft_model_state_dict_lists_unknown_and_missing_keys_without_raising():
    model, _ = lora_pair("llama", r=4)
    state = get_peft_model_state_dict(model)
    dropped = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    del state[dropped]
    state["base_model.model.model.layers.0.self_attn.q_proj.lora_Z.weight"] = torch.zeros(2)
    result = set_peft_model_state_dict(model, state)
    assert result.unexpected_keys == ["base_model.model.model.layers.0.self_attn.q_proj.lora_Z.weight"]
    assert "base_model.model.model.layers.0.self_attn.q_proj.adapters.default.lora_A.weight" in result.missing_keys


def test_set_peft_model_state_dict_size_mismatch_raises_or_is_skipped():
    model, _ = lora_pair("llama", r=4)
    state = get_peft_model_state_dict(model)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    state[key] = torch.zeros(3, state[key].shape[1])
    with pytest.raises(RuntimeError, match=r"lora_A.weight has shape \(3, 32\) .* \(size mismatch\)"):
        set_peft_model_state_dict(model, state)
    with pytest.warns(UserWarning, match="ignore_mismatched_sizes=True"):
        set_peft_model_state_dict(model, state, ignore_mismatched_sizes=True)


def test_load_adapter_returns_peft_load_result(tmp_path):
    model, _ = lora_pair("llama", r=4, init_lora_weights=False)
    model.save_pretrained(tmp_path)
    result = model.load_adapter(tmp_path, adapter_name="other")
    assert result.missing_keys == [] and result.unexpected_keys == []
    reference = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path).load_adapter(tmp_path, "other")
    assert reference.missing_keys == []


class Dummy(nn.Module):
    """peft's test_low_level_api model: an embedding and three linear layers."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(10, 10)
        self.linear = nn.Linear(10, 10)
        self.linear2 = nn.Linear(10, 10)
        self.lm_head = nn.Linear(10, 10)

    def forward(self, input_ids):
        return self.lm_head(self.linear(self.embedding(input_ids)))


def injected(library, seed: int, **settings):
    torch.manual_seed(0)
    model = Dummy()
    torch.manual_seed(seed)
    config = library.LoraConfig(target_modules=["linear"], init_lora_weights=False, **settings)
    return library.inject_adapter_in_model(config, model)


def test_inject_adapter_in_model_round_trip_and_keys_as_peft():
    ours = injected(deltatune, seed=1, modules_to_save=["linear2"])
    assert ours.peft_config["default"].target_modules == {"linear"}
    trainable = sorted(n for n, p in ours.named_parameters() if p.requires_grad)
    assert trainable == [
        "linear.adapters.default.lora_A.weight",
        "linear.adapters.default.lora_B.weight",
        "linear2.modules_to_save.default.bias",
        "linear2.modules_to_save.default.weight",
    ]
    theirs = injected(peft, seed=1, modules_to_save=["linear2"])
    state = get_peft_model_state_dict(ours)
    assert sorted(state) == sorted(peft.get_peft_model_state_dict(theirs))
    assert not any(k.startswith("base_model") for k in state)
    again = injected(deltatune, seed=2, modules_to_save=["linear2"])
    ids = torch.tensor([[0, 1, 2, 3]])
    assert not torch.equal(again(ids), ours(ids))
    result = set_peft_model_state_dict(again, state)
    assert not result.unexpected_keys and not any("lora" in k for k in result.missing_keys)
    torch.testing.assert_close(again(ids), ours(ids), rtol=0, atol=0)
    peft.set_peft_model_state_dict(theirs, state)  # peft reads our keys
    torch.testing.assert_close(theirs(ids), ours(ids), rtol=0, atol=1e-6)


def test_inject_targets_the_modules_a_state_dict_names():
    state = peft.get_peft_model_state_dict(injected(peft, seed=1))  # keys made by peft
    model = inject_adapter_in_model(LoraConfig(target_modules=["lm_head"]), Dummy(), state_dict=state)
    assert model.peft_config["default"].target_modules == {"linear"}
    assert sorted(get_peft_model_state_dict(model)) == sorted(state)


def test_inject_refuses_prompt_methods():
    with pytest.raises(ValueError, match="does not support PROMPT_TUNING.*use get_peft_model"):
        inject_adapter_in_model(PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2), tiny_model("llama"))


def test_a_wrapper_is_looked_through():
    class Wrapper(nn.Module):  # DDP's layout: the model at `.module`, keys prefixed with `module.`
        def __init__(self, module):
            super().__init__()
            self.module = module

    model, _ = lora_pair("llama", r=4, init_lora_weights=False)
    expected = get_peft_model_state_dict(model)
    assert_same_tensors(get_peft_model_state_dict(Wrapper(model)), expected)
    compiled = torch.compile(model)  # keys gain `_orig_mod.`; nothing is compiled before a forward
    assert_same_tensors(get_peft_model_state_dict(compiled, unwrap_compiled=True), expected)
    assert not set_peft_model_state_dict(Wrapper(compiled), expected).unexpected_keys


def test_base_model_state_dict_has_the_original_keys_as_peft():
    base = tiny_model("llama")
    original = {k: v.clone() for k, v in base.state_dict().items()}
    ours, theirs = lora_pair("llama", r=4, modules_to_save=["lm_head"])
    mine = get_base_model_state_dict(ours)
    assert_same_tensors(mine, original)
    assert_same_tensors(mine, peft.get_base_model_state_dict(theirs))
    with torch.no_grad():
        ours.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.add_(1.0)
    result = set_base_model_state_dict(ours, original)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert_same_tensors(get_base_model_state_dict(ours), original)
    del original["lm_head.weight"]
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \['lm_head.weight'\]"):
        set_base_model_state_dict(ours, original)
    assert set_base_model_state_dict(ours, original, strict=False).missing_keys == ["lm_head.weight"]


def test_base_model_state_dict_leaves_out_adaloras_ranknum_as_peft():
    # AdaLoRA keeps a frozen `ranknum` parameter beside each layer's base weight: adapter state, not base.
    config = dict(init_r=4, target_r=2, total_step=10, target_modules=["q_proj", "v_proj"])
    ours = get_peft_model(tiny_model("llama"), deltatune.AdaLoraConfig(**config))
    theirs = peft.get_peft_model(tiny_model("llama"), peft.AdaLoraConfig(**config))
    mine = get_base_model_state_dict(ours)
    assert not any("ranknum" in key for key in mine)
    assert_same_tensors(mine, peft.get_base_model_state_dict(theirs))
    assert_same_tensors(mine, tiny_model("llama").state_dict())


def test_unsharded_lora_tensors_warn_with_peft_warning(tmp_path):
    model = get_peft_model(copy.deepcopy(Dummy()), LoraConfig(target_modules=["linear"], r=4))
    model.get_base_model().linear.adapters["default"].lora_A.weight.data = torch.zeros(40)
    assert issubclass(PeftWarning, UserWarning)
    with pytest.warns(PeftWarning, match="DeepSpeed ZeRO-3 / FSDP shards were not gathered"):
        get_peft_model_state_dict(model)


def test_loading_skips_mismatched_sizes_only_when_asked(tmp_path):
    # peft's case: an adapter on an embedding that was resized since (100 -> 105 rows)
    model, _ = lora_pair("llama", r=4, init_lora_weights=False, target_modules=["q_proj", "embed_tokens"])
    model.save_pretrained(tmp_path, save_embedding_layers=False)
    resized = tiny_model("llama")
    resized.resize_token_embeddings(105)
    with pytest.raises(RuntimeError, match=r"size mismatch.*ignore_mismatched_sizes=True") as error:
        PeftModel.from_pretrained(copy.deepcopy(resized), tmp_path)
    assert "(100, 4)" in str(error.value) or "(4, 100)" in str(error.value)
    with pytest.warns(UserWarning, match="skipped 1 tensors whose shape differs"):
        loaded = PeftModel.from_pretrained(resized, tmp_path, ignore_mismatched_sizes=True, low_cpu_mem_usage=True)
    q_proj = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    torch.testing.assert_close(get_peft_model_state_dict(loaded)[q_proj], get_peft_model_state_dict(model)[q_proj])
    result = loaded.load_adapter(tmp_path, "other", ignore_mismatched_sizes=True, low_cpu_mem_usage=True)
    assert len(result.missing_keys) == 1 and "embed_tokens.adapters.other.lora_embedding_" in result.missing_keys[0]


def test_a_model_adapted_by_peft_itself_is_refused_with_the_fix():
    with pytest.raises(TypeError, match="holds peft's own adapter layers .*use peft's get/set_peft_model_state_dict"):
        get_peft_model_state_dict(injected(peft, seed=1))


def test_save_pretrained_saves_the_values_of_a_given_state_dict(tmp_path):
    model, _ = lora_pair("llama", r=4)
    state = {k: torch.ones_like(v) if ".lora_B." in k else v for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path, state_dict=state)
    saved = PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path))
    assert all(torch.all(v == 1) for k, v in get_peft_model_state_dict(saved).items() if "lora_B" in k)
    assert not any(torch.all(v == 1) for k, v in get_peft_model_state_dict(model).items() if "lora_B" in k)


def test_auto_saves_the_embeddings_of_a_resized_vocabulary_as_peft(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "base")  # the base model's config.json: vocab_size=100
    models = []
    for library in (deltatune, peft):
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")  # its name_or_path is recorded in the config
        base.resize_token_embeddings(104, mean_resizing=False)
        models.append(library.get_peft_model(base, library.LoraConfig(r=4)))
    with pytest.warns(UserWarning, match="embedding layer has been resized"):
        mine = get_peft_model_state_dict(models[0])
    assert "base_model.model.model.embed_tokens.weight" in mine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert sorted(mine) == sorted(peft.get_peft_model_state_dict(models[1]))
