"""Bottleneck adapters (Houlsby / Pfeiffer): parameter counts by formula, zero init, training, switching, files."""

import json
import os

import pytest
import torch
from helpers.models import full_size_on_meta, tiny_model
from safetensors.torch import load_file

from deltatune import AdapterConfig, PeftModel, get_peft_model
from deltatune.methods.bottleneck import BottleneckLayer

D = 32  # hidden size of the tiny models
ARCHS = ["llama", "bloom", "gpt2", "opt", "bert", "roberta", "t5"]
N_LAYERS = {"t5": 4}  # T5: 2 encoder + 2 decoder blocks, each with self-attention and a feed-forward block
SITES = {"houlsby": 2, "pfeiffer": 1}


def build(kind: str, seed: int = 0):
    """The tiny `kind` model; bert and roberta without a head (their hidden states are compared)."""
    return tiny_model(kind, "FEATURE_EXTRACTION" if kind in ("bert", "roberta") else None, seed)


def inputs(kind: str) -> dict:
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "decoder_input_ids": ids[:, :4]} if kind == "t5" else {"input_ids": ids}


def output(model, kind: str) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs(kind))
    return out.last_hidden_state if kind in ("bert", "roberta") else out.logits


def per_site(d: int, m: int) -> int:
    """Down (d*m + m) plus up (m*d + d)."""
    return 2 * d * m + m + d


@pytest.mark.parametrize("kind", ARCHS)
@pytest.mark.parametrize("preset", ["houlsby", "pfeiffer"])
def test_counts_follow_formula_and_start_equal_to_base(kind, preset):
    model = build(kind)
    base = output(model, kind)
    total_before = sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, AdapterConfig(preset=preset, reduction_factor=4))
    trainable, total = peft_model.get_nb_trainable_parameters()
    expected = N_LAYERS.get(kind, 2) * SITES[preset] * per_site(D, D // 4)
    assert trainable == expected
    assert total == total_before + expected
    assert sum(isinstance(m, BottleneckLayer) for m in model.modules()) == N_LAYERS.get(kind, 2) * SITES[preset]
    assert torch.equal(output(peft_model, kind), base)  # zero up-projection: exactly the base


@pytest.mark.parametrize(
    "preset, bottleneck_size, expected",
    [("houlsby", None, 25_270_272), ("pfeiffer", None, 12_635_136), ("houlsby", 64, 12_684_288)],
)
def test_paper_size_bloom_on_meta(preset, bottleneck_size, expected):
    # bloom-1b4-zh, the tutorials' model: d = 2048, 24 layers; reduction 16 -> m = 128.
    model = full_size_on_meta("bloom-1b4-zh")
    base_total = sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, AdapterConfig(preset=preset, bottleneck_size=bottleneck_size))
    trainable, total = peft_model.get_nb_trainable_parameters()
    m = bottleneck_size or 2048 // 16
    assert trainable == 24 * SITES[preset] * (2 * 2048 * m + m + 2048)
    assert trainable == expected  # the formula worked out by hand, so a wrong formula above cannot pass
    assert total == base_total + trainable


def test_paper_size_llama_7b_on_meta():
    model = full_size_on_meta("llama-7b")
    trainable, _ = get_peft_model(model, AdapterConfig(preset="pfeiffer")).get_nb_trainable_parameters()
    assert trainable == 32 * (2 * 4096 * 256 + 256 + 4096) == 67_248_128


@pytest.mark.parametrize("preset", ["houlsby", "pfeiffer"])
def test_short_run_lowers_loss(preset):
    # initializer_range 0.1: activations of a realistic size (at 0.02 a tiny random model barely reacts to adapters)
    base = tiny_model("llama", initializer_range=0.1, pad_token_id=None)  # no pad row: loss ratio 0.74, not 0.81
    peft_model = get_peft_model(base, AdapterConfig(preset=preset, reduction_factor=2))
    peft_model.train()
    ids = torch.arange(40).reshape(4, 10) % 100  # counting sequences
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(25):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    print(f"{preset}: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.85 * losses[0]
    assert all(p.grad is None for n, p in peft_model.named_parameters() if ".adapters." not in n)


def test_switching_adapters_and_files(tmp_path):
    model = build("gpt2")
    base = output(model, "gpt2")
    peft_model = get_peft_model(model, AdapterConfig(preset="houlsby", reduction_factor=4, init_weights=False))
    peft_model.add_adapter(
        "other", AdapterConfig(preset="houlsby", bottleneck_size=3, init_weights=False, non_linearity="tanh")
    )
    first = output(peft_model, "gpt2")
    peft_model.set_adapter("other")
    second = output(peft_model, "gpt2")
    assert not torch.allclose(first, second) and not torch.allclose(second, base)
    peft_model.set_adapter("default")
    assert torch.equal(output(peft_model, "gpt2"), first)  # back to the first adapter exactly
    with peft_model.disable_adapter():
        assert torch.equal(output(peft_model, "gpt2"), base)
    with torch.no_grad():
        mixed = peft_model(**inputs("gpt2"), adapter_names=["other", "__base__"]).logits
    assert torch.allclose(mixed[0], second[0], atol=1e-6) and torch.allclose(mixed[1], base[1], atol=1e-6)

    peft_model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "other" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "BOTTLENECK" and saved["bottleneck_size"] == 3 and saved["preset"] == "houlsby"
    tensors = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert "base_model.model.transformer.h.0.attn.c_proj.adapter_down.weight" in tensors
    assert len(tensors) == 2 * 2 * 4  # 2 layers x 2 places x (down, up) x (weight, bias)

    reloaded = PeftModel.from_pretrained(build("gpt2"), tmp_path)
    reloaded.load_adapter(tmp_path / "other", "other")
    assert torch.equal(output(reloaded, "gpt2"), first)
    reloaded.set_adapter("other")
    assert torch.equal(output(reloaded, "gpt2"), second)
    assert reloaded.get_nb_trainable_parameters()[0] == 0  # loaded for inference


def test_adapters_cannot_be_merged():
    peft_model = get_peft_model(build("llama"), AdapterConfig())
    with pytest.raises(TypeError, match="BOTTLENECK adds no weight that can be folded"):
        peft_model.merge_and_unload()


@pytest.mark.parametrize("layers", [[1], 1])  # one int is one layer, as in peft
def test_layers_to_transform_and_target_modules(layers):
    peft_model = get_peft_model(
        build("llama"), AdapterConfig(preset="houlsby", reduction_factor=4, layers_to_transform=layers)
    )
    names = [n for n, m in peft_model.named_modules() if isinstance(m, BottleneckLayer)]
    assert names == [
        "base_model.model.model.layers.1.self_attn.o_proj",
        "base_model.model.model.layers.1.mlp.down_proj",
    ]
    peft_model = get_peft_model(build("llama"), AdapterConfig(target_modules=["up_proj"], bottleneck_size=4))
    assert peft_model.get_nb_trainable_parameters()[0] == 2 * (2 * 64 * 4 + 4 + 64)  # after up_proj: width 64
    peft_model = get_peft_model(
        build("llama"), AdapterConfig(preset="houlsby", reduction_factor=4, exclude_modules=["o_proj"])
    )
    names = [n for n, m in peft_model.named_modules() if isinstance(m, BottleneckLayer)]
    assert names == [f"base_model.model.model.layers.{i}.mlp.down_proj" for i in (0, 1)]


def test_bad_input():
    with pytest.raises(
        ValueError, match=r"preset='adapterhub' is not a known adapter preset; use one of: houlsby, pfeiffer"
    ):
        AdapterConfig(preset="adapterhub")
    with pytest.raises(
        ValueError,
        match=r"reduction_factor=64 leaves no hidden unit .* model\.layers\.0\.self_attn\.o_proj "
        r"\(hidden size 32 // 64 = 0\); use reduction_factor <= 32 or set bottleneck_size",
    ):
        get_peft_model(build("llama"), AdapterConfig(reduction_factor=64))
    with pytest.raises(ValueError, match="non_linearity='gleu' is not known"):
        AdapterConfig(non_linearity="gleu")
    with pytest.raises(ValueError, match="reduction_factor=0 must be > 0"):
        AdapterConfig(reduction_factor=0)
    with pytest.raises(ValueError, match="not model_type='gpt_neox'; pass target_modules"):
        get_peft_model(tiny_model("gpt_neox", num_hidden_layers=1), AdapterConfig())
