"""DoRA (`LoraConfig(use_dora=True)`): outputs, gradients, counts, merging and files against HF peft."""

import copy

import peft
import pytest
import torch
from helpers.models import tiny_inputs, tiny_model
from helpers.peft_pairs import copy_to_peft, logits, lora_pair, randomize_adapter
from safetensors.torch import load_file

import deltatune.ops.lora_dispatch as dispatch
from deltatune import AdaLoraConfig, LoraConfig, PeftModel, get_peft_model
from deltatune.methods.lora.dora import is_dora
from deltatune.methods.lora.lora import LoraLayer

ATOL = 1e-5
DORA = dict(r=4, lora_alpha=8, init_lora_weights=False, use_dora=True)


def dora_pair(arch: str, **kwargs):
    """(ours, peft) with the same random DoRA values (magnitudes included) in both."""
    ours, theirs = lora_pair(arch, **{**DORA, **kwargs})
    randomize_adapter(ours)
    copy_to_peft(ours, theirs)
    return ours, theirs


def file_key(name: str) -> str:
    """A parameter name of either library -> peft's file key (no adapter name, no `.weight` on the magnitude)."""
    name = name.replace(".adapters.default.", ".").replace(".default.", ".").replace(".default", "")
    return (
        name.removesuffix("lora_magnitude_vector.weight") + "lora_magnitude_vector"
        if name.endswith("lora_magnitude_vector.weight")
        else name
    )


def grads(model) -> dict[str, torch.Tensor]:
    return {file_key(n): p.grad for n, p in model.named_parameters() if p.requires_grad}


def assert_same_logits(a, b, inputs, **kwargs):
    torch.testing.assert_close(logits(a, inputs, **kwargs), logits(b, inputs, **kwargs), rtol=0, atol=ATOL)


# ---- forward, gradients, counts -------------------------------------------------------------------------
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_outputs_and_gradients_equal_peft(arch, dropout):
    ours, theirs = dora_pair(
        arch, lora_dropout=dropout, target_modules=None if arch == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    )
    inputs = tiny_inputs(arch)
    ours.train(), theirs.train()  # dropout on: the same seed gives both libraries the same masks
    outputs = []
    for model in (ours, theirs):
        torch.manual_seed(11)
        out = model(**inputs, labels=inputs["input_ids"])
        out.loss.backward()
        outputs.append(out.logits.detach())
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=ATOL)
    ours_grads, peft_grads = grads(ours), grads(theirs)
    assert ours_grads.keys() == peft_grads.keys()
    assert any("lora_magnitude_vector" in k for k in ours_grads)
    for key, grad in ours_grads.items():
        assert grad is not None and grad.abs().sum() > 0, key
        torch.testing.assert_close(grad, peft_grads[key], rtol=0, atol=ATOL, msg=key)
    if dropout:  # the masks mattered: eval (no dropout) gives other logits
        assert not torch.allclose(logits(ours.eval(), inputs), outputs[0], atol=1e-3)


def test_magnitude_starts_at_the_weight_norm_and_the_model_at_the_base():
    base = tiny_model("llama")
    expected = logits(base, tiny_inputs("llama"))
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, use_dora=True))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(
        layer.adapters["default"].lora_magnitude_vector,
        torch.linalg.norm(layer.base_layer.weight, dim=1),
        rtol=0,
        atol=1e-6,
    )
    torch.testing.assert_close(logits(model, tiny_inputs("llama")), expected, rtol=0, atol=ATOL)


def test_magnitude_changes_the_output_unlike_plain_lora():
    ours, _ = dora_pair("llama")
    plain = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_alpha=8))
    state = {k: v for k, v in ours.get_adapter_state_dict().items() if "magnitude" not in k}
    plain.load_adapter_weights(state, "default")
    inputs = tiny_inputs("llama")
    assert (logits(ours, inputs) - logits(plain, inputs)).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_parameter_counts_and_printed_line_equal_peft(arch, capsys):
    ours, theirs = dora_pair(arch)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    ours.print_trainable_parameters()
    mine = capsys.readouterr().out
    theirs.print_trainable_parameters()
    assert mine == capsys.readouterr().out
    plain = get_peft_model(tiny_model(arch), LoraConfig(r=4, lora_alpha=8))
    magnitudes = sum(p.numel() for n, p in ours.named_parameters() if n.endswith("lora_magnitude_vector"))
    assert ours.get_nb_trainable_parameters()[0] == plain.get_nb_trainable_parameters()[0] + magnitudes > 0


# ---- merging --------------------------------------------------------------------------------------------
def base_weights(model) -> dict[str, torch.Tensor]:
    return {
        file_key(n).replace(".base_layer", ""): p.detach().clone()
        for n, p in model.named_parameters()
        if "base_layer.weight" in n
    }


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_unmerge_and_merge_and_unload_equal_peft(arch):
    ours, theirs = dora_pair(arch)
    inputs = tiny_inputs(arch)
    before, expected = base_weights(ours), logits(ours, inputs)
    ours.merge_adapter(), theirs.merge_adapter()
    merged, peft_merged = base_weights(ours), base_weights(theirs)
    assert any(not torch.equal(merged[k], before[k]) for k in merged)
    for key, weight in merged.items():
        torch.testing.assert_close(weight, peft_merged[key], rtol=0, atol=1e-6, msg=key)
    torch.testing.assert_close(logits(ours, inputs), expected, rtol=0, atol=ATOL)
    ours.unmerge_adapter()
    for key, weight in base_weights(ours).items():
        torch.testing.assert_close(weight, before[key], rtol=0, atol=1e-6, msg=key)
    ours_model, peft_model = ours.merge_and_unload(safe_merge=True), theirs.merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, LoraLayer) for m in ours_model.modules())
    ours_state, peft_state = ours_model.state_dict(), peft_model.state_dict()
    for key, value in ours_state.items():
        torch.testing.assert_close(value, peft_state[key], rtol=0, atol=1e-6, msg=key)
    torch.testing.assert_close(logits(ours_model, inputs), expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_matches_peft_merged_and_unmerged(dtype):
    kwargs = dict(task_type="CAUSAL_LM", **DORA)
    base = tiny_model("llama").to(dtype)
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(**kwargs))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    randomize_adapter(ours)
    copy_to_peft(ours, theirs)
    inputs = tiny_inputs("llama")
    assert_same_logits(ours, theirs, inputs)
    before = base_weights(ours)
    ours.merge_adapter(), theirs.merge_adapter()
    one_step = torch.finfo(dtype).eps  # worked in fp32 and rounded once, as peft: at most one rounding step apart
    for key, weight in base_weights(ours).items():
        torch.testing.assert_close(weight, base_weights(theirs)[key], rtol=one_step, atol=0, msg=key)
    assert_same_logits(ours, theirs, inputs)
    ours.unmerge_adapter(), theirs.unmerge_adapter()
    for key, weight in base_weights(ours).items():  # the merge's step carried through the unmerge's
        torch.testing.assert_close(weight, base_weights(theirs)[key], rtol=2 * one_step, atol=0, msg=key)
        torch.testing.assert_close(weight, before[key], rtol=0, atol=2e-2, msg=key)  # half precision: lossy, as peft


def test_safe_merge_refuses_a_nan_magnitude_and_leaves_the_weight():
    ours, _ = dora_pair("llama")
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    before = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.adapters["default"].lora_magnitude_vector[0] = float("nan")
    with pytest.raises(
        ValueError,
        match=r"q_proj: safe_merge: NaNs detected in the merged weights: "
        r"adapter 'default' would put NaN or inf",
    ):
        ours.merge_adapter(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, before) and not layer.merged_adapters


def test_disable_adapter_while_merged_runs_the_base():
    ours, _ = dora_pair("llama")
    inputs = tiny_inputs("llama")
    base = logits(tiny_model("llama"), inputs)
    ours.merge_adapter()
    with ours.disable_adapter():
        torch.testing.assert_close(logits(ours, inputs), base, rtol=0, atol=ATOL)
    assert_same_logits(ours, ours, inputs)


# ---- files both ways and several adapters ---------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_files_load_across_libraries(arch, tmp_path):
    ours, theirs = dora_pair(arch)
    inputs = tiny_inputs(arch)
    ours.save_pretrained(tmp_path / "ours")
    keys = load_file(tmp_path / "ours" / "adapter_model.safetensors").keys()
    assert any(k.endswith("c_attn.lora_magnitude_vector") or k.endswith("q_proj.lora_magnitude_vector") for k in keys)
    loaded_in_peft = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path / "ours")
    assert_same_logits(ours, loaded_in_peft, inputs)
    randomize_adapter(theirs, seed=8)  # other values than ours, so a load that did nothing shows
    theirs.save_pretrained(tmp_path / "peft")
    loaded = PeftModel.from_pretrained(tiny_model(arch), tmp_path / "peft")
    assert loaded.peft_config["default"].use_dora
    assert_same_logits(loaded, theirs, inputs)
    assert (logits(loaded, inputs) - logits(ours, inputs)).abs().max() > 1e-3


def test_a_dora_and_a_plain_adapter_on_one_base_like_peft(tmp_path):
    ours, theirs = dora_pair("llama")
    plain = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, task_type="CAUSAL_LM")
    torch.manual_seed(9)
    ours.add_adapter("plain", plain)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    theirs.load_adapter(tmp_path / "plain", "plain")
    inputs = tiny_inputs("llama")
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert is_dora(layer.adapters["default"]) and not is_dora(layer.adapters["plain"])
    for name in ("plain", "default", "plain"):
        ours.set_adapter(name), theirs.set_adapter(name)
        assert_same_logits(ours, theirs, inputs)
    before = base_weights(ours)
    ours.merge_adapter(["plain", "default"]), theirs.merge_adapter(["plain", "default"])
    for key, weight in base_weights(ours).items():  # the DoRA norm is taken on the weight without "plain"
        torch.testing.assert_close(weight, base_weights(theirs)[key], rtol=0, atol=1e-6, msg=key)
    ours.unmerge_adapter()
    for key, weight in base_weights(ours).items():
        torch.testing.assert_close(weight, before[key], rtol=0, atol=1e-6, msg=key)


# ---- fast paths and mixed batches -----------------------------------------------------------------------
def test_fast_paths_never_take_a_dora_adapter(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a fast path ran")

    for name in ("lora_linear", "lora_linear_inference", "mixed_lora_linear", "_inference_kernel"):
        monkeypatch.setattr(dispatch, name, refuse)
    ours, theirs = dora_pair("llama", lora_dropout=0.1)
    ours.eval(), theirs.eval()
    inputs = tiny_inputs("llama")
    assert_same_logits(ours, theirs, inputs)
    ours.train()
    ours(**inputs, labels=inputs["input_ids"]).loss.backward()
    ours.eval()
    generated = ours.generate(input_ids=inputs["input_ids"][:1], max_new_tokens=3, do_sample=False)
    assert torch.equal(generated, theirs.generate(input_ids=inputs["input_ids"][:1], max_new_tokens=3, do_sample=False))
    plain = get_peft_model(tiny_model("llama"), LoraConfig(r=4))  # the spy works: a plain adapter is taken
    with pytest.raises(AssertionError, match="a fast path ran"):
        logits(plain, inputs)


def test_mixed_batch_refuses_a_dora_adapter_as_peft_does():
    ours, theirs = dora_pair("llama")
    ours.eval(), theirs.eval()  # peft takes adapter_names in eval mode only
    torch.manual_seed(9)
    ours.add_adapter("plain", LoraConfig(r=4, init_lora_weights=False))
    inputs = tiny_inputs("llama")
    with pytest.raises(
        ValueError,
        match=r"Cannot pass `adapter_names` when DoRA is enabled: adapter_names includes the DoRA adapter 'default'",
    ):
        logits(ours, inputs, adapter_names=["default", "plain", "__base__"])
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled"):
        logits(theirs, inputs, adapter_names=["default", "default", "__base__"])
    mixed = logits(ours, inputs, adapter_names=["plain", "__base__", "plain"])  # no DoRA row: allowed, as in peft
    ours.set_adapter("plain")
    torch.testing.assert_close(mixed[[0, 2]], logits(ours, inputs)[[0, 2]], rtol=0, atol=ATOL)


# ---- embeddings, AdaLoRA, quantised bases ----------------------------------------------------------------
def test_embedding_dora_matches_peft_merged_and_files(tmp_path):
    ours, theirs = dora_pair("llama", target_modules=["embed_tokens", "q_proj"])
    inputs = tiny_inputs("llama")
    assert is_dora(ours.base_model.model.model.embed_tokens.adapters["default"])
    assert_same_logits(ours, theirs, inputs)
    ours.train(), theirs.train()
    for model in (ours, theirs):
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
    peft_grads = grads(theirs)
    for key, grad in grads(ours).items():
        torch.testing.assert_close(grad, peft_grads[key], rtol=0, atol=ATOL, msg=key)
    ours.eval(), theirs.eval()
    ours.save_pretrained(tmp_path)
    assert_same_logits(peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path), theirs, inputs)
    expected = logits(ours, inputs)
    ours.merge_adapter(), theirs.merge_adapter()
    for key, weight in base_weights(ours).items():
        torch.testing.assert_close(weight, base_weights(theirs)[key], rtol=0, atol=1e-6, msg=key)
    torch.testing.assert_close(logits(ours, inputs), expected, rtol=0, atol=ATOL)


def test_adalora_refuses_dora_like_peft():
    with pytest.raises(
        ValueError, match=r"^ADALORA does not support DoRA \(use_dora=True.*LoraConfig\(use_dora=True\)"
    ):
        AdaLoraConfig(total_step=10, use_dora=True)
    with pytest.raises(ValueError, match="does not support DoRA"):
        peft.AdaLoraConfig(total_step=10, use_dora=True)


@pytest.mark.parametrize("bits", [4, 8])
def test_qdora_on_a_bitsandbytes_base_matches_peft(bits, tmp_path):
    pytest.importorskip("bitsandbytes")
    from helpers.quant import load

    from deltatune.quantization import dequantize_model, dequantized_weight

    base = tiny_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=1, pad_token_id=None)
    base.save_pretrained(tmp_path)
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)
    # train mode: peft's DoRA norm dequantises, and would misread codes an eval forward repacked (helpers.quant.load)
    ours = get_peft_model(load(tmp_path, bits, train=True), LoraConfig(**kwargs, init_lora_weights=False))
    theirs = peft.get_peft_model(load(tmp_path, bits, train=True), peft.LoraConfig(**kwargs))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    randomize_adapter(ours)
    copy_to_peft(ours, theirs)
    ids = torch.arange(24).reshape(3, 8) % 100
    outputs = [model(input_ids=ids, labels=ids) for model in (ours, theirs)]
    torch.testing.assert_close(outputs[0].logits, outputs[1].logits, rtol=0, atol=ATOL)
    for out in outputs:
        out.loss.backward()
    peft_grads = grads(theirs)
    for key, grad in grads(ours).items():
        torch.testing.assert_close(grad, peft_grads[key], rtol=0, atol=ATOL, msg=key)
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    weight = dequantized_weight(layer.base_layer).clone()
    logits(ours.eval(), {"input_ids": ids})  # an eval forward (repacks 4-bit codes on this CPU)
    # the DoRA norm still reads the same weight (up to the bf16 block scales the repacking keeps; misread: ~0.1 off)
    torch.testing.assert_close(dequantized_weight(layer.base_layer), weight, rtol=0, atol=1e-3)
    dequantize_model(ours.get_base_model())  # what merge_and_unload does first: then the merge itself is exact
    expected = logits(ours, {"input_ids": ids})
    merged = ours.merge_and_unload()
    torch.testing.assert_close(logits(merged, {"input_ids": ids}), expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("bits", [4, 8])
def test_qdora_merge_into_the_quantised_codes_equals_peft(bits, tmp_path):
    """merge_adapter on a 4-/8-bit base (no dequantize_model first): the DoRA-scaled weight is quantised again,
    lossy, to the codes peft gives; unmerging quantises once more, again as peft."""
    pytest.importorskip("bitsandbytes")
    from helpers.quant import load, save_tiny_llama

    from deltatune.quantization import dequantized_weight

    save_tiny_llama(tmp_path)
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)
    ours = get_peft_model(load(tmp_path, bits, train=True), LoraConfig(**kwargs, init_lora_weights=False))
    theirs = peft.get_peft_model(load(tmp_path, bits, train=True), peft.LoraConfig(**kwargs))
    randomize_adapter(ours)
    copy_to_peft(ours, theirs)
    ids = {"input_ids": torch.arange(24).reshape(3, 8) % 100}
    unmerged = logits(ours, ids)
    names = [n for n, m in ours.get_base_model().named_modules() if isinstance(m, LoraLayer)]
    assert len(names) == 6

    def assert_same_codes():
        for name in names:
            mine = ours.get_base_model().get_submodule(name).base_layer
            peft_layer = theirs.get_base_model().get_submodule(name).base_layer
            # the same codes: a code one step off moves a weight by a grid step (> 1e-3); the block scales may
            # differ in the last fp32 bit (the merged weight's order of rounding)
            torch.testing.assert_close(
                dequantized_weight(mine), dequantized_weight(peft_layer), rtol=0, atol=1e-6, msg=name
            )
        torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=0, atol=ATOL)

    for model in (ours, theirs):
        model.merge_adapter()
    assert_same_codes()
    assert (logits(ours, ids) - unmerged).abs().max() > ATOL  # re-quantising is lossy, so this is not a no-op
    for model in (ours, theirs):
        model.unmerge_adapter()
    assert_same_codes()


# ---- command line ---------------------------------------------------------------------------------------
def test_cli_train_with_dora_writes_a_peft_dora_adapter(tmp_path, capsys):
    from helpers.chat_model import make_tiny_model
    from transformers import AutoModelForCausalLM

    from deltatune.cli import main, train

    tiny = make_tiny_model(str(tmp_path / "model"))
    out = str(tmp_path / "run")
    assert (
        main(
            [
                "train",
                "--model",
                tiny,
                "--method",
                "lora",
                "--dora",
                "--r",
                "4",
                "--max-steps",
                "1",
                "--batch-size",
                "2",
                "--max-length",
                "64",
                "--output",
                out,
            ]
        )
        == 0
    )
    assert "dora: true" in (tmp_path / "run" / "run.yaml").read_text()
    tensors = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert any(k.endswith("lora_magnitude_vector") for k in tensors)
    ours = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), out)
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), out)
    assert ours.peft_config["default"].use_dora and theirs.peft_config["default"].use_dora
    ids = {"input_ids": torch.tensor([[1, 5, 9, 30, 7, 2]])}
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match=r"--dora does not apply to --method adapter .*--dora is for lora"):
        train({"model": tiny, "method": "adapter", "dora": True, "output": str(tmp_path / "other")})
