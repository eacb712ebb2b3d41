"""PeftModel's adapter management on plain nn.Module models, against real peft: positional inputs, several
active adapters, deleting the last adapter, adapter dtypes, the per-layer API, and the refusals peft makes."""

import copy
import re

import peft
import pytest
import torch
from torch import nn

import deltatune
from deltatune import LoraConfig, PeftWarning, get_peft_model
from deltatune.core.layers import ModulesToSaveWrapper


class MLP(nn.Module):
    """A model whose forward takes one positional tensor, as vision and custom models do."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 2, bias=bias)

    def forward(self, X):
        return self.lin1(self.relu(self.lin0(X)))


class HeadReadsWeight(nn.Module):
    """Uses its head's weight directly (F.linear on `self.head.weight`), never calling the head's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.head = nn.Linear(20, 2)

    def forward(self, X):
        return torch.nn.functional.linear(self.lin0(X), self.head.weight, self.head.bias)


class WithGRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.gru = nn.GRU(20, 20, batch_first=True)

    def forward(self, X):
        out, _ = self.gru(self.lin0(X).unsqueeze(1))
        return out.squeeze(1)


def pair(model_class=MLP, seed: int = 0, **lora_kwargs):
    """(ours, peft's) over the same random MLP with the same adapter draws."""
    torch.manual_seed(seed)
    base = model_class()
    config = dict(target_modules=["lin0"], init_lora_weights=False, **lora_kwargs)
    torch.manual_seed(1)
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(**config))
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    return ours, theirs


X = torch.arange(30, dtype=torch.float32).view(3, 10) / 30


def test_a_positional_input_reaches_a_custom_model_as_given():
    ours, theirs = pair()
    torch.testing.assert_close(ours(X), theirs(X))
    with ours.disable_adapter(), theirs.disable_adapter():
        torch.testing.assert_close(ours(X), theirs(X))


def test_several_active_adapters_add_up_like_peft():
    ours, theirs = pair()
    torch.manual_seed(2)
    ours.add_adapter("other", LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False))
    torch.manual_seed(2)
    theirs.add_adapter("other", peft.LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False))
    ours.base_model.set_adapter(["default", "other"])
    theirs.base_model.set_adapter(["default", "other"])
    assert ours.base_model.active_adapter == theirs.base_model.active_adapter == ["default", "other"]
    torch.testing.assert_close(ours(X), theirs(X))
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {
        "base_model.model.lin0.adapters.default.lora_A.weight",
        "base_model.model.lin0.adapters.default.lora_B.weight",
        "base_model.model.lin0.adapters.other.lora_A.weight",
        "base_model.model.lin0.adapters.other.lora_B.weight",
        "base_model.model.lin1.adapters.other.lora_A.weight",
        "base_model.model.lin1.adapters.other.lora_B.weight",
    }
    with pytest.raises(ValueError, match="Adapter nope not found: this model has default, other"):
        ours.base_model.set_adapter(["default", "nope"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("autocast", [True, False])
def test_adapter_dtype_follows_autocast_adapter_dtype_like_peft(tmp_path, dtype, autocast):
    torch.manual_seed(0)
    ours = get_peft_model(MLP().to(dtype), LoraConfig(target_modules=["lin0"]), autocast_adapter_dtype=autocast)
    theirs = peft.get_peft_model(
        MLP().to(dtype), peft.LoraConfig(target_modules=["lin0"]), autocast_adapter_dtype=autocast
    )
    expected = torch.float32 if autocast else dtype
    assert {p.dtype for n, p in theirs.named_parameters() if "lora_" in n} == {expected}
    assert {p.dtype for n, p in ours.named_parameters() if "lora_" in n} == {expected}
    ours.save_pretrained(tmp_path)
    loaded = deltatune.PeftModel.from_pretrained(MLP().to(dtype), tmp_path, autocast_adapter_dtype=autocast)
    assert {p.dtype for n, p in loaded.named_parameters() if "lora_" in n} == {expected}


def test_layers_answer_peft_per_layer_api():
    ours, theirs = pair()
    layer, their_layer = ours.base_model.model.lin0, theirs.base_model.model.lin0
    torch.testing.assert_close(layer.get_delta_weight("default"), their_layer.get_delta_weight("default"))
    assert layer.get_base_layer() is layer.base_layer
    assert (layer.merged, layer.disable_adapters, layer.active_adapter) == (False, False, "default")
    layer.enable_adapters(False)
    assert layer.disable_adapters and torch.equal(layer(X), layer.base_layer(X))
    layer.enable_adapters(True)
    assert ours.prefix == theirs.prefix == "lora_"
    assert ours.has_active_enabled_adapter
    with ours.disable_adapter():
        assert not ours.has_active_enabled_adapter


def test_disable_adapter_with_mixed_layer_states_warns_and_enables_all_after():
    ours, _ = pair()
    ours.add_adapter("both", LoraConfig(target_modules=["lin0", "lin1"]))
    ours.set_adapter("both")
    ours.base_model.model.lin0.enable_adapters(False)
    with pytest.warns(PeftWarning, match="some adapter layers that are enabled and others that are disabled"):
        with ours.disable_adapter():
            pass
    assert not ours.base_model.model.lin0.disable_adapters and not ours.base_model.model.lin1.disable_adapters


def test_merging_twice_warns_like_peft():
    ours, _ = pair()
    ours.merge_adapter()
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do"):
        ours.merge_adapter()


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_a_second_adapter_training_the_biases_is_refused(bias):
    ours, theirs = pair(bias=bias)
    before = copy.deepcopy(ours.state_dict())
    with pytest.raises(
        ValueError,
        match=f"bias='{bias}': a model supports only 1 adapter with bias. When using multiple adapters, set ",
    ):
        ours.add_adapter("second", LoraConfig(target_modules=["lin0"], bias=bias))
    with pytest.raises(ValueError):  # peft refuses too
        theirs.add_adapter("second", peft.LoraConfig(target_modules=["lin0"], bias=bias))
    assert list(ours.peft_config) == ["default"]
    assert all(torch.equal(before[k], v) for k, v in ours.state_dict().items())
    ours.add_adapter("plain", LoraConfig(target_modules=["lin0"]))  # bias="none" beside it is fine


def test_safe_merge_into_an_embedding_works_like_peft():
    class Emb(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(50, 8)

        def forward(self, ids):
            return self.emb(ids)

    torch.manual_seed(0)
    base = Emb()
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=["emb"], init_lora_weights=False))
    ids = torch.tensor([[1, 4, 7]])
    expected = ours(ids)
    merged = ours.merge_and_unload(safe_merge=True)  # the embedding has no bias: nothing to check there
    assert isinstance(merged.emb, nn.Embedding)
    torch.testing.assert_close(merged(ids), expected)


def test_modules_to_save_attributes_are_the_trained_copy():
    torch.manual_seed(0)
    model = get_peft_model(HeadReadsWeight(), LoraConfig(target_modules=["lin0"], modules_to_save=["head"]))
    wrapper = model.base_model.model.head
    assert isinstance(wrapper, ModulesToSaveWrapper)
    assert wrapper.weight is wrapper.modules_to_save["default"].weight
    with model.disable_adapter():
        assert wrapper.weight is wrapper.original_module.weight
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(X).sum().backward()
    optimizer.step()
    assert not torch.equal(wrapper.modules_to_save["default"].weight, wrapper.original_module.weight)


def test_a_mixed_batch_through_a_tuple_returning_module_is_refused():
    model = get_peft_model(WithGRU(), LoraConfig(target_modules=["lin0"], modules_to_save=["gru"]))
    model.add_adapter("other", LoraConfig(target_modules=["lin0"], modules_to_save=["gru"]))
    message = (
        "Mixed batching is only supported for the following modules: Linear, Embedding, Conv1d, Conv2d, Conv3d. A "
        "mixed batch (adapter_names) needs modules_to_save modules that return one tensor, but GRU returns tuple"
    )
    with pytest.raises(TypeError, match=re.escape(message)):
        model(X, adapter_names=["default", "other", "default"])


def test_lora_bias_over_a_base_without_bias_warns_with_peft_words():
    with pytest.warns(
        PeftWarning, match=re.escape("`lora_bias=True` was passed but the targeted layer of type Linear")
    ):
        get_peft_model(MLP(bias=False), LoraConfig(target_modules=["lin0"], lora_bias=True))


def test_modules_to_save_passes_keyword_only_inputs():
    class KeywordsOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, *, pixel_values):
            return self.lin(pixel_values)

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = nn.Linear(8, 8)
            self.vision = KeywordsOnly()

        def forward(self, x):
            return self.vision(pixel_values=self.trunk(x))

    torch.manual_seed(0)
    model = get_peft_model(Outer(), LoraConfig(target_modules=["trunk"], modules_to_save=["vision"]))
    x = torch.randn(2, 8)
    with torch.no_grad():
        model.base_model.model.vision.modules_to_save["default"].lin.weight.add_(1.0)
        trained = model(x)
        with model.disable_adapter():
            original = model(x)
    assert not torch.allclose(trained, original)  # each path ran its own copy


@pytest.mark.parametrize(
    "container", [nn.ModuleDict({"a": nn.Linear(2, 2)}), nn.ParameterList([nn.Parameter(torch.ones(2))])]
)
def test_modules_to_save_refuses_a_container_without_forward(container):
    model = nn.Module()
    model.lin0 = nn.Linear(10, 10)
    model.module = container
    with pytest.raises(TypeError, match="modules_to_save cannot be applied to modules of type"):
        get_peft_model(model, LoraConfig(target_modules=["lin0"], modules_to_save=["module"]))


def test_deleting_an_inactive_adapter_keeps_the_merged_one_merged():
    ours, _ = pair(modules_to_save=["lin1"])
    ours.add_adapter("other", LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    ours.set_adapter("other")
    ours.merge_adapter()
    merged = ours(X)
    assert ours.modules_to_save == {"lin1"}
    ours.delete_adapter("default")
    assert ours.base_model.model.lin0.merged_adapters == ["other"] and ours.modules_to_save is None
    torch.testing.assert_close(ours(X), merged)


@pytest.mark.parametrize("is_trainable", [False, True])
def test_loaded_adapters_train_as_loaded_like_peft(tmp_path, is_trainable):
    ours, _ = pair()
    ours.save_pretrained(tmp_path)
    model = deltatune.PeftModel.from_pretrained(MLP(), tmp_path, is_trainable=is_trainable)
    model.load_adapter(tmp_path, adapter_name="other", is_trainable=is_trainable)
    model.load_adapter(tmp_path, adapter_name="opposite", is_trainable=not is_trainable)
    trainable = {n.split(".adapters.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == ({"default", "other"} if is_trainable else {"opposite"})


def test_peft_model_set_adapter_takes_a_list_too():
    ours, _ = pair()
    ours.add_adapter("other", LoraConfig(target_modules=["lin1"], init_lora_weights=False))
    ours.set_adapter(["default", "other"])
    assert ours.active_adapters == ["default", "other"]
    both = ours(X)
    ours.set_adapter("default")
    only_default = ours(X)
    assert not torch.allclose(both, only_default)
    with pytest.raises(ValueError, match="Adapter nope not found"):
        ours.set_adapter(["default", "nope"])
