"""LoraConfig(layer_replication=...) against HF peft (the oracle): depth up-scaling with shared base weights.

Models have 4 layers and the map [[0, 3], [1, 4]] gives 0,1,2,1,2,3: layers 1 and 2 appear twice. Adapters are
made non-zero and copied into peft's twin, so a copy that ignored its own adapter, a cache slot shared by two
positions, or a key loaded into the wrong copy would change the outputs.
"""

import copy
import json

import peft
import pytest
import torch
from helpers.models import tiny_inputs, tiny_model
from helpers.peft_pairs import randomize_adapter

from deltatune import AdaLoraConfig, LoraConfig, PeftModel, get_peft_model
from deltatune.methods.lora.replication import find_layer_list

MAP = [[0, 3], [1, 4]]
ORDER = [0, 1, 2, 1, 2, 3]  # original layer at each new position
ATOL = 1e-5
# (arch, task): the three layouts peft finds: .model.layers, .bert.encoder.layer, .h (bare Bloom)
CASES = {"llama": "CAUSAL_LM", "bert": "SEQ_CLS", "bloom": "FEATURE_EXTRACTION"}


def base(arch: str, layers: int = 4, seed: int = 0) -> torch.nn.Module:
    return tiny_model(arch, CASES.get(arch), seed, num_hidden_layers=layers)


def lora_kwargs(arch: str, **extra) -> dict:
    return dict(task_type=CASES[arch], r=4, lora_alpha=8, init_lora_weights=False, layer_replication=MAP, **extra)


def pair(arch: str):
    """(ours, peft) on the same base with the same random adapter values."""
    ours = get_peft_model(base(arch), LoraConfig(**lora_kwargs(arch)))
    theirs = peft.get_peft_model(base(arch), peft.LoraConfig(**lora_kwargs(arch)))
    randomize_adapter(ours)
    result = peft.set_peft_model_state_dict(theirs, ours.get_adapter_state_dict())
    assert not result.unexpected_keys, result.unexpected_keys
    return ours, theirs


def outputs(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def layers_of(peft_model) -> torch.nn.ModuleList:
    owner, attr = find_layer_list(peft_model.get_base_model())
    return getattr(owner, attr)


# ---- parity with peft ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", CASES)
def test_replicated_model_equals_peft(arch, capsys):
    ours, theirs = pair(arch)
    inputs = tiny_inputs(arch)
    torch.testing.assert_close(outputs(ours, inputs), outputs(theirs, inputs), rtol=0, atol=ATOL)
    ours.print_trainable_parameters()
    theirs.print_trainable_parameters()
    ours_line, peft_line = capsys.readouterr().out.strip().splitlines()
    assert ours_line == peft_line
    assert len(layers_of(ours)) == len(layers_of(theirs)) == len(ORDER)
    assert ours.get_base_model().config.num_hidden_layers == len(ORDER)
    assert set(ours.get_adapter_state_dict()) == set(peft.get_peft_model_state_dict(theirs))
    with ours.disable_adapter():  # the adapters really change the output
        assert (outputs(ours, inputs) - outputs(theirs, inputs)).abs().max() > 1e-3


@pytest.mark.parametrize("arch", CASES)
def test_repeated_layers_share_base_weights_but_not_adapters(arch):
    ours = get_peft_model(base(arch), LoraConfig(**lora_kwargs(arch)))
    layers = layers_of(ours)
    for position, original in enumerate(ORDER):
        first = ORDER.index(original)
        if first == position:
            continue
        base_ptrs = {n: p.data_ptr() for n, p in layers[position].named_parameters() if ".adapters." not in n}
        first_ptrs = {n: p.data_ptr() for n, p in layers[first].named_parameters() if ".adapters." not in n}
        assert base_ptrs == first_ptrs  # same storage: no extra weight memory
        lora_ptrs = {p.data_ptr() for n, p in layers[position].named_parameters() if ".adapters." in n}
        first_lora = {p.data_ptr() for n, p in layers[first].named_parameters() if ".adapters." in n}
        assert lora_ptrs and not lora_ptrs & first_lora  # each copy its own adapter
    fresh = base(arch)  # the unique weights are counted once, as the base's
    assert ours.get_nb_trainable_parameters()[1] - ours.get_nb_trainable_parameters()[0] == fresh.num_parameters()


def test_gradients_equal_peft():
    ours, theirs = pair("llama")
    ours.train(), theirs.train()
    inputs = tiny_inputs("llama")
    for model in (ours, theirs):
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
    ours_grads = {n.replace(".adapters.default", ""): p.grad for n, p in ours.named_parameters() if p.requires_grad}
    peft_grads = {n.replace(".default", ""): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert ours_grads.keys() == peft_grads.keys() and len(ours_grads) == 2 * 2 * len(ORDER)
    for name, grad in ours_grads.items():
        torch.testing.assert_close(grad, peft_grads[name], rtol=0, atol=ATOL, msg=name)
    assert all(p.grad is None for n, p in ours.named_parameters() if ".adapters." not in n)  # shared base frozen


def test_generate_with_kv_cache_equals_peft():
    ours, theirs = pair("llama")
    attn = [layer.self_attn.layer_idx for layer in layers_of(ours)]
    assert attn == list(range(len(ORDER)))  # one KV-cache slot per position, not per original layer
    prompt = tiny_inputs("llama", batch=2)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    tokens = ours.generate(**prompt, **kwargs, use_cache=True)
    assert torch.equal(tokens, theirs.generate(**prompt, **kwargs, use_cache=True))
    assert torch.equal(tokens, ours.generate(**prompt, **kwargs, use_cache=False))  # the cache changes nothing


# ---- files ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", CASES)
def test_adapter_files_load_across_libraries(arch, tmp_path):
    ours, theirs = pair(arch)
    inputs = tiny_inputs(arch)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["layer_replication"] == MAP
    peft_reads_ours = peft.PeftModel.from_pretrained(base(arch), tmp_path / "ours")
    we_read_peft = PeftModel.from_pretrained(base(arch), tmp_path / "peft")  # replication redone from the config
    assert len(layers_of(we_read_peft)) == len(ORDER)
    torch.testing.assert_close(outputs(peft_reads_ours, inputs), outputs(ours, inputs), rtol=0, atol=ATOL)
    torch.testing.assert_close(outputs(we_read_peft, inputs), outputs(theirs, inputs), rtol=0, atol=ATOL)
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == set(
        load_file(tmp_path / "peft" / "adapter_model.safetensors")
    )


# ---- validation ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "layer_map, message",
    [
        ([[2, 2]], r"entry \[2, 2\] is empty or negative"),
        ([[3, 1]], r"entry \[3, 1\] is empty or negative"),
        ([[-1, 2]], r"entry \[-1, 2\] is empty or negative"),
        ([[0, 1, 2]], r"entry \[0, 1, 2\] is not a \[start, end\) pair of ints"),
        ([[0, 1.5]], r"entry \[0, 1.5\] is not a \[start, end\) pair of ints"),
        ([[True, 2]], r"is not a \[start, end\) pair of ints"),
        ([3, 4], r"entry 3 is not a \[start, end\) pair"),
        ("0-4", r"layer_replication='0-4' must be a list of \[start, end\) pairs"),
    ],
)
def test_bad_maps_are_refused_by_the_config(layer_map, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(layer_replication=layer_map)


def test_range_past_the_last_layer_is_refused_before_any_change():
    model = base("llama")
    with pytest.raises(ValueError, match=r"range \[2, 5\] goes past the model's 4 layers \(valid ends are 1..4\)"):
        get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", layer_replication=[[0, 2], [2, 5]]))
    assert len(model.model.layers) == model.config.num_hidden_layers == 4


def test_model_without_a_known_layer_list_is_refused_as_in_peft():
    message = r"no list of layers found in GPT2LMHeadModel; looked at model\(\.model\)\*\.layers .*\.h on the model"
    with pytest.raises(ValueError, match=message):
        get_peft_model(base("gpt2"), LoraConfig(task_type="CAUSAL_LM", layer_replication=[[0, 2]]))
    with pytest.raises(ValueError, match="Could not locate the layers attribute"):  # peft cannot either
        peft.get_peft_model(base("gpt2"), peft.LoraConfig(task_type="CAUSAL_LM", layer_replication=[[0, 2]]))


def test_adalora_on_replicated_layers_equals_peft(tmp_path):
    """peft's AdaLoRA replicates too (its model is LoRA's): counts, outputs and files agree, and each copy of a
    shared layer gets its own SVD adapter, which the rank allocator then sees as separate triplets."""
    kwargs = dict(
        task_type="CAUSAL_LM",
        init_r=4,
        target_r=2,
        total_step=10,
        target_modules=["q_proj", "v_proj"],
        layer_replication=MAP,
    )
    ours = get_peft_model(base("llama"), AdaLoraConfig(**kwargs))
    theirs = peft.get_peft_model(base("llama"), peft.AdaLoraConfig(**kwargs))
    (trainable, total), (peft_trainable, peft_total) = (m.get_nb_trainable_parameters() for m in (ours, theirs))
    assert trainable == peft_trainable and total == peft_total  # the frozen 1-element ranknums counted by both
    randomize_adapter(ours)
    result = peft.set_peft_model_state_dict(theirs, ours.get_adapter_state_dict())
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k]
    layers = layers_of(ours)
    assert layers[1].self_attn.q_proj.base_layer.weight is layers[3].self_attn.q_proj.base_layer.weight
    first, copy_ = (layers[i].self_attn.q_proj.adapters["default"].lora_E for i in (1, 3))
    assert first is not copy_ and not torch.equal(first, copy_)
    inputs = tiny_inputs("llama")
    torch.testing.assert_close(outputs(ours, inputs), outputs(theirs, inputs), rtol=0, atol=ATOL)
    ours.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(base("llama"), tmp_path)
    assert len(layers_of(reloaded)) == len(ORDER)
    torch.testing.assert_close(outputs(reloaded, inputs), outputs(ours, inputs), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"cannot merge adapters into a model whose layers are replicated"):
        ours.merge_and_unload()


# ---- merging and more adapters -------------------------------------------------------------------------------------
def test_merging_is_refused_and_leaves_the_weights_alone():
    ours, _ = pair("llama")
    inputs = tiny_inputs("llama")
    before = outputs(ours, inputs)
    message = (
        r"cannot merge adapters into a model whose layers are replicated \(layer_replication=\[\[0, 3\], \[1, 4\]\]\)"
    )
    for merge in (ours.merge_and_unload, ours.merge_adapter):
        with pytest.raises(ValueError, match=message + ": the repeated layers share one base weight"):
            merge()
    torch.testing.assert_close(outputs(ours, inputs), before, rtol=0, atol=0)
    unloaded = ours.unload()  # the deeper base without adapters, still sharing its weights
    assert len(unloaded.model.layers) == len(ORDER)
    assert unloaded.model.layers[1].mlp.up_proj.weight is unloaded.model.layers[3].mlp.up_proj.weight


def test_second_adapter_without_map_goes_on_every_copy_as_in_peft():
    ours, theirs = pair("llama")
    second = dict(task_type="CAUSAL_LM", r=2, init_lora_weights=False, target_modules=["o_proj"])
    ours.add_adapter("other", LoraConfig(**second))
    theirs.add_adapter("other", peft.LoraConfig(**second))
    assert len(layers_of(ours)) == len(ORDER)
    ours_keys = set(ours.get_adapter_state_dict("other"))
    assert ours_keys == set(peft.get_peft_model_state_dict(theirs, adapter_name="other"))
    assert len(ours_keys) == 2 * len(ORDER)


def test_second_adapter_with_the_same_map_is_not_replicated_again(tmp_path):
    ours, _ = pair("llama")
    inputs = tiny_inputs("llama")
    expected = outputs(ours, inputs)
    ours.save_pretrained(tmp_path)
    ours.load_adapter(tmp_path, "again")  # saved with the same map: the model is already that deep
    ours.set_adapter("again")
    assert len(layers_of(ours)) == len(ORDER)
    torch.testing.assert_close(outputs(ours, inputs), expected, rtol=0, atol=0)


def test_second_adapter_with_another_map_is_refused():
    ours, _ = pair("llama")
    with pytest.raises(
        ValueError,
        match=r"adapter 'b' asks for layer_replication=\[\[0, 2\]\], but this model's "
        r"layers were already replicated with \[\[0, 3\], \[1, 4\]\]",
    ):
        ours.add_adapter("b", LoraConfig(task_type="CAUSAL_LM", layer_replication=[[0, 2]]))
    assert "b" not in ours.peft_config and len(layers_of(ours)) == len(ORDER)


def test_map_after_plain_adapters_is_refused():
    ours = get_peft_model(base("llama"), LoraConfig(task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match=r"already holds adapters on its unreplicated layers"):
        ours.add_adapter("b", LoraConfig(task_type="CAUSAL_LM", layer_replication=copy.deepcopy(MAP)))
    assert len(layers_of(ours)) == 4


def test_dora_on_replicated_layers_equals_peft():
    ours = get_peft_model(base("llama"), LoraConfig(**lora_kwargs("llama", use_dora=True)))
    theirs = peft.get_peft_model(base("llama"), peft.LoraConfig(**lora_kwargs("llama", use_dora=True)))
    randomize_adapter(ours)
    assert not peft.set_peft_model_state_dict(theirs, ours.get_adapter_state_dict()).unexpected_keys
    inputs = tiny_inputs("llama")
    torch.testing.assert_close(outputs(ours, inputs), outputs(theirs, inputs), rtol=0, atol=ATOL)


def test_weighted_adapter_keeps_the_replicated_layout():
    ours, _ = pair("llama")
    inputs = tiny_inputs("llama")
    expected = outputs(ours, inputs)
    ours.add_weighted_adapter(["default"], [1.0], "copy", combination_type="cat")  # same map: not replicated again
    ours.set_adapter("copy")
    assert len(layers_of(ours)) == len(ORDER)
    torch.testing.assert_close(outputs(ours, inputs), expected, rtol=0, atol=ATOL)
