"""LoRA's adapter management against HF peft: mixed batches, enable/disable, merge, set/add/delete adapters.

Adapters are made non-zero (init_lora_weights=False, then every trainable tensor randomised), so a forward
that ignored the update, or a key that loaded into the wrong place, would change the logits.
"""

import peft
import pytest
import torch
from helpers.models import DEFAULT_TASK, tiny_inputs, tiny_model
from helpers.peft_pairs import (
    ATOL,
    PARITY_ARCHS,
    assert_same_logits,
    logits,
    lora_pair,
    parity_kwargs,
    randomize_adapter,
    trained_pair,
)

from deltatune import LoraConfig, PeftModel
from deltatune.methods.lora.lora import LoraLayer


# ---- mixed batches (adapter_names) -------------------------------------------------------------------------------
def two_adapter_model(arch):
    """Adapters "default" and "other" (different random values) on one base, as in peft."""
    ours, _ = trained_pair(arch)
    config = LoraConfig(task_type=DEFAULT_TASK.get(arch, "CAUSAL_LM"), **parity_kwargs(arch))
    ours.add_adapter("other", config)
    ours.set_adapter("other")
    randomize_adapter(ours, seed=11)
    ours.set_adapter("default")
    return ours


def run_alone(model, name, fn):
    if name == "__base__":
        with model.disable_adapter():
            return fn()
    model.set_adapter(name)
    try:
        return fn()
    finally:
        model.set_adapter("default")


@pytest.mark.parametrize("arch", PARITY_ARCHS)
def test_mixed_batch_rows_equal_each_adapter_alone(arch):
    model = two_adapter_model(arch)
    inputs = tiny_inputs(arch)
    names = ["other", "__base__", "default"]
    mixed = logits(model, inputs, adapter_names=names)
    for row, name in enumerate(names):
        alone = run_alone(model, name, lambda: logits(model, inputs))
        torch.testing.assert_close(mixed[row], alone[row], rtol=0, atol=ATOL)
    assert not torch.allclose(mixed[0], run_alone(model, "default", lambda: logits(model, inputs))[0], atol=1e-3)


@pytest.mark.parametrize(
    "arch, num_beams", [("llama", 1), ("llama", 2), ("bloom", 1), ("gpt2", 1), ("opt", 1), ("t5", 1)]
)
def test_mixed_batch_generate_rows_equal_each_adapter_alone(arch, num_beams):
    model = two_adapter_model(arch)
    inputs = {k: v for k, v in tiny_inputs(arch).items() if k != "decoder_input_ids"}
    names = ["default", "__base__", "other"]
    settings = dict(max_new_tokens=6, do_sample=False, num_beams=num_beams, pad_token_id=0)

    def generate(**extra):
        with torch.no_grad():
            return model.generate(**inputs, **settings, **extra)

    mixed = generate(adapter_names=names)
    for row, name in enumerate(names):
        alone = run_alone(model, name, generate)
        assert torch.equal(mixed[row], alone[row]), f"row {row} ({name})"


def test_mixed_batch_rejects_unknown_names_and_wrong_row_count():
    model = two_adapter_model("llama")
    inputs = tiny_inputs("llama")
    with pytest.raises(
        ValueError, match=r"Trying to infer with non-existing adapter\(s\): nope; this model has default, other"
    ):
        model(**inputs, adapter_names=["default", "nope", "other"])
    with pytest.raises(ValueError, match="adapter_names has 2 entries for a batch of 3 rows; give one per row"):
        model(**inputs, adapter_names=["default", "other"])


# ---- the wrapper's adapter management ----------------------------------------------------------------------------
def test_disable_adapter_runs_the_base_model():
    ours, _ = trained_pair("llama")
    inputs = tiny_inputs("llama")
    adapted = logits(ours, inputs)
    with ours.disable_adapter():
        torch.testing.assert_close(logits(ours, inputs), logits(tiny_model("llama"), inputs), rtol=0, atol=0)
    assert torch.equal(logits(ours, inputs), adapted)


def test_disable_adapter_while_merged_still_runs_the_base_model():
    ours, _ = trained_pair("llama")
    inputs = tiny_inputs("llama")
    adapted = logits(ours, inputs)
    ours.merge_adapter()
    with ours.disable_adapter():
        torch.testing.assert_close(logits(ours, inputs), logits(tiny_model("llama"), inputs), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(ours, inputs), adapted, rtol=0, atol=ATOL)  # merged again after the block
    with pytest.raises(
        ValueError,
        match=r"Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first",
    ):
        ours(**inputs, adapter_names=["default", "__base__", "default"])


def test_merge_a_named_adapter():
    model = two_adapter_model("llama")
    inputs = tiny_inputs("llama")
    model.set_adapter("other")
    other = logits(model, inputs)
    model.set_adapter("default")
    with model.disable_adapter():
        base = logits(model, inputs)
    model.merge_adapter(["other"])  # folded in, while "default" stays active beside it
    model.set_adapter("other")
    torch.testing.assert_close(logits(model, inputs), other, rtol=0, atol=ATOL)  # not applied twice
    model.unmerge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, inputs), base, rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match=r"cannot merge unknown adapters \['nope'\]; this model has: default, other"):
        model.merge_adapter(["nope"])


def test_set_adapter_while_merged_unmerges_first_like_peft():
    """peft unmerges before switching; a merged "default" must not stay in the weights under "other"."""
    ours = two_adapter_model("llama")
    theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(task_type="CAUSAL_LM", **parity_kwargs("llama")))
    theirs.add_adapter("other", peft.LoraConfig(task_type="CAUSAL_LM", **parity_kwargs("llama")))
    for name in ("default", "other"):
        peft.set_peft_model_state_dict(theirs, ours.get_adapter_state_dict(name), adapter_name=name)
    inputs = tiny_inputs("llama")
    ours.merge_adapter()
    theirs.merge_adapter()
    ours.set_adapter("other")
    theirs.set_adapter("other")
    assert_same_logits(ours, theirs, inputs)
    with ours.disable_adapter():
        torch.testing.assert_close(logits(ours, inputs), logits(tiny_model("llama"), inputs), rtol=0, atol=ATOL)


def test_merge_takes_peft_arguments_and_safe_merge_refuses_nan():
    ours, theirs = trained_pair("llama")
    inputs = tiny_inputs("llama")
    expected = logits(theirs, inputs)
    ours_b = ours.get_base_model().model.layers[1].self_attn.v_proj.adapters["default"].lora_B.weight
    theirs_b = theirs.get_base_model().model.layers[1].self_attn.v_proj.lora_B["default"].weight
    good = ours_b[0, 0].item()
    with torch.no_grad():
        ours_b[0, 0] = theirs_b[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        theirs.merge_adapter(safe_merge=True)
    layer_error = (
        r"^model.layers.1.self_attn.v_proj: safe_merge: NaNs detected in the merged weights: "
        r"adapter 'default' would put NaN or inf into the base"
    )
    with pytest.raises(ValueError, match=layer_error + " weight, so nothing was merged into this layer"):
        ours.merge_adapter(safe_merge=True)
    assert torch.isfinite(ours.get_base_model().model.layers[1].self_attn.v_proj.base_layer.weight).all()
    with torch.no_grad():
        ours_b[0, 0] = theirs_b[0, 0] = good
    merged = ours.merge_and_unload(progressbar=True, safe_merge=True)
    torch.testing.assert_close(logits(merged, inputs), expected, rtol=0, atol=ATOL)
    merged_peft = theirs.merge_and_unload(progressbar=True, safe_merge=True)
    torch.testing.assert_close(logits(merged, inputs), logits(merged_peft, inputs), rtol=0, atol=ATOL)


def test_unload_gives_back_the_base_model():
    ours, _ = trained_pair("llama")
    inputs = tiny_inputs("llama")
    ours.merge_adapter()
    base = ours.unload()
    assert not any(isinstance(m, LoraLayer) for m in base.modules())
    torch.testing.assert_close(logits(base, inputs), logits(tiny_model("llama"), inputs), rtol=0, atol=1e-5)


def test_several_named_adapters_like_peft(tmp_path):
    ours = two_adapter_model("llama")
    inputs = tiny_inputs("llama")
    default_logits = logits(ours, inputs)
    ours.set_adapter("other")
    other_logits = logits(ours, inputs)
    assert not torch.allclose(default_logits, other_logits, atol=1e-3)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.other." in n for n in trainable)  # only the active adapter trains
    ours.save_pretrained(tmp_path)  # peft's layout: "default" in the folder, others in sub-folders
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    theirs.load_adapter(tmp_path / "other", "other")
    torch.testing.assert_close(logits(theirs, inputs), default_logits, rtol=0, atol=ATOL)
    theirs.set_adapter("other")
    torch.testing.assert_close(logits(theirs, inputs), other_logits, rtol=0, atol=ATOL)

    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    loaded.load_adapter(tmp_path / "other", "other")
    assert loaded.active_adapter == "default"  # load_adapter does not activate (as peft)
    torch.testing.assert_close(logits(loaded, inputs), default_logits, rtol=0, atol=ATOL)
    loaded.set_adapter("other")
    torch.testing.assert_close(logits(loaded, inputs), other_logits, rtol=0, atol=ATOL)
    loaded.delete_adapter("other")
    assert list(loaded.peft_config) == ["default"] and loaded.active_adapter == "default"
    assert not any("other" in n for n, _ in loaded.named_parameters())
    torch.testing.assert_close(logits(loaded, inputs), default_logits, rtol=0, atol=ATOL)


def test_adapter_management_errors():
    model = two_adapter_model("llama")
    with pytest.raises(ValueError, match="Adapter with name 'other' already exists; pick another adapter_name"):
        model.add_adapter("other", LoraConfig())
    with pytest.raises(ValueError, match="Adapter nope not found: this model has default, other"):
        model.set_adapter("nope")
    with pytest.raises(ValueError, match="Adapter nope does not exist: this model has default, other"):
        model.delete_adapter("nope")
    model.set_adapter("other")
    model.merge_adapter()
    with pytest.raises(
        ValueError,
        match=r"Cannot delete adapter\(s\) \['other'\] while they are merged. Please unmerge them first. Call ",
    ):
        model.delete_adapter("other")  # as peft refuses
    assert "other" in model.peft_config and model.base_model.model.model.layers[0].self_attn.q_proj.merged_adapters
    model.unmerge_adapter()
    model.delete_adapter("other")
    assert model.active_adapters == ["default"]


def test_deleting_the_last_adapter_leaves_the_base_model_like_peft():
    ours, theirs = lora_pair("llama")
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        base = theirs.get_base_model()
        with theirs.disable_adapter():
            expected = base(ids).logits
    ours.delete_adapter("default")
    theirs.delete_adapter("default")
    assert ours.peft_config == {} and ours.active_adapters == theirs.active_adapters == []
    assert not any(".adapters." in name for name, _ in ours.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, expected)
    ours.add_adapter("again", LoraConfig(target_modules=["q_proj"]))  # the model takes new adapters after
    ours.set_adapter("again")
    assert ours.active_adapter == "again"


def test_print_trainable_parameters_prints_peft_line(capsys):
    ours, theirs = lora_pair("bloom")
    theirs.print_trainable_parameters()
    expected = capsys.readouterr().out
    ours.print_trainable_parameters()
    assert capsys.readouterr().out == expected
    trainable, total = ours.get_nb_trainable_parameters()
    assert (
        expected.strip() == f"trainable params: {trainable:,d} || all params: {total:,d} || "
        f"trainable%: {100 * trainable / total:.4f}"
    )
