"""add_weighted_adapter (deltatune.methods.lora.combine) against HF peft and against the exact formulas."""

import copy

import peft
import pytest
import torch
from helpers.models import tiny_inputs, tiny_model
from helpers.peft_pairs import logits, randomize_adapter

from deltatune import AdaLoraConfig, LoraConfig, get_peft_model
from deltatune.methods.lora.lora import LoraLayer

RULES = [
    "svd",
    "cat",
    "linear",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
]
CONFIGS = {
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj"]),
}


def two_adapter_pair(arch="llama", configs=CONFIGS):
    """(ours, peft): adapters "a" and "b" with the same random values in both libraries."""
    base = tiny_model(arch)
    ours_base, peft_base = base, copy.deepcopy(base)
    (first, first_kwargs), *rest = configs.items()
    ours = get_peft_model(ours_base, LoraConfig(init_lora_weights=False, **first_kwargs), first)
    theirs = peft.get_peft_model(peft_base, peft.LoraConfig(init_lora_weights=False, **first_kwargs), first)
    for name, kwargs in rest:
        ours.add_adapter(name, LoraConfig(init_lora_weights=False, **kwargs))
        theirs.add_adapter(name, peft.LoraConfig(init_lora_weights=False, **kwargs))
    for seed, name in enumerate(configs):
        ours.set_adapter(name)
        randomize_adapter(ours, seed=seed)
        peft.set_peft_model_state_dict(theirs, ours.get_adapter_state_dict(name), adapter_name=name)
    return ours, theirs


def combined_in_both(rule, weights=(0.7, -0.4), arch="llama", configs=CONFIGS, **options):
    ours, theirs = two_adapter_pair(arch, configs)
    for model in (ours, theirs):
        torch.manual_seed(0)  # DARE draws its masks: the same draws in both
        model.add_weighted_adapter(list(configs), list(weights), "mix", combination_type=rule, **options)
        model.set_adapter("mix")
    return ours, theirs


@pytest.mark.parametrize("rule", RULES)
def test_every_combination_type_gives_peft_factors_and_logits(rule):
    ours, theirs = combined_in_both(rule, density=0.5)
    mine, peft_state = ours.get_adapter_state_dict("mix"), peft.get_peft_model_state_dict(theirs, adapter_name="mix")
    assert sorted(mine) == sorted(peft_state)
    for key in mine:
        torch.testing.assert_close(mine[key], peft_state[key], rtol=0, atol=1e-6)
    inputs = tiny_inputs("llama")
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), rtol=0, atol=1e-5)
    assert ours.peft_config["mix"].target_modules == theirs.peft_config["mix"].target_modules


def updates(model, name):
    """{layer name: scaling * B A} of adapter `name`."""
    return {
        key: layer.adapters[name].delta_weight()
        for key, layer in model.named_modules()
        if isinstance(layer, LoraLayer) and name in layer.adapters
    }


def test_cat_is_exactly_the_weighted_sum_of_updates_and_svd_its_best_low_rank_cut():
    ours, _ = combined_in_both("cat", weights=(0.7, -0.4))
    a, b, mixed = updates(ours, "a"), updates(ours, "b"), updates(ours, "mix")
    for key, delta in mixed.items():
        want = 0.7 * a.get(key, 0) - 0.4 * b.get(key, 0)
        torch.testing.assert_close(delta, want, rtol=0, atol=1e-6)
    assert ours.peft_config["mix"].r == 8 and ours.peft_config["mix"].lora_alpha == 8  # rank 4 + 4, scale 1
    svd, _ = combined_in_both("svd", weights=(0.7, -0.4), svd_rank=2)
    for key, delta in updates(svd, "mix").items():
        u, s, vh = torch.linalg.svd(mixed[key])
        torch.testing.assert_close(delta, u[:, :2] @ torch.diag(s[:2]) @ vh[:2], rtol=0, atol=1e-5)


def test_svd_and_cat_combine_different_ranks_on_gpt2_conv1d_like_peft():
    configs = {
        "a": dict(r=2, lora_alpha=4, target_modules=["c_attn"]),
        "b": dict(r=6, lora_alpha=6, target_modules=["c_attn", "c_proj"]),
    }
    for rule, options in (("svd", dict(svd_clamp=0.9)), ("cat", {})):
        ours, theirs = combined_in_both(rule, arch="gpt2", configs=configs, **options)
        inputs = tiny_inputs("gpt2")
        torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), rtol=0, atol=1e-5)
    with pytest.raises(
        ValueError,
        match=r"combination_type='linear' mixes the factors, which needs one rank; the ranks "
        r"are \{'a': 2, 'b': 6\}: use 'svd' or 'cat'",
    ):
        two_adapter_pair("gpt2", configs)[0].add_weighted_adapter(["a", "b"], [1, 1], "mix", combination_type="linear")


def test_a_combined_adapter_saves_and_loads_in_peft(tmp_path):
    ours, _ = combined_in_both("svd")
    ours.save_pretrained(tmp_path, selected_adapters=["mix"])
    fresh = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "mix")
    inputs = tiny_inputs("llama")
    torch.testing.assert_close(logits(fresh, inputs), logits(ours, inputs), rtol=0, atol=1e-5)


def test_bad_combinations_are_refused_by_name():
    ours, _ = two_adapter_pair()
    with pytest.raises(ValueError, match=r"add_weighted_adapter: no adapter named 'c'; this model has: a, b"):
        ours.add_weighted_adapter(["a", "c"], [1, 1], "mix")
    with pytest.raises(ValueError, match=r"give one weight per adapter \(2 adapters, 1 weights\)"):
        ours.add_weighted_adapter(["a", "b"], [1], "mix")
    with pytest.raises(ValueError, match=r"combination_type='mean' is not known; use one of: cat, linear"):
        ours.add_weighted_adapter(["a", "b"], [1, 1], "mix", combination_type="mean")
    with pytest.raises(ValueError, match=r"combination_type='ties' needs density in \[0, 1\]"):
        ours.add_weighted_adapter(["a", "b"], [1, 1], "mix", combination_type="ties")
    with pytest.raises(ValueError, match=r"Adapter with name 'a' already exists"):
        ours.add_weighted_adapter(["a", "b"], [1, 1], "a")
    assert sorted(ours.peft_config) == ["a", "b"]  # nothing was added by the refused calls
    ada = get_peft_model(tiny_model("llama"), AdaLoraConfig(target_modules=["q_proj"], total_step=10))
    with pytest.raises(ValueError, match=r"add_weighted_adapter combines LoRA adapters; 'default' is ADALORA"):
        ada.add_weighted_adapter(["default"], [1], "mix")


def test_combining_pissa_adapters_leaves_the_base_weights_alone():
    # The new adapter's factors are overwritten by the mix: PiSSA must not run again and change W a second time.
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa"))
    model.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj"]))
    before = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix", combination_type="cat")
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert model.peft_config["mix"].init_lora_weights is True
