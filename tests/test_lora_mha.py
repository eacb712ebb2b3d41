"""LoRA on nn.MultiheadAttention against HF peft (the oracle) and against the formula: same draws from one seed,
peft's file keys both ways, outputs of a plain nn.MultiheadAttention with W + s B A, gradients, merging, refusals.

peft 0.21 adds the out_proj update twice (huggingface/peft#3774), so outputs are compared with peft where the
out_proj B is zero, and with the formula (a plain nn.MultiheadAttention given the updated weights) everywhere."""

import copy

import peft
import pytest
import torch
from helpers.peft_pairs import copy_to_peft, randomize_adapter
from torch import nn

import deltatune
from deltatune import LoraConfig, PeftModel
from deltatune.methods.lora.lora import LoraLayer
from deltatune.ops.lora_dispatch import fast_lora_forward

ATOL = 1e-5
KEYS = {  # peft's file keys for the attention layer's adapter
    "base_model.model.mha.lora_A.weight",
    "base_model.model.mha.lora_B.weight",
    "base_model.model.mha.base_layer.out_proj.lora_A.weight",
    "base_model.model.mha.base_layer.out_proj.lora_B.weight",
}


class Attention(nn.Module):
    """Self-attention (named `mha`) and a linear head; `forward(x)` as peft's ModelMha."""

    def __init__(self, batch_first: bool = False, **options) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, **options)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden, _ = self.mha(x, x, x, key_padding_mask=key_padding_mask)
        return self.head(hidden)


def base_and_input(batch_first: bool = False, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = Attention(batch_first).eval()
    return model, torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(seed + 1))


def pair(batch_first: bool = False, seed: int = 1, **kwargs):
    """(ours, peft, input): the same base, each adapter built right after the same seed."""
    base, x = base_and_input(batch_first)
    kwargs.setdefault("target_modules", ["mha"])
    torch.manual_seed(seed)
    ours = deltatune.get_peft_model(copy.deepcopy(base), LoraConfig(**kwargs))
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    return ours, theirs, x


def run(model, x: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(x=x, **kwargs)


def formula(ours, name: str = "default") -> nn.Module:
    """The base model with W + s B A written into in_proj_weight and out_proj.weight: what LoRA means."""
    model = copy.deepcopy(ours).unload()
    layer = ours.get_base_model().mha
    with torch.no_grad():
        model.mha.in_proj_weight += layer.adapters[name].delta_weight()
        model.mha.out_proj.weight += layer.base_layer.out_proj.adapters[name].delta_weight()
    return model


def test_same_seed_gives_peft_weights_for_first_and_added_adapters():
    ours, theirs, x = pair(target_modules=["mha", "head"])
    torch.manual_seed(5)
    ours.add_adapter("other", LoraConfig(target_modules=["mha"], r=4, init_lora_weights=False))
    torch.manual_seed(5)
    theirs.add_adapter("other", peft.LoraConfig(target_modules=["mha"], r=4, init_lora_weights=False))
    for name in ("default", "other"):
        mine, its = ours.get_adapter_state_dict(name), peft.get_peft_model_state_dict(theirs, adapter_name=name)
        assert KEYS <= set(mine) and set(mine) == set(its)
        for key, value in its.items():
            assert torch.equal(mine[key], value), (name, key)
    torch.testing.assert_close(run(ours, x), run(theirs, x), atol=ATOL, rtol=0)  # B zero: both equal the base


@pytest.mark.parametrize("batch_first", [False, True])
def test_outputs_are_the_formula_and_peft_where_peft_is_right(batch_first):
    ours, theirs, x = pair(batch_first)
    randomize_adapter(ours)
    torch.testing.assert_close(run(ours, x), run(formula(ours), x), atol=ATOL, rtol=0)
    with ours.disable_adapter():
        assert (run(ours, x) - run(formula(ours), x)).abs().max() > 1e-3  # the adapter really changes the output
    with torch.no_grad():
        ours.get_base_model().mha.base_layer.out_proj.adapters["default"].lora_B.weight.zero_()
    copy_to_peft(ours, theirs)  # peft agrees while its doubled out_proj update is zero
    torch.testing.assert_close(run(ours, x), run(theirs, x), atol=ATOL, rtol=0)


def test_masks_and_attention_weights_pass_through():
    ours, _, x = pair(batch_first=True)
    randomize_adapter(ours)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, 3:] = True  # padding in the first row
    reference = formula(ours)
    torch.testing.assert_close(run(ours, x, key_padding_mask=mask), run(reference, x, key_padding_mask=mask))
    layer, plain = ours.get_base_model().mha, reference.mha
    with torch.no_grad():
        mine = layer(x, x, x, need_weights=True, average_attn_weights=False)
        expected = plain(x, x, x, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(mine[1], expected[1], atol=ATOL, rtol=0)  # (B, heads, T, T)


def test_gradients_reach_all_four_factors_and_no_weight_changes():
    ours, _, x = pair()
    randomize_adapter(ours)
    layer = ours.get_base_model().mha
    before = {n: p.detach().clone() for n, p in layer.base_layer.named_parameters() if ".adapters." not in n}
    ours.train()
    ours(x=x).sum().backward()
    grads = {n: p.grad is not None and p.grad.abs().sum() > 0 for n, p in ours.named_parameters() if p.requires_grad}
    prefixes = ("base_model.model.mha.adapters.default", "base_model.model.mha.base_layer.out_proj.adapters.default")
    assert grads == {f"{prefix}.{factor}.weight": True for prefix in prefixes for factor in ("lora_A", "lora_B")}
    for name, param in layer.base_layer.named_parameters():
        if ".adapters." not in name:
            assert torch.equal(param, before[name]) and not param.requires_grad, name


def test_merge_unmerge_round_trip_and_merge_and_unload():
    ours, _, x = pair()
    randomize_adapter(ours)
    layer = ours.get_base_model().mha
    weights = (layer.base_layer.in_proj_weight.detach().clone(), layer.base_layer.out_proj.weight.detach().clone())
    adapted = run(ours, x)
    ours.merge_adapter(safe_merge=True)
    torch.testing.assert_close(run(ours, x), adapted, atol=ATOL, rtol=0)
    with ours.disable_adapter():  # merged weights come out inside the block
        torch.testing.assert_close(layer.base_layer.in_proj_weight, weights[0], atol=1e-6, rtol=0)
    ours.unmerge_adapter()
    torch.testing.assert_close(layer.base_layer.in_proj_weight, weights[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.base_layer.out_proj.weight, weights[1], atol=1e-6, rtol=0)
    merged = ours.merge_and_unload()
    assert type(merged.mha) is nn.MultiheadAttention
    assert type(merged.mha.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear  # torch's own Linear
    assert isinstance(merged.mha.in_proj_weight, nn.Parameter)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), adapted, atol=ATOL, rtol=0)


def test_unload_gives_the_base_back():
    ours, _, x = pair()
    base, _ = base_and_input()
    randomize_adapter(ours)
    plain = ours.unload()
    assert type(plain.mha.out_proj) is not deltatune.methods.lora.mha.OutProjLora
    assert not any(".adapters." in n for n, _ in plain.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(plain(x), base(x))


def test_adapter_files_load_across_libraries(tmp_path):
    ours, theirs, x = pair()
    randomize_adapter(ours)
    randomize_adapter(theirs, seed=4)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    base, _ = base_and_input()
    peft_reads_ours = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    we_read_peft = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    for model, source in ((peft_reads_ours, ours), (we_read_peft, theirs)):
        loaded, saved = (
            m.get_adapter_state_dict() if isinstance(m, PeftModel) else peft.get_peft_model_state_dict(m)
            for m in (model, source)
        )
        assert KEYS <= set(loaded) and set(loaded) == set(saved)
        for key in saved:
            assert torch.equal(loaded[key], saved[key]), key
    torch.testing.assert_close(run(we_read_peft, x), run(formula(we_read_peft), x), atol=ATOL, rtol=0)


def test_second_adapter_switch_and_delete():
    ours, _, x = pair()
    ours.add_adapter("other", LoraConfig(target_modules=["mha"], init_lora_weights=False))
    ours.set_adapter("other")
    torch.testing.assert_close(run(ours, x), run(formula(ours, "other"), x), atol=ATOL, rtol=0)
    ours.delete_adapter("other")
    layer = ours.get_base_model().mha
    assert list(layer.adapters) == list(layer.base_layer.out_proj.adapters) == ["default"]


def test_refusals_as_peft():
    base, x = base_and_input()
    with pytest.raises(ValueError, match=r"MultiheadAttention does not support DoRA \(yet\), please set use_dora"):
        deltatune.get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=["mha"], use_dora=True))
    with pytest.raises(ValueError, match="lora_bias=True does not work on nn.MultiheadAttention"):
        deltatune.get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=["mha"], lora_bias=True))
    with pytest.raises(ValueError, match="does not apply to the nn.MultiheadAttention mha"):
        deltatune.get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=["mha"], init_lora_weights="olora"))
    separate = Attention()
    separate.mha = nn.MultiheadAttention(8, 2, kdim=4, vdim=6)
    with pytest.raises(ValueError, match="Only same embed for query/key/value is supported"):
        deltatune.get_peft_model(separate, LoraConfig(target_modules=["mha"]))
    ours, _, _ = pair()
    ours.add_adapter("other", LoraConfig(target_modules=["mha"]))
    with pytest.raises(TypeError, match="lora.MultiheadAttention does not support mixed adapter batches"):
        ours(x=x[:, :2], adapter_names=["default", "other"])
    with pytest.raises(ValueError, match="add_weighted_adapter does not combine adapters on mha"):
        ours.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix", combination_type="linear")


def test_attention_attributes_read_through_the_wrapper():
    base, _ = base_and_input()
    plain = copy.deepcopy(base.mha)
    layer = deltatune.get_peft_model(base, LoraConfig(target_modules=["mha"])).get_base_model().mha
    for name in ("embed_dim", "num_heads", "batch_first", "head_dim", "dropout", "_qkv_same_embed_dim"):
        assert getattr(layer, name) == getattr(plain, name), name
    assert torch.equal(layer.in_proj_weight, plain.in_proj_weight)
    assert type(layer.out_proj) is type(plain.out_proj) and torch.equal(layer.out_proj.weight, plain.out_proj.weight)


def test_fast_path_leaves_attention_to_its_own_forward():
    ours, _, x = pair()
    layer = ours.get_base_model().mha
    assert isinstance(layer, LoraLayer) and layer.kind == "mha"
    assert fast_lora_forward(layer, x, (x, x), {}) is None


def test_safe_merge_refuses_nan_in_the_out_proj_update_before_any_change():
    ours, _, _ = pair()
    layer = ours.get_base_model().mha
    with torch.no_grad():
        layer.base_layer.out_proj.adapters["default"].lora_B.weight.fill_(float("nan"))
    before = layer.base_layer.in_proj_weight.detach().clone()
    with pytest.raises(ValueError, match="NaN"):
        ours.merge_adapter(safe_merge=True)
    assert torch.equal(layer.base_layer.in_proj_weight, before) and not layer.merged_adapters


def test_layer_set_adapter_trains_both_halves_of_the_active_adapter_only():
    ours, _, _ = pair()
    ours.add_adapter("other", LoraConfig(target_modules=["mha"]))
    layer = ours.get_base_model().mha
    layer.set_adapter("other")
    trains = {n: p.requires_grad for n, p in layer.named_parameters() if "adapters." in n}
    assert len(trains) == 8 and all(flag == (".other." in n) for n, flag in trains.items())


@pytest.mark.parametrize("autocast", [True, False])
def test_both_halves_follow_autocast_adapter_dtype(autocast):
    model = deltatune.get_peft_model(
        Attention().to(torch.bfloat16), LoraConfig(target_modules=["mha"]), autocast_adapter_dtype=autocast
    )
    dtypes = {name: p.dtype for name, p in model.named_parameters() if "lora_" in name}
    assert any("out_proj" in name for name in dtypes)
    assert set(dtypes.values()) == {torch.float32 if autocast else torch.bfloat16}
