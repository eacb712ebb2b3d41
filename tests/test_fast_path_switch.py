"""Which LoRA forward runs: the switch that forces the reference path (`set_fast_paths`, `DELTATUNE_FAST_PATHS=0`)
and the probe of the torch internals the fast paths read (`deltatune.ops.torch_internals`).

With the fast paths off, or on a torch that fails the probe, no LoRA layer may enter deltatune.ops, and the
numbers must equal the fast path's (fp32, 1e-5).
"""

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers.ops import close, leaves, lora_model

import deltatune
from deltatune.ops import lora_dispatch, lora_linear, torch_internals

# every ops function a LoRA layer's fast forward calls
OPS_CALLS = ("lora_linear", "lora_linear_inference", "mixed_lora_linear", "apply_row_factors", "_inference_kernel")


def refuse_ops(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a LoRA fast path ran")

    for name in OPS_CALLS:
        monkeypatch.setattr(lora_dispatch, name, refuse)


def everything_a_layer_computes(model, ids) -> dict:
    """Training loss and adapter gradients, eval logits, mixed-batch logits and greedy tokens of `model`."""
    model.set_adapter("a")
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    model.eval()
    with torch.no_grad():
        eval_logits = model(input_ids=ids).logits
        mixed_logits = model(input_ids=ids, adapter_names=["b", "__base__"]).logits
    tokens = model.generate(input_ids=ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    mixed_tokens = model.generate(input_ids=ids, adapter_names=["a", "b"], max_new_tokens=3, pad_token_id=0)
    return dict(
        loss=loss, grads=grads, eval_logits=eval_logits, mixed_logits=mixed_logits, tokens=tokens, mixed=mixed_tokens
    )


def assert_same_numbers(got: dict, want: dict) -> None:
    for key in ("loss", "eval_logits", "mixed_logits"):
        assert close(got[key], want[key])[0], (key, close(got[key], want[key])[1])
    assert len(got["grads"]) == len(want["grads"]) > 0
    for g, w in zip(got["grads"], want["grads"], strict=True):
        assert close(g, w)[0], close(g, w)[1]
    assert torch.equal(got["tokens"], want["tokens"])
    assert torch.equal(got["mixed"], want["mixed"])


@pytest.fixture
def model_and_ids():
    torch.manual_seed(0)
    return lora_model(names=("a", "b")), torch.randint(0, 100, (2, 9))


@pytest.fixture
def fast_reference(model_and_ids):
    """What the fast paths compute, taken before any switch is touched."""
    with deltatune.use_fast_paths(True):
        assert deltatune.fast_paths_enabled()
        return everything_a_layer_computes(*model_and_ids)


@pytest.fixture
def restored_switch():
    """Whatever a test sets with `set_fast_paths`, the switch is back to on afterwards."""
    with deltatune.use_fast_paths(True):
        yield


def test_the_spy_sees_the_fast_paths(model_and_ids, monkeypatch):
    refuse_ops(monkeypatch)
    with deltatune.use_fast_paths(True), pytest.raises(AssertionError, match="a LoRA fast path ran"):
        everything_a_layer_computes(*model_and_ids)


def test_switched_off_layers_never_enter_the_ops_and_give_the_same_numbers(
    model_and_ids, fast_reference, restored_switch, monkeypatch
):
    deltatune.set_fast_paths(False)
    assert not deltatune.fast_paths_enabled()
    refuse_ops(monkeypatch)
    assert_same_numbers(everything_a_layer_computes(*model_and_ids), fast_reference)


def test_the_block_form_switches_back_on_leaving(restored_switch):
    deltatune.set_fast_paths(False)
    with deltatune.use_fast_paths(True):
        assert deltatune.fast_paths_enabled()
    assert not deltatune.fast_paths_enabled()
    deltatune.set_fast_paths(True)
    with deltatune.use_fast_paths(False):
        assert not deltatune.fast_paths_enabled()
    assert deltatune.fast_paths_enabled()


SUBPROCESS_CHECK = textwrap.dedent(
    """
    import torch
    from helpers.ops import lora_model

    import deltatune
    from deltatune.ops import lora_dispatch

    calls = []
    real = lora_dispatch.lora_linear
    lora_dispatch.lora_linear = lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs)
    model = lora_model().train()
    ids = torch.randint(0, 100, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    off = (deltatune.fast_paths_enabled(), len(calls))
    deltatune.set_fast_paths(True)
    model(input_ids=ids, labels=ids).loss.backward()
    print(off, (deltatune.fast_paths_enabled(), len(calls) > 0))
    """
)


@pytest.mark.parametrize("value", ["0", "off"])
def test_the_environment_variable_turns_the_fast_paths_off_at_import(value):
    env = dict(os.environ, DELTATUNE_FAST_PATHS=value, PYTHONPATH=os.pathsep.join(sys.path))
    tests = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run(
        [sys.executable, "-c", SUBPROCESS_CHECK], env=env, cwd=tests, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    # off from the start: no layer called lora_linear; switched on, they do
    assert done.stdout.strip().splitlines()[-1] == "(False, 0) (True, True)"


# ---- the probe of torch internals ------------------------------------------------------------------------------
def test_the_probe_passes_on_the_installed_torch():
    """A torch release that changes what the fast paths read fails here, by name, before it slows anyone down."""
    assert torch_internals.failed_check() is None, f"torch {torch.__version__}"
    assert torch_internals.check_internals()
    assert torch_internals.internals_usable()


def broken(*args, **kwargs):
    return None


def gone(*args, **kwargs):
    raise AttributeError("'MulBackward0' object has no attribute '_saved_self'")


@pytest.mark.parametrize(
    "function, replacement, check",
    [
        ("saved_operands", broken, "recorded graph"),
        ("saved_operands", gone, "recorded graph (_saved_self, _saved_other, _input_metadata, saved-tensor hooks): "),
        ("cast_output", broken, "recorded graph"),
        ("saved_tensor_hooks_active", broken, "recorded graph"),
        ("has_forward_hooks", broken, "nn.Module state"),
        ("unhooked_parameters", broken, "nn.Module state"),
        ("children", gone, "nn.Module state"),
        ("any_autocast_enabled", broken, "autocast state"),
        ("versioned_note", broken, "tensor notes"),
    ],
)
def test_a_failed_probe_warns_once_and_layers_run_the_reference(
    function, replacement, check, model_and_ids, fast_reference, monkeypatch, caplog
):
    monkeypatch.setattr(torch_internals, function, replacement)  # as if torch had changed what it reads
    try:
        with caplog.at_level(logging.WARNING, logger=torch_internals.__name__):
            assert not torch_internals.check_internals()
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert f"torch {torch.__version__} changed an internal the LoRA fast paths read ({check}" in warnings[0]
        assert not deltatune.fast_paths_enabled()
        refuse_ops(monkeypatch)
        assert_same_numbers(everything_a_layer_computes(*model_and_ids), fast_reference)
    finally:
        monkeypatch.undo()
        assert torch_internals.check_internals()


def test_lora_linear_keeps_its_input_when_the_probe_failed(monkeypatch):
    """Called directly, the fused node does not read the recorded graph on a torch that failed the probe."""
    from deltatune.ops import lora_ops

    monkeypatch.setattr(lora_ops, "REMAKE_MIN_BYTES", 0)  # tiny inputs remade as a model-size one would be
    a, b = leaves((2, 5, 16), (2, 5, 16))
    lora_a, lora_b = leaves((4, 16), (8, 4))

    def input_kept() -> bool:
        out = lora_linear(torch.sigmoid(a) * b, torch.randn(8, 16), None, lora_a, lora_b, 2.0)
        return out.grad_fn.saved_tensors[0] is not None

    assert not input_kept()  # a product whose factors autograd keeps: remade in backward, not kept
    monkeypatch.setattr(torch_internals, "saved_operands", broken)
    try:
        assert not torch_internals.check_internals()
        assert input_kept()
    finally:
        monkeypatch.undo()
        assert torch_internals.check_internals()
