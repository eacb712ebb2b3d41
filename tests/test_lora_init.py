"""PiSSA, OLoRA and LoftQ initialisations (`init_lora_weights`) against HF peft on tiny random models.

peft 0.21's LoftQ quantises with bitsandbytes on a hard-coded CUDA device; this machine has none, so the oracle
below is peft's own `loftq_init` source with only that device line changed to "cpu" (bitsandbytes quantises on
the CPU here, which is what deltatune does without CUDA).
"""

import copy
import json
import logging

import peft
import peft.tuners.lora.layer as peft_lora_layer
import pytest
import torch
from helpers.models import tiny_inputs, tiny_model
from helpers.peft_on_cpu import loftq_function_on_cpu
from helpers.peft_pairs import copy_to_peft, logits, lora_pair, randomize_adapter, twins
from helpers.quant import load
from safetensors.torch import load_file

import deltatune
from deltatune import LoftQConfig, LoraConfig, PeftModel, get_peft_model
from deltatune.methods.lora.initialization import quantize_roundtrip
from deltatune.methods.lora.lora import LoraLayer
from deltatune.quantization import bitsandbytes_config, dequantized_weight

ATOL = 1e-5
ALL = "all-linear"


def ours_key(peft_name: str) -> str:
    """peft's parameter name -> deltatune's (the adapters live in a per-layer container)."""
    for part in ("lora_A", "lora_B"):
        peft_name = peft_name.replace(f".{part}.default.", f".adapters.default.{part}.")
    return peft_name


def assert_same_parameters(ours, theirs, atol: float = 0.0) -> None:
    """Every parameter, adapter factors and (residual) base weights alike, equal between the two libraries."""
    mine = dict(ours.named_parameters())
    theirs = dict(theirs.named_parameters())
    assert len(mine) == len(theirs)
    for name, value in theirs.items():
        torch.testing.assert_close(mine[ours_key(name)], value, rtol=0, atol=atol, msg=name)


def assert_same_logits(a, b, inputs, atol: float = ATOL) -> None:
    torch.testing.assert_close(logits(a, inputs), logits(b, inputs), rtol=0, atol=atol)


def changed_base_weights(model, original) -> list[str]:
    """Names of base weights (inside LoRA layers) that differ from `original`'s."""
    reference = dict(original.named_parameters())
    return [
        name
        for name, module in model.get_base_model().named_modules()
        if isinstance(module, LoraLayer) and not torch.equal(module.base_layer.weight, reference[f"{name}.weight"])
    ]


# ---- PiSSA and OLoRA ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_starts_equal_to_the_base_and_equals_peft(init):
    """A, B and the residual W equal peft's bit for bit (the randomized SVD draws the same numbers from the seed)."""
    ours, theirs = lora_pair("llama", r=4, lora_alpha=8, init_lora_weights=init, target_modules=ALL)
    inputs, base = tiny_inputs("llama"), tiny_model("llama")
    assert_same_logits(ours, base, inputs)
    assert len(changed_base_weights(ours, base)) == 14  # every adapted weight now holds the residual
    assert_same_parameters(ours, theirs)


def test_pissa_factors_are_the_top_singular_triplets():
    model = get_peft_model(
        tiny_model("llama"), LoraConfig(r=3, lora_alpha=6, init_lora_weights="pissa", target_modules=["q_proj"])
    )
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    original = tiny_model("llama").model.layers[0].self_attn.q_proj.weight
    adapter = layer.adapters["default"]
    top = torch.linalg.svdvals(original)[:3]
    product = adapter.delta_weight()  # s B A: the principal part of W
    torch.testing.assert_close(torch.linalg.svdvals(product)[:3], top, rtol=1e-5, atol=0)
    torch.testing.assert_close(layer.base_layer.weight + product, original, rtol=0, atol=ATOL)


def test_olora_b_is_orthonormal_and_a_is_upper_triangular():
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, init_lora_weights="olora", target_modules=["o_proj"]))
    adapter = model.base_model.model.model.layers[1].self_attn.o_proj.adapters["default"]
    b, a = adapter.lora_B.weight, adapter.lora_A.weight  # (out, r), (r, in)
    torch.testing.assert_close(b.T @ b, torch.eye(4), rtol=0, atol=1e-5)
    assert torch.equal(a[:, :4], torch.triu(a[:, :4]))


def test_pissa_on_conv1d_equals_peft_and_olora_keeps_the_output():
    """GPT-2's Conv1D stores W as (in, out). peft's OLoRA does not transpose it (its A gets the wrong shape), so
    there only our output is checked: it starts equal to the base."""
    ours, theirs = lora_pair("gpt2", r=4, lora_alpha=8, init_lora_weights="pissa")
    inputs, base = tiny_inputs("gpt2"), tiny_model("gpt2")
    assert_same_logits(ours, base, inputs)
    assert_same_parameters(ours, theirs)
    olora = get_peft_model(tiny_model("gpt2"), LoraConfig(r=4, init_lora_weights="olora"))
    assert_same_logits(olora, base, inputs)
    assert len(changed_base_weights(olora, base)) == 2


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_bf16_base_residual_equals_peft_and_factors_stay_fp32(init):
    """The residual is computed in fp32 and rounded to bf16 once, as in peft. peft then rounds A and B through
    the base's bf16 (moving them to the base's dtype before its fp32 autocast); deltatune keeps the fp32 factors
    the residual was computed with (as it keeps fp32 Kaiming draws for init=True). Otherwise the values are peft's."""
    base = tiny_model("llama").to(torch.bfloat16)
    kwargs = dict(r=4, lora_alpha=8, init_lora_weights=init, target_modules=ALL)
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(**kwargs))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    mine = dict(ours.named_parameters())
    for name, value in theirs.named_parameters():
        own = mine[ours_key(name)]
        assert own.dtype == value.dtype, name  # bf16 base weights, fp32 factors in both
        assert torch.equal(own.to(torch.bfloat16).to(value.dtype), value), name


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_converted_adapter_is_plain_lora_for_the_original_base(init, tmp_path):
    """save_pretrained(path_initial_model_for_weight_conversion=...) writes what peft writes (rank 2r), and both
    libraries load it onto the ORIGINAL base with the trained model's outputs."""
    ours, theirs = lora_pair("llama", r=4, lora_alpha=8, init_lora_weights=init, target_modules=ALL)
    ours.save_pretrained(tmp_path / "ours_init")
    theirs.save_pretrained(tmp_path / "peft_init")
    randomize_adapter(ours)  # stands in for training
    copy_to_peft(ours, theirs)
    ours.save_pretrained(tmp_path / "ours", path_initial_model_for_weight_conversion=str(tmp_path / "ours_init"))
    theirs.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "peft_init"))

    mine = load_file(tmp_path / "ours/adapter_model.safetensors")
    reference = load_file(tmp_path / "peft/adapter_model.safetensors")
    assert mine.keys() == reference.keys()
    for key in reference:
        assert torch.equal(mine[key], reference[key]), key
    config = json.loads((tmp_path / "ours/adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)
    assert json.loads((tmp_path / "ours_init/adapter_config.json").read_text())["init_lora_weights"] is True  # as peft

    inputs = tiny_inputs("llama")
    trained = logits(ours, inputs)
    for loaded in (
        peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "ours"),
        PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "ours"),
    ):
        torch.testing.assert_close(logits(loaded, inputs), trained, rtol=0, atol=ATOL)


def test_conversion_with_rslora_and_patterns_is_refused(tmp_path):
    model = get_peft_model(
        tiny_model("llama"), LoraConfig(r=4, init_lora_weights="pissa", use_rslora=True, rank_pattern={"v_proj": 2})
    )
    model.save_pretrained(tmp_path / "init")
    with pytest.raises(ValueError, match="cannot keep the scale with use_rslora=True and rank_pattern / alpha_pattern"):
        model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_adapter_files_load_across_libraries(init, tmp_path):
    """A PiSSA/OLoRA file (config init "pissa"/"olora") re-decomposes the original base when loaded, in both
    libraries, so each loads the other's file onto the original base with the trained model's outputs."""
    ours, theirs = lora_pair("llama", r=4, lora_alpha=8, init_lora_weights=init)
    randomize_adapter(ours)
    copy_to_peft(ours, theirs)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    inputs = tiny_inputs("llama")
    assert_same_logits(peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "ours"), ours, inputs)
    assert_same_logits(PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "peft"), theirs, inputs)


# ---- validation --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["pissa_niter_x", "pissa_niter_", "PiSSA", "svd", "olora_niter_2"])
def test_unknown_init_strings_name_the_field_and_the_forms(init):
    with pytest.raises(
        ValueError,
        match=rf"init_lora_weights='{init}' is not known; use True, False, 'gaussian', "
        r"'pissa', 'pissa_niter_\[N\]' \(N an integer >= 0\), 'olora' or 'loftq'",
    ):
        LoraConfig(init_lora_weights=init)


def test_embedding_is_refused_by_name_before_any_weight_changes():
    """peft silently gives an embedding its default init here; deltatune says that PiSSA cannot apply."""
    model, original = twins("llama")
    with pytest.raises(
        ValueError,
        match="init_lora_weights='pissa' does not apply to the embedding "
        "model.embed_tokens; leave this module out of target_modules",
    ):
        get_peft_model(model, LoraConfig(init_lora_weights="pissa", target_modules=["q_proj", "embed_tokens"]))
    for (name, value), (_, before) in zip(model.named_parameters(), original.named_parameters(), strict=True):
        assert torch.equal(value, before), name  # the q_proj weights were not turned into residuals


def test_rank_above_the_weight_side_is_refused():
    with pytest.raises(
        ValueError,
        match=r"r=40 is larger than the smaller side of model.layers.0.self_attn.q_proj's "
        r"weight \(32 x 32\), so 'olora' has too few singular vectors",
    ):
        get_peft_model(tiny_model("llama"), LoraConfig(r=40, init_lora_weights="olora"))


def test_float64_base_is_refused_like_peft():
    with pytest.raises(
        TypeError,
        match="init_lora_weights='pissa' needs a float32, float16 or bfloat16 weight, "
        "but model.layers.0.self_attn.q_proj is a Linear with dtype torch.float64",
    ):
        get_peft_model(tiny_model("llama").double(), LoraConfig(init_lora_weights="pissa"))


# ---- LoftQ -------------------------------------------------------------------------------------------------------
@pytest.fixture
def peft_loftq_on_cpu(monkeypatch):
    """peft's `loftq_init`, verbatim except its hard-coded CUDA compute device (see the module docstring)."""
    monkeypatch.setattr(peft_lora_layer, "loftq_init", loftq_function_on_cpu("loftq_init"))


def peft_loftq_config(bits: int, iters: int, **kwargs):
    # peft's __post_init__ asks for scipy (unused by its LoftQ since 0.20, and not installed): set the fields after
    config = peft.LoraConfig(**kwargs)
    config.init_lora_weights, config.loftq_config = "loftq", {"loftq_bits": bits, "loftq_iter": iters}
    return config


@pytest.mark.parametrize(("bits", "iters"), [(4, 1), (4, 2), (8, 1)])
def test_loftq_equals_peft(bits, iters, peft_loftq_on_cpu):
    ours_base, peft_base = twins("llama")
    kwargs = dict(r=4, lora_alpha=4, target_modules=ALL)
    ours = get_peft_model(
        ours_base, LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(bits, iters), **kwargs)
    )
    theirs = peft.get_peft_model(peft_base, peft_loftq_config(bits, iters, **kwargs))
    assert ours.peft_config["default"].loftq_config == {"loftq_bits": bits, "loftq_iter": iters}  # a dict, as peft
    assert len(changed_base_weights(ours, tiny_model("llama"))) == 14
    assert_same_parameters(ours, theirs)


@pytest.mark.parametrize("iters", [1, 3])
def test_loftq_adapter_brings_the_quantised_weight_closer_to_w(iters):
    original = tiny_model("llama")
    model = get_peft_model(
        tiny_model("llama"),
        LoraConfig(
            r=8, lora_alpha=8, init_lora_weights="loftq", loftq_config={"loftq_iter": iters}, target_modules=ALL
        ),
    )
    for name, module in model.get_base_model().named_modules():
        if isinstance(module, LoraLayer):
            w, q = original.get_submodule(name).weight, module.base_layer.weight
            assert torch.equal(quantize_roundtrip(q, 4, q.device), q)  # Q is exactly what a 4-bit load will hold
            with_adapter = (w - q - module.adapters["default"].delta_weight()).norm()
            assert with_adapter < 0.9 * (w - q).norm(), name


def test_loftq_base_saved_and_loaded_in_4bit_keeps_q(tmp_path):
    """The LoftQ workflow: save the changed base, load it in NF4 (no double quantisation): the 4-bit weights
    dequantise to Q exactly, so Q + s B A is what training starts from."""
    model = get_peft_model(
        tiny_model("llama"),
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="loftq", loftq_config=LoftQConfig(), target_modules=["q_proj"]),
    )
    q = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    model.unload().save_pretrained(tmp_path)
    quant = bitsandbytes_config(load_in_4bit=True, compute_dtype=torch.float32, double_quant=False)
    reloaded = type(model.get_base_model()).from_pretrained(tmp_path, quantization_config=quant, device_map={"": "cpu"})
    assert torch.equal(dequantized_weight(reloaded.model.layers[0].self_attn.q_proj), q)


def test_loftq_config_checks():
    with pytest.raises(
        ValueError, match=r"init_lora_weights='loftq' needs loftq_config, e.g. loftq_config=LoftQConfig"
    ):
        LoraConfig(init_lora_weights="loftq")
    with pytest.raises(ValueError, match=r"loftq_config\['loftq_bits'\]=3; use 4 \(NF4\) or 8 \(LLM.int8\(\)\)"):
        LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=3))
    with pytest.raises(ValueError, match=r"loftq_config\['loftq_iter'\]=0; use an integer >= 1"):
        LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_iter": 0})
    with pytest.raises(ValueError, match=r"loftq_config has unknown fields \['bits'\]"):
        LoraConfig(init_lora_weights="loftq", loftq_config={"bits": 4})
    assert vars(LoftQConfig()) == vars(peft.LoftQConfig())  # peft's field names and defaults


def test_loftq_config_without_loftq_is_dropped_as_peft_does(caplog):
    with caplog.at_level(logging.WARNING, logger="deltatune.methods.lora.initialization"):
        config = LoraConfig(loftq_config=LoftQConfig())
    assert config.loftq_config == {}
    assert "loftq_config is ignored because init_lora_weights=True is not 'loftq'" in caplog.text


def test_loftq_with_a_scale_other_than_one_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="deltatune.methods.lora.initialization"):
        get_peft_model(
            tiny_model("llama"),
            LoraConfig(
                r=4, lora_alpha=8, init_lora_weights="loftq", loftq_config=LoftQConfig(), target_modules=["q_proj"]
            ),
        )
    assert "LoftQ with lora_alpha / r = 2.0" in caplog.text


def test_loftq_config_round_trips_through_the_adapter_file(tmp_path):
    model = get_peft_model(
        tiny_model("llama"),
        LoraConfig(
            r=4, lora_alpha=4, init_lora_weights="loftq", loftq_config=LoftQConfig(8, 2), target_modules=["q_proj"]
        ),
    )
    model.save_pretrained(tmp_path)
    config = deltatune.PeftConfig.from_pretrained(tmp_path)
    assert (config.init_lora_weights, config.loftq_config) == ("loftq", {"loftq_bits": 8, "loftq_iter": 2})


def test_loftq_on_an_embedding_is_refused():
    with pytest.raises(
        ValueError, match="init_lora_weights='loftq' does not apply to the embedding model.embed_tokens"
    ):
        get_peft_model(
            tiny_model("llama"),
            LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(), target_modules=["embed_tokens"]),
        )


def test_pissa_on_a_4bit_base_is_refused(tmp_path):
    """As peft refuses PiSSA under a quantised weight: decompose the full-precision base, then quantise it."""
    tiny_model("llama").save_pretrained(tmp_path)
    model = load(tmp_path, 4)
    with pytest.raises(
        TypeError,
        match="init_lora_weights='pissa' needs a float32, float16 or bfloat16 weight, "
        "but model.layers.0.self_attn.q_proj is a Linear4bit",
    ):
        get_peft_model(model, LoraConfig(init_lora_weights="pissa"))
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


@pytest.mark.parametrize("bits", [4, 8])
def test_olora_on_a_quantised_base_equals_peft(bits, tmp_path):
    """peft's OLoRA dequantises W, takes its QR, and quantises the residual W - s B A again: the same factors and
    the same codes here, bit for bit."""
    tiny_model("llama").save_pretrained(tmp_path)
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights="olora")
    ours = get_peft_model(load(tmp_path, bits, train=True), LoraConfig(**kwargs))  # train mode: see helpers.quant.load
    theirs = peft.get_peft_model(load(tmp_path, bits, train=True), peft.LoraConfig(**kwargs))
    untouched = load(tmp_path, bits, train=True)
    assert_same_parameters(ours, theirs)
    changed = 0
    for name, module in ours.get_base_model().named_modules():
        if isinstance(module, LoraLayer):
            residual = dequantized_weight(module.base_layer)
            assert torch.equal(residual, dequantized_weight(theirs.get_base_model().get_submodule(name).base_layer))
            changed += not torch.equal(residual, dequantized_weight(untouched.get_submodule(name)))
    assert changed == 4
    assert_same_logits(ours, theirs, tiny_inputs("llama"), atol=0)


def test_adalora_refuses_the_base_weight_inits():
    with pytest.raises(ValueError, match="AdaLoRA does not support init_lora_weights='pissa'; use True"):
        deltatune.AdaLoraConfig(total_step=10, init_lora_weights="pissa")
