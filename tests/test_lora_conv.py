"""LoRA, DoRA and AdaLoRA on nn.Conv1d / Conv2d / Conv3d against HF peft (the oracle): same draws from one seed,
same outputs with random adapters, same file keys both ways; merging, grouped convs and what is refused."""

import copy
import logging

import peft
import pytest
import torch
from helpers.peft_pairs import copy_to_peft, randomize_adapter
from torch import nn

import deltatune
from deltatune import AdaLoraConfig, LoraConfig, PeftModel
from deltatune.methods.lora.lora import LoraLayer
from deltatune.ops.lora_dispatch import fast_lora_forward

ATOL = 1e-5


class ConvNet(nn.Module):
    """A conv (named `conv`) and a linear head: the smallest model with a conv in the middle."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.head = nn.Linear(conv.out_channels, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.conv(x)  # (B, out, spatial...)
        return self.head(hidden.flatten(2).mean(-1))


# (id, conv, input shape): kernels, 1x1, stride and padding, groups
CONVS = {
    "conv1d": (lambda: nn.Conv1d(4, 6, 3), (3, 4, 9)),
    "conv2d": (lambda: nn.Conv2d(5, 10, 3, stride=2, padding=1), (3, 5, 7, 7)),
    "conv2d_1x1": (lambda: nn.Conv2d(5, 10, 1), (3, 5, 4, 4)),
    "conv3d": (lambda: nn.Conv3d(5, 10, 3), (3, 5, 4, 4, 4)),
    "conv2d_groups": (lambda: nn.Conv2d(16, 16, 3, groups=8), (3, 16, 5, 5)),
}
VARIANTS = {
    "lora": {},
    "dora": {"use_dora": True},
    "lora_bias": {"lora_bias": True, "lora_alpha": 32},
    "gaussian": {"init_lora_weights": "gaussian"},
}


def conv_net(kind: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """(base model, input) for one of CONVS."""
    make, shape = CONVS[kind]
    torch.manual_seed(seed)
    model = ConvNet(make()).eval()
    return model, torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))


def pair(kind: str, config_class=LoraConfig, seed: int = 1, **kwargs):
    """(ours, peft, input): the same base, each adapter built right after the same seed."""
    base, x = conv_net(kind)
    kwargs.setdefault("target_modules", ["conv"])
    torch.manual_seed(seed)
    ours = deltatune.get_peft_model(copy.deepcopy(base), config_class(**kwargs))
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(copy.deepcopy(base), getattr(peft, config_class.__name__)(**kwargs))
    return ours, theirs, x


def run(model, x: torch.Tensor) -> torch.Tensor:
    """The adapted model's output (called as peft's own tests call a custom model)."""
    with torch.no_grad():
        return model(x=x)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", CONVS)
def test_same_seed_gives_peft_weights_and_outputs(kind, variant):
    ours, theirs, x = pair(kind, **VARIANTS[variant])
    mine, its = ours.get_adapter_state_dict(), peft.get_peft_model_state_dict(theirs)
    assert set(mine) == set(its)
    for key, value in its.items():
        assert torch.equal(mine[key], value), key  # same draws, same shapes (DoRA's magnitude is (1, out, 1, ...))
    randomize_adapter(ours)  # every adapter tensor non-zero, so an ignored part would show
    copy_to_peft(ours, theirs)
    torch.testing.assert_close(run(ours, x), run(theirs, x), atol=ATOL, rtol=0)
    with ours.disable_adapter():
        assert (run(ours, x) - run(theirs, x)).abs().max() > 1e-3  # the adapter really changes the output


@pytest.mark.parametrize("kind", ["conv2d", "conv3d"])
def test_dora_with_dropout_in_training_matches_peft(kind):
    ours, theirs, x = pair(kind, use_dora=True, lora_dropout=0.3)
    randomize_adapter(ours)
    copy_to_peft(ours, theirs)
    ours.train(), theirs.train()
    torch.manual_seed(7)
    mine = ours(x=x)
    torch.manual_seed(7)
    torch.testing.assert_close(mine, theirs(x=x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", [k for k in CONVS if "groups" not in k])
def test_merge_round_trip_and_merge_and_unload(kind, variant):
    ours, _, x = pair(kind, **VARIANTS[variant])
    randomize_adapter(ours)
    layer = ours.get_base_model().conv
    base_weight = layer.base_layer.weight.detach().clone()
    adapted = run(ours, x)
    ours.merge_adapter()
    torch.testing.assert_close(run(ours, x), adapted, atol=ATOL, rtol=0)
    ours.unmerge_adapter()
    torch.testing.assert_close(layer.base_layer.weight, base_weight, atol=1e-6, rtol=0)
    merged = ours.merge_and_unload()
    assert type(merged.conv) is type(CONVS[kind][0]())  # a plain conv again
    with torch.no_grad():
        torch.testing.assert_close(merged(x), adapted, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["conv1d", "conv2d", "conv3d"])
@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_adapter_files_load_across_libraries(kind, variant, tmp_path):
    ours, theirs, x = pair(kind, **VARIANTS[variant])
    randomize_adapter(ours)
    randomize_adapter(theirs, seed=4)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    base, _ = conv_net(kind)
    peft_reads_ours = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    we_read_peft = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(run(peft_reads_ours, x), run(ours, x), atol=ATOL, rtol=0)
    torch.testing.assert_close(run(we_read_peft, x), run(theirs, x), atol=ATOL, rtol=0)


def test_grouped_conv_needs_rank_divisible_by_groups():
    base, _ = conv_net("conv2d_groups")  # groups=8
    with pytest.raises(ValueError, match=r"Targeting a Conv2d with groups=8 and rank 4\. Currently, support is"):
        deltatune.get_peft_model(base, LoraConfig(target_modules=["conv"], r=4))


def test_grouped_conv_warns_and_refuses_to_merge(caplog):
    with caplog.at_level(logging.WARNING, logger="deltatune.methods.lora.conv"):
        ours, _, x = pair("conv2d_groups")
    assert "groups > 1. Merging is not supported" in caplog.text
    randomize_adapter(ours)
    weight = ours.get_base_model().conv.base_layer.weight.detach().clone()
    adapted = run(ours, x)
    for merge in (ours.merge_adapter, lambda: ours.merge_adapter(safe_merge=True), ours.merge_and_unload):
        with pytest.raises(NotImplementedError, match="Merging is not supported for _ConvNd layers with groups > 1"):
            merge()
    assert torch.equal(ours.get_base_model().conv.base_layer.weight, weight)  # nothing changed
    torch.testing.assert_close(run(ours, x), adapted, atol=0, rtol=0)


def test_grouped_conv_factors_are_peft_shapes():
    ours, _, _ = pair("conv2d_groups")
    adapter = ours.get_base_model().conv.adapters["default"]
    assert adapter.lora_A.weight.shape == (8, 16, 3, 3)  # (r, in, kernel)
    assert adapter.lora_B.weight.shape == (16, 1, 1, 1)  # (out, r / groups, 1, 1)
    assert adapter.lora_B.groups == 8


def test_mixed_batch_on_a_conv_runs_each_row_with_its_adapter():
    ours, _, x = pair("conv2d")
    ours.add_adapter("other", LoraConfig(target_modules=["conv"], init_lora_weights=False))
    randomize_adapter(ours)  # the active adapter
    rows = ["default", "other", "__base__"]
    with torch.no_grad():
        mixed = ours(x=x, adapter_names=rows)
    for row, name in enumerate(rows):
        if name == "__base__":
            with ours.disable_adapter():
                expected = run(ours, x)[row]
        else:
            ours.set_adapter(name)
            expected = run(ours, x)[row]
        torch.testing.assert_close(mixed[row], expected, atol=ATOL, rtol=0)


def test_gradients_reach_the_conv_factors_only():
    ours, _, x = pair("conv2d", use_dora=True)
    randomize_adapter(ours)
    ours.train()
    ours(x=x).sum().backward()
    grads = {n: p.grad is not None and p.grad.abs().sum() > 0 for n, p in ours.named_parameters() if p.requires_grad}
    assert grads == {
        "base_model.model.conv.adapters.default.lora_A.weight": True,
        "base_model.model.conv.adapters.default.lora_B.weight": True,
        "base_model.model.conv.adapters.default.lora_magnitude_vector": True,
    }


def test_fast_path_leaves_convs_to_the_reference_forward():
    ours, _, x = pair("conv2d")
    layer = ours.get_base_model().conv
    assert isinstance(layer, LoraLayer) and layer.kind == "conv"
    assert fast_lora_forward(layer, x, (), {}) is None


def test_base_weight_inits_and_weighted_combinations_are_refused_on_a_conv():
    base, _ = conv_net("conv2d")
    with pytest.raises(ValueError, match="does not apply to the convolution conv"):
        deltatune.get_peft_model(base, LoraConfig(target_modules=["conv"], init_lora_weights="pissa"))
    ours, _, _ = pair("conv2d")
    ours.add_adapter("other", LoraConfig(target_modules=["conv"]))
    with pytest.raises(ValueError, match="add_weighted_adapter does not combine adapters on conv"):
        ours.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix", combination_type="linear")


# ---- AdaLoRA: nn.Conv2d only, as peft ---------------------------------------------------------------------------
ADALORA = {"target_modules": ["conv", "head"], "init_lora_weights": False, "total_step": 1}


def test_adalora_conv2d_matches_peft_and_merges():
    ours, theirs, x = pair("conv2d", AdaLoraConfig, **ADALORA)
    mine, its = ours.get_adapter_state_dict(), peft.get_peft_model_state_dict(theirs)
    assert set(mine) == set(its)
    for key, value in its.items():
        assert torch.equal(mine[key], value), key
    adapted = run(ours, x)
    torch.testing.assert_close(adapted, run(theirs, x), atol=ATOL, rtol=0)
    ours.merge_adapter()
    torch.testing.assert_close(run(ours, x), adapted, atol=ATOL, rtol=1e-5)  # large random factors: relative
    merged = ours.merge_and_unload()
    assert type(merged.conv) is nn.Conv2d


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_adalora_conv2d_in_half_precision_without_autocast_matches_peft(dtype):
    # autocast_adapter_dtype=False: the adapter (and the rank it divides by) takes the half-precision base's dtype.
    base, x = conv_net("conv2d")
    base = base.to(dtype)
    outputs = []
    for library, config_class in ((deltatune, AdaLoraConfig), (peft, peft.AdaLoraConfig)):
        torch.manual_seed(1)
        model = library.get_peft_model(copy.deepcopy(base), config_class(**ADALORA), autocast_adapter_dtype=False)
        outputs.append(run(model, x.to(dtype)))
    assert outputs[0].dtype == dtype
    torch.testing.assert_close(outputs[0], outputs[1], atol=0, rtol=0)


def test_adalora_refuses_grouped_and_other_convs():
    for kind, message in (("conv2d_groups", "AdaLoRA does not support a Conv2d with groups=8"), ("conv1d", "Conv1d")):
        base, _ = conv_net(kind)
        with pytest.raises((ValueError, TypeError), match=message):
            deltatune.get_peft_model(base, AdaLoraConfig(**ADALORA))


def test_adalora_conv2d_prunes_and_its_file_loads_in_peft(tmp_path):
    base, x = conv_net("conv2d")
    config = AdaLoraConfig(target_modules=["conv", "head"], init_r=6, target_r=2, tfinal=1, total_step=4)
    ours = deltatune.get_peft_model(copy.deepcopy(base), config)
    optimizer = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    for step in range(1, 5):
        ours(x=x).pow(2).mean().backward()
        optimizer.step()
        ours.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    kept = ours.peft_config["default"].rank_pattern
    assert sum(kept["conv.lora_E"]) + sum(kept["head.lora_E"]) == 4  # target_r x 2 modules
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(run(theirs, x), run(ours, x), atol=ATOL, rtol=0)
