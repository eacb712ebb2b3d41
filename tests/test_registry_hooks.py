"""`PeftModel` reaches a method only through its `Method` hooks: LoRA's entry with extra hooks must see each call.

Each test registers LoRA again with recording hooks (restored afterwards), runs the public API, and checks what
the hook was given and when it ran.
"""

import contextlib
import dataclasses

import pytest
import torch
from helpers.models import tiny_inputs, tiny_model
from helpers.peft_pairs import randomize_adapter

from deltatune import LoraConfig, PeftModel, PeftType, PeftWarning, get_peft_model
from deltatune.core.layers import AdapterLayer
from deltatune.core.registry import METHODS

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture
def lora_with(monkeypatch):
    """Register LoRA with these hooks added for the test."""

    def register(**hooks):
        monkeypatch.setitem(METHODS, PeftType.LORA, dataclasses.replace(METHODS[PeftType.LORA], **hooks))

    return register


def lora_model() -> PeftModel:
    model = get_peft_model(tiny_model("llama"), LoraConfig(target_modules=TARGETS))
    randomize_adapter(model)
    return model


def layers_disabled(model: PeftModel) -> list[bool]:
    return [m.disabled for m in model.base_model.adapter_modules() if isinstance(m, AdapterLayer)]


def test_while_disabled_runs_inside_the_disabled_block(lora_with):
    events = []

    @contextlib.contextmanager
    def while_disabled(model):
        events.append(("enter", type(model).__name__, all(layers_disabled(peft))))
        yield
        events.append(("exit", all(layers_disabled(peft))))

    lora_with(while_disabled=while_disabled)
    peft = lora_model()
    with peft.disable_adapter():
        events.append("block")
    assert events == [("enter", "LlamaForCausalLM", True), "block", ("exit", True)]
    assert not any(layers_disabled(peft))


def test_before_unload_is_told_whether_the_trained_values_stay(lora_with):
    calls = []
    lora_with(before_unload=lambda model, keep_trained: calls.append((type(model).__name__, keep_trained)))
    lora_model().unload()
    lora_model().merge_and_unload()
    assert calls == [("LlamaForCausalLM", False), ("LlamaForCausalLM", True)]


def test_refuse_merge_and_refuse_rows_stop_the_call(lora_with):
    def refuse_merge(model):
        raise ValueError("no merging here")

    def refuse_rows(config, adapter_names):
        if "__base__" in adapter_names:
            raise ValueError(f"rows {list(adapter_names)} refused for r={config.r}")

    lora_with(refuse_merge=refuse_merge, refuse_rows=refuse_rows)
    peft = lora_model()
    inputs = tiny_inputs("llama", batch=2)
    with pytest.raises(ValueError, match=r"^no merging here$"):
        peft.merge_and_unload()
    with pytest.raises(ValueError, match=r"^rows \['default', '__base__'\] refused for r=8$"):
        peft(**inputs, adapter_names=["default", "__base__"])
    both = peft(**inputs, adapter_names=["default", "default"]).logits  # rows the hook accepts run as usual
    torch.testing.assert_close(both, peft(**inputs).logits)


def test_disable_warning_and_update_and_allocate(lora_with):
    lora_with(
        disable_warning=lambda config: f"r={config.r} stays", update_and_allocate=lambda model, step: 10 * step + 1
    )
    peft = lora_model()
    assert peft.base_model.update_and_allocate(4) == 41
    with pytest.warns(PeftWarning, match=r"^r=8 stays$"):
        peft.disable_adapter_layers()


def test_without_the_hook_the_core_says_what_is_missing():
    peft = lora_model()
    with pytest.raises(ValueError, match=r"holds no AdaLoRA adapter \(LORA adapters have no step outside"):
        peft.base_model.update_and_allocate(0)


def test_while_loading_wraps_the_adapter_that_a_file_fills(lora_with, tmp_path):
    lora_model().save_pretrained(tmp_path)
    seen = []

    @contextlib.contextmanager
    def while_loading(config):
        seen.append(("enter", config.r))
        yield
        seen.append("exit")

    lora_with(while_loading=while_loading)
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    loaded.load_adapter(tmp_path, "second")
    loaded.load_adapter(tmp_path, "second")  # an existing adapter's values are replaced: nothing is created
    assert seen == [("enter", 8), "exit", ("enter", 8), "exit"]
