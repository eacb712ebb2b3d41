"""LoraConfig(trainable_token_indices=...) against HF peft: only chosen embedding rows train beside LoRA.

The pair's rows and LoRA factors are set to random non-zero values in ours and copied into peft through peft's
own loader, so a row that was ignored, replaced in the wrong place, or saved under the wrong key changes logits.
llama has untied embeddings; gpt2 ties its LM head to `wte`; t5 ties `shared`, both `embed_tokens` and `lm_head`.
"""

import copy

import peft
import pytest
import torch
from helpers.models import DEFAULT_TASK, tiny_inputs, tiny_model
from helpers.peft_pairs import ATOL, assert_same_logits, copy_to_peft, logits, lora_pair, randomize_adapter
from peft.utils.other import TrainableTokensWrapper
from safetensors.torch import load_file

import deltatune
from deltatune import LoraConfig, PeftModel
from deltatune.core.layers import peft_key
from deltatune.methods.adalora import AdaLoraConfig
from deltatune.methods.lora.trainable_tokens import TrainableTokensLayer

TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "t5": ["q", "v"]}
EMBEDDING = {"llama": "model.embed_tokens", "gpt2": "transformer.wte", "t5": "shared"}
IDS = [3, 5, 7]


def token_inputs(arch):
    """tiny_inputs with the chosen tokens in them (the encoder's and the decoder's inputs for t5)."""
    inputs = tiny_inputs(arch)
    for key in ("input_ids", "decoder_input_ids"):
        if key in inputs:
            inputs[key][:2, -3:] = torch.tensor(IDS)
    return inputs


def pair(arch, indices=IDS, seed=3, **kwargs):
    """(ours, peft) with the same random rows and LoRA factors."""
    ours, theirs = lora_pair(arch, target_modules=TARGETS[arch], trainable_token_indices=indices, **kwargs)
    randomize_adapter(ours, seed=seed)
    copy_to_peft(ours, theirs)
    return ours, theirs


def token_layers(model):
    """{name: tied?} of our trainable-token layers (names as in the transformers model, duplicates included)."""
    return {
        n: bool(m._tied_to)
        for n, m in model.get_base_model().named_modules(remove_duplicate=False)
        if isinstance(m, TrainableTokensLayer)
    }


def peft_token_layers(model):
    return {
        n: m.token_adapter.tied_adapter is not None
        for n, m in model.get_base_model().named_modules(remove_duplicate=False)
        if isinstance(m, TrainableTokensWrapper)
    }


def file_key_grads(model, ours: bool) -> dict[str, torch.Tensor]:
    """Gradients of the trainable tensors under their adapter-file keys."""
    name = "default"
    return {
        (peft_key(k, name) if ours else k.replace(f".{name}", "")): p.grad
        for k, p in model.named_parameters()
        if p.requires_grad
    }


def embedding_weight(model, arch) -> torch.Tensor:
    return model.get_submodule(EMBEDDING[arch]).weight


# ---- parity with peft ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
def test_same_layers_and_trainable_count_as_peft(arch):
    ours, theirs = lora_pair(arch, target_modules=TARGETS[arch], trainable_token_indices=IDS)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert token_layers(ours) == peft_token_layers(theirs)
    expected_tied = {
        "llama": set(),
        "gpt2": {"lm_head"},
        "t5": {"encoder.embed_tokens", "decoder.embed_tokens", "lm_head"},
    }[arch]
    assert {n for n, tied in token_layers(ours).items() if tied} == expected_tied
    rows = ours.get_base_model().get_submodule(EMBEDDING[arch]).adapters["default"].trainable_tokens_delta
    assert rows.requires_grad and tuple(rows.shape) == (3, 32)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
def test_untrained_rows_leave_the_base_model_unchanged(arch):
    base = tiny_model(arch)
    ours, _ = lora_pair(arch, target_modules=TARGETS[arch], trainable_token_indices=IDS)  # LoRA B starts at zero
    torch.testing.assert_close(logits(ours, token_inputs(arch)), logits(base, token_inputs(arch)), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
def test_same_logits_and_gradients_as_peft(arch):
    ours, theirs = pair(arch)
    inputs = token_inputs(arch)
    assert_same_logits(ours, theirs, inputs)
    assert not torch.allclose(logits(ours, inputs), logits(tiny_model(arch), inputs), atol=1e-3)
    labels = inputs["decoder_input_ids"] if arch == "t5" else inputs["input_ids"]
    for model in (ours, theirs):
        model(**inputs, labels=labels).loss.backward()
    ours_grads, peft_grads = file_key_grads(ours, True), file_key_grads(theirs, False)
    assert ours_grads.keys() == peft_grads.keys()
    for key, grad in ours_grads.items():
        torch.testing.assert_close(grad, peft_grads[key], rtol=1e-4, atol=1e-6, msg=key)
    token_key = next(k for k in ours_grads if "trainable_tokens_delta" in k)
    assert ours_grads[token_key].abs().sum() > 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_training_changes_only_the_chosen_rows_as_peft_does(arch):
    base = tiny_model(arch)
    ours, theirs = pair(arch)
    inputs = token_inputs(arch)
    for model in (ours, theirs):
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        for _ in range(3):
            model(**inputs, labels=inputs["input_ids"]).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    layer = ours.get_base_model().get_submodule(EMBEDDING[arch])
    rows = layer.adapters["default"].trainable_tokens_delta.detach()
    peft_rows = theirs.get_base_model().get_submodule(EMBEDDING[arch]).token_adapter.trainable_tokens_delta["default"]
    torch.testing.assert_close(rows, peft_rows.detach(), rtol=1e-4, atol=1e-6)
    assert torch.equal(layer.base_layer.weight, embedding_weight(base, arch))  # the frozen base did not move
    merged = ours.merge_and_unload()
    weight, base_weight = embedding_weight(merged, arch), embedding_weight(base, arch)
    others = [i for i in range(weight.shape[0]) if i not in IDS]
    assert torch.equal(weight[others], base_weight[others])  # bit-equal: every other row is the base's
    assert torch.equal(weight[IDS], rows)
    assert not torch.allclose(weight[IDS], base_weight[IDS])


def test_tied_lm_head_scores_tokens_with_the_trained_rows():
    ours, theirs = pair("gpt2")
    inputs = token_inputs("gpt2")
    with torch.no_grad():
        out = ours(**inputs, output_hidden_states=True)
    hidden = out.hidden_states[-1]  # (B, T, dim), after the final norm
    rows = ours.get_base_model().transformer.wte.adapters["default"].trainable_tokens_delta
    base_weight = ours.get_base_model().lm_head.base_layer.weight
    torch.testing.assert_close(out.logits[..., IDS], hidden @ rows.T, rtol=0, atol=ATOL)
    torch.testing.assert_close(out.logits[..., 10:20], hidden @ base_weight[10:20].T, rtol=0, atol=ATOL)
    assert not any("lm_head" in k for k in ours.get_adapter_state_dict())  # saved once, under the embedding


def test_tied_head_keeps_its_bias():
    """peft's tied head drops the head's bias (F.linear without it); ours keeps it, so untrained rows change nothing."""
    base = tiny_model("gpt2")
    base.lm_head = torch.nn.Linear(32, 100, bias=True)
    base.lm_head.weight = base.transformer.wte.weight
    torch.nn.init.normal_(base.lm_head.bias)
    ours = deltatune.get_peft_model(
        copy.deepcopy(base), LoraConfig(task_type="CAUSAL_LM", target_modules=["c_attn"], trainable_token_indices=IDS)
    )
    assert token_layers(ours) == {"transformer.wte": False, "lm_head": True}
    torch.testing.assert_close(logits(ours, token_inputs("gpt2")), logits(base, token_inputs("gpt2")), rtol=0, atol=0)


def test_generate_matches_peft():
    ours, theirs = pair("gpt2", seed=4)
    inputs = {k: v[:2] for k, v in token_inputs("gpt2").items()}
    settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(**inputs, **settings), theirs.generate(**inputs, **settings))


# ---- merging and unloading -------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
def test_merge_and_unload_gives_the_unmerged_logits_and_peft_weights(arch):
    ours, theirs = pair(arch)
    inputs = token_inputs(arch)
    before = logits(ours, inputs)
    merged, peft_merged = ours.merge_and_unload(), theirs.merge_and_unload()
    assert not any(isinstance(m, TrainableTokensLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, inputs), before, rtol=0, atol=ATOL)
    assert torch.equal(embedding_weight(merged, arch), embedding_weight(peft_merged, arch))
    if arch != "llama":  # tied: the head is the same tensor, holding the merged rows
        assert merged.get_output_embeddings().weight is embedding_weight(merged, arch)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_unmerge_disable_and_unload_give_the_base_back(arch):
    base = tiny_model(arch)
    ours, _ = pair(arch)
    inputs = token_inputs(arch)
    adapted = logits(ours, inputs)
    ours.merge_adapter()
    torch.testing.assert_close(logits(ours, inputs), adapted, rtol=0, atol=ATOL)
    with ours.disable_adapter():  # a merged adapter is taken out for the block
        torch.testing.assert_close(logits(ours, inputs), logits(base, inputs), rtol=0, atol=ATOL)
    torch.testing.assert_close(logits(ours, inputs), adapted, rtol=0, atol=ATOL)
    ours.unmerge_adapter()
    assert torch.equal(embedding_weight(ours.get_base_model(), arch).data, embedding_weight(base, arch))
    unloaded = ours.unload()
    assert torch.equal(embedding_weight(unloaded, arch), embedding_weight(base, arch))
    # the embedding is bit-equal; LoRA's merge then unmerge rounds its weights, hence the tolerance
    torch.testing.assert_close(logits(unloaded, inputs), logits(base, inputs), rtol=0, atol=ATOL)


def test_safe_merge_refuses_nan_rows_and_changes_nothing():
    ours, _ = pair("llama")
    before = embedding_weight(ours.get_base_model(), "llama").detach().clone()
    with torch.no_grad():
        ours.get_base_model().model.embed_tokens.adapters["default"].trainable_tokens_delta[0, 0] = float("nan")
    with pytest.raises(ValueError, match="model.embed_tokens: safe_merge: adapter 'default' has NaN or inf"):
        ours.merge_adapter(safe_merge=True)
    assert torch.equal(embedding_weight(ours.get_base_model(), "llama"), before)


# ---- files -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "arch, indices",
    [("llama", IDS), ("gpt2", IDS), ("t5", IDS), ("llama", {"embed_tokens": [3, 5], "lm_head": [7, 9]})],
)
def test_saved_files_hold_the_same_keys_and_values_as_peft(tmp_path, arch, indices):
    ours, theirs = pair(arch, indices=indices)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    saved = load_file(tmp_path / "ours/adapter_model.safetensors")
    peft_saved = load_file(tmp_path / "peft/adapter_model.safetensors")
    assert sorted(saved) == sorted(peft_saved)
    assert any(k.endswith(".token_adapter.trainable_tokens_delta") for k in saved)
    for key, value in saved.items():
        assert torch.equal(value, peft_saved[key]), key
    config = deltatune.PeftConfig.from_pretrained(tmp_path / "peft")
    assert config.trainable_token_indices == indices


@pytest.mark.parametrize(
    "arch, indices",
    [("llama", IDS), ("gpt2", IDS), ("t5", IDS), ("llama", {"embed_tokens": [3, 5], "lm_head": [7, 9]})],
)
def test_files_load_both_ways(tmp_path, arch, indices):
    task = DEFAULT_TASK.get(arch, "CAUSAL_LM")
    inputs = token_inputs(arch)
    ours, _ = pair(arch, indices=indices)
    ours.save_pretrained(tmp_path / "ours")
    into_peft = peft.PeftModel.from_pretrained(tiny_model(arch, task), tmp_path / "ours")
    torch.testing.assert_close(logits(into_peft, inputs), logits(ours, inputs), rtol=0, atol=ATOL)

    _, theirs = lora_pair(arch, seed=9, target_modules=TARGETS[arch], trainable_token_indices=indices)
    randomize_adapter(theirs, seed=21)
    theirs.save_pretrained(tmp_path / "peft")
    into_ours = PeftModel.from_pretrained(tiny_model(arch, task), tmp_path / "peft")
    torch.testing.assert_close(logits(into_ours, inputs), logits(theirs, inputs), rtol=0, atol=ATOL)
    assert not torch.allclose(logits(into_ours, inputs), logits(ours, inputs), atol=1e-3)


# ---- the dict form ---------------------------------------------------------------------------------------------
def test_dict_form_trains_rows_of_an_untied_lm_head_as_peft():
    indices = {"embed_tokens": [3, 5], "lm_head": [7, 9]}
    ours, theirs = pair("llama", indices=indices)
    assert token_layers(ours) == {"model.embed_tokens": False, "lm_head": False} == peft_token_layers(theirs)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert_same_logits(ours, theirs, token_inputs("llama"))


@pytest.mark.parametrize("head_ids, tied", [(IDS, True), ([8, 9], False)])
def test_dict_form_on_tied_weights_ties_only_with_the_same_ids(head_ids, tied):
    ours, theirs = pair("gpt2", indices={"wte": IDS, "lm_head": head_ids})
    assert token_layers(ours) == {"transformer.wte": False, "lm_head": tied} == peft_token_layers(theirs)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert_same_logits(ours, theirs, token_inputs("gpt2"))


# ---- several adapters ------------------------------------------------------------------------------------------
def two_adapters():
    """ "default" rows IDS, "other" rows [8, 9], in ours and in peft, with the same values."""
    ours, theirs = pair("gpt2")
    config = dict(task_type="CAUSAL_LM", target_modules=["c_attn"], trainable_token_indices=[8, 9])
    ours.add_adapter("other", LoraConfig(**config))
    theirs.add_adapter("other", peft.LoraConfig(**config))
    ours.set_adapter("other")
    randomize_adapter(ours, seed=17)
    peft.set_peft_model_state_dict(theirs, ours.get_adapter_state_dict("other"), adapter_name="other")
    return ours, theirs.eval()  # peft refuses adapter_names in training mode


def test_second_adapter_switches_rows_as_peft():
    ours, theirs = two_adapters()
    inputs = token_inputs("gpt2")
    inputs["input_ids"][2, -2:] = torch.tensor([8, 9])
    for name in ("other", "default"):
        ours.set_adapter(name)
        theirs.set_adapter(name)
        assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
        assert_same_logits(ours, theirs, inputs)
    mixed = logits(ours, inputs, adapter_names=["other", "__base__", "default"])
    assert_same_logits(ours, theirs, inputs, adapter_names=["other", "__base__", "default"])
    ours.set_adapter("other")
    torch.testing.assert_close(mixed[0], logits(ours, inputs)[0], rtol=0, atol=ATOL)


def test_merging_two_adapters_needs_disjoint_rows():
    ours, _ = two_adapters()
    ours.merge_adapter(["default", "other"])  # rows 3, 5, 7 and 8, 9: disjoint
    weight = embedding_weight(ours.get_base_model(), "gpt2")
    rows = {n: ours.get_base_model().transformer.wte.adapters[n].trainable_tokens_delta for n in ("default", "other")}
    assert torch.equal(weight[IDS], rows["default"]) and torch.equal(weight[[8, 9]], rows["other"])
    ours.unmerge_adapter()
    ours.add_adapter(
        "overlap", LoraConfig(task_type="CAUSAL_LM", target_modules=["c_attn"], trainable_token_indices=[7, 20])
    )
    with pytest.raises(ValueError, match="adapters 'default' and 'overlap' both train token 7"):
        ours.merge_adapter(["default", "overlap"])


def test_weighted_combination_refuses_adapters_with_token_rows():
    """peft's add_weighted_adapter would drop the rows silently; deltatune says so and adds nothing."""
    ours, _ = two_adapters()
    with pytest.raises(
        ValueError,
        match=r"cannot combine adapters with trainable_token_indices set \('default'\): "
        r"the combined adapter would lose their B biases / token rows",
    ):
        ours.add_weighted_adapter(["default", "other"], [1.0, 1.0], "both", combination_type="cat")
    assert "both" not in ours.peft_config


def test_deleting_an_adapter_drops_its_rows():
    ours, _ = two_adapters()
    ours.set_adapter("default")
    ours.delete_adapter("other")
    assert list(ours.get_base_model().transformer.wte.adapters) == ["default"]
    assert not any(".other." in k for k in ours.state_dict())


def test_adalora_trains_token_rows_as_peft():
    kwargs = dict(task_type="CAUSAL_LM", target_modules=["q_proj"], total_step=10, trainable_token_indices=IDS)
    ours_base, peft_base = tiny_model("llama"), tiny_model("llama")
    ours = deltatune.get_peft_model(ours_base, AdaLoraConfig(**kwargs))
    theirs = peft.get_peft_model(peft_base, peft.AdaLoraConfig(**kwargs))
    trainable, total = ours.get_nb_trainable_parameters()
    peft_trainable, peft_total = theirs.get_nb_trainable_parameters()
    assert trainable == peft_trainable == 2 * (12 * 32 + 12 + 32 * 12) + 3 * 32  # two SVD triplet sets + 3 rows
    assert total == peft_total  # each SVD layer's frozen 1-element `ranknum` counted by both
    inputs = token_inputs("llama")
    ours.train()
    ours(**inputs, labels=inputs["input_ids"]).loss.backward()
    ours.base_model.update_and_allocate(1)
    assert sorted(ours.get_adapter_state_dict()) == sorted(peft.get_peft_model_state_dict(theirs))


# ---- errors ----------------------------------------------------------------------------------------------------
def add(arch="llama", target_modules_extra=(), **kwargs):
    config = LoraConfig(task_type="CAUSAL_LM", target_modules=[*TARGETS[arch], *target_modules_extra], **kwargs)
    return deltatune.get_peft_model(tiny_model(arch), config)


def test_index_outside_the_vocabulary_is_refused():
    with pytest.raises(ValueError, match=r"token ids \[100\] are outside model.embed_tokens's 100 rows.*resize_token"):
        add(trainable_token_indices=[3, 100])
    with pytest.raises(ValueError, match=r"trainable_token_indices=\[-1\] has a negative token id"):
        add(trainable_token_indices=[-1])


def test_dict_key_matching_no_module_is_refused_naming_the_embeddings():
    with pytest.raises(ValueError, match=r"'nothere' matched no module of LlamaForCausalLM.*model.embed_tokens"):
        add(trainable_token_indices={"embed_tokens": [3], "nothere": [3]})


@pytest.mark.parametrize("bad", [["3"], [3.0], [True], "3", 3, [[3]]])
def test_index_list_of_non_ints_is_refused(bad):
    with pytest.raises(TypeError, match=r"trainable_token_indices=.* must be a list of token ids \(ints\)"):
        LoraConfig(trainable_token_indices=bad)
    with pytest.raises(TypeError, match=r"trainable_token_indices\['embed_tokens'\]=.* must be a list of token ids"):
        LoraConfig(trainable_token_indices={"embed_tokens": bad})


def test_repeated_and_empty_index_lists_are_refused():
    with pytest.raises(ValueError, match=r"lists token ids \[5\] more than once"):
        LoraConfig(trainable_token_indices=[5, 3, 5])
    with pytest.raises(ValueError, match=r"trainable_token_indices=\[\] lists no token"):
        LoraConfig(trainable_token_indices=[])


def test_a_layer_that_is_not_an_embedding_is_refused():
    with pytest.raises(TypeError, match=r"model.layers.0.mlp is a LlamaMLP, not an nn.Embedding"):
        add(trainable_token_indices={"layers.0.mlp": [3]})


@pytest.mark.parametrize("indices", [IDS, {"embed_tokens": IDS}])
def test_modules_to_save_conflict_is_refused_before_the_model_changes(indices):
    base = tiny_model("llama")
    config = LoraConfig(
        task_type="CAUSAL_LM",
        target_modules=["q_proj"],
        modules_to_save=["embed_tokens"],
        trainable_token_indices=indices,
    )
    with pytest.raises(ValueError, match="model.embed_tokens is in both modules_to_save .* and trainable_token_ind"):
        deltatune.get_peft_model(base, config)
    assert not any(isinstance(m, (TrainableTokensLayer, deltatune.core.layers.AdapterLayer)) for m in base.modules())
    if isinstance(indices, dict):  # peft refuses this form too (the list form breaks later, in its forward)
        peft_config = peft.LoraConfig(
            task_type="CAUSAL_LM",
            target_modules=["q_proj"],
            modules_to_save=["embed_tokens"],
            trainable_token_indices=indices,
        )
        with pytest.raises(ValueError, match="already marked to be trained fully"):
            peft.get_peft_model(tiny_model("llama"), peft_config)


def test_lora_on_the_same_embedding_is_refused():
    with pytest.raises(ValueError, match="model.embed_tokens is also a LoRA target; a module takes one method"):
        add(trainable_token_indices=IDS, target_modules_extra=["embed_tokens"])


def test_config_round_trips_through_json(tmp_path):
    config = LoraConfig(task_type="CAUSAL_LM", trainable_token_indices={"embed_tokens": [1, 2]})
    config.save_pretrained(tmp_path)
    assert deltatune.PeftConfig.from_pretrained(tmp_path).trainable_token_indices == {"embed_tokens": [1, 2]}
