"""QLoRA: LoRA (and AdaLoRA) on 4-bit NF4 and 8-bit bitsandbytes bases, on this CPU, checked against peft."""

import copy
import sys
import warnings

import peft
import pytest
import torch
from helpers.quant import load, save_tiny_llama
from transformers import LlamaForCausalLM, Trainer, TrainingArguments

from deltatune import (
    AdaLoraConfig,
    LoraConfig,
    PeftModel,
    get_peft_model,
    prepare_model_for_int8_training,
    prepare_model_for_kbit_training,
)
from deltatune.quantization import bitsandbytes_config, dequantized_weight

warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
IDS = torch.arange(40).reshape(4, 10) % 100
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    save_tiny_llama(folder)
    return folder


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def train(model, steps: int = 20, lr: float = 1e-2) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def test_4bit_base_is_nf4_and_small(base_dir):
    full, quantized = load(base_dir), load(base_dir, 4)
    layer = quantized.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "Linear4bit" and layer.weight.quant_type == "nf4"
    assert layer.weight.compress_statistics  # double quantisation
    ratio = quantized.get_memory_footprint() / full.get_memory_footprint()
    print(
        f"memory footprint: fp32 {full.get_memory_footprint():,} B, 4-bit {quantized.get_memory_footprint():,} B, "
        f"ratio {ratio:.3f}"
    )
    assert ratio < 1 / 3
    # the 4-bit model still computes nearly the same function
    similarity = torch.cosine_similarity(logits(quantized).flatten(), logits(full).flatten(), dim=0)
    print(f"cosine similarity of 4-bit and fp32 logits: {similarity:.3f}")
    assert similarity > 0.9


def test_counts_and_logits_equal_peft_on_4bit(base_dir):
    kwargs = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM")
    theirs = peft.prepare_model_for_kbit_training(load(base_dir, 4))
    ours = prepare_model_for_kbit_training(load(base_dir, 4))
    torch.manual_seed(3)
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(**kwargs))
    torch.manual_seed(3)
    ours = get_peft_model(ours, LoraConfig(**kwargs))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    # r x (in + out) per module: q, o (64, 64); k, v (64, 32: 2 KV heads); gate, up, down (64, 256)
    assert ours.get_nb_trainable_parameters()[0] == 2 * 4 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 256))
    assert torch.allclose(logits(ours), logits(theirs), atol=1e-5)


def test_adalora_counts_equal_peft_on_4bit(base_dir):
    kwargs = dict(init_r=6, target_r=2, total_step=10, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(load(base_dir, 4), peft.AdaLoraConfig(**kwargs))
    ours = get_peft_model(load(base_dir, 4), AdaLoraConfig(**kwargs))
    assert (
        ours.get_nb_trainable_parameters()[0]
        == theirs.get_nb_trainable_parameters()[0]
        == 2 * 6 * ((64 + 64 + 1) + (64 + 32 + 1))
    )
    ours.train()
    ours(input_ids=IDS, labels=IDS).loss.backward()
    assert ours.update_and_allocate(0) == 4 * 6  # the budget at step 0: init_r x modules


def test_prepare_model_for_kbit_training_equals_peft(base_dir):
    quant = bitsandbytes_config(load_in_4bit=True, compute_dtype=torch.bfloat16)
    theirs, ours = (
        LlamaForCausalLM.from_pretrained(
            base_dir, quantization_config=quant, dtype=torch.bfloat16, device_map={"": "cpu"}
        )
        for _ in range(2)
    )
    assert ours.model.norm.weight.dtype == torch.bfloat16
    peft.prepare_model_for_kbit_training(theirs)
    prepare_model_for_kbit_training(ours)
    assert ours.model.norm.weight.dtype == torch.float32  # norms (and embeddings, head) upcast to fp32
    assert {n: (p.dtype, p.requires_grad) for n, p in ours.named_parameters()} == {
        n: (p.dtype, p.requires_grad) for n, p in theirs.named_parameters()
    }
    assert not any(p.requires_grad for p in ours.parameters())
    assert ours.is_gradient_checkpointing
    embedded = ours.get_input_embeddings()(IDS)
    assert embedded.requires_grad  # input grads on: checkpointed blocks see a graph to recompute


def test_qlora_trainer_run_reloads_on_4bit_and_full_precision(base_dir, tmp_path):
    # transformers.Trainer refuses "purely quantized models"; a deltatune PeftModel over the 4-bit base is accepted.
    model = prepare_model_for_kbit_training(load(base_dir, 4))
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM"))
    rows = [{"input_ids": row.tolist(), "labels": row.tolist()} for row in IDS]
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        max_steps=6,
        learning_rate=3e-2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(f"QLoRA loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5
    model.eval()
    trained = logits(model)
    model.save_pretrained(tmp_path / "adapter")

    on_4bit = PeftModel.from_pretrained(load(base_dir, 4), tmp_path / "adapter")
    assert torch.equal(logits(on_4bit), trained)
    assert torch.allclose(
        logits(peft.PeftModel.from_pretrained(load(base_dir, 4), tmp_path / "adapter")), trained, atol=1e-5
    )

    full = load(base_dir)
    base_gap = (logits(full) - logits(load(base_dir, 4))).abs().max()
    on_full = PeftModel.from_pretrained(full, tmp_path / "adapter")
    assert (logits(on_full) - trained).abs().max() < 2 * base_gap  # only the base's rounding differs
    with on_full.disable_adapter():
        assert (logits(on_full) - trained).abs().max() > 3 * base_gap  # and the adapter is what changed the model


def test_merge_and_unload_dequantises(base_dir):
    model = get_peft_model(load(base_dir, 4), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    # train mode (no dropout here): on CPUs with AVX512-BF16, bitsandbytes' eval-mode kernel rounds the 4-bit
    # scales to bf16; the training path dequantises exactly as `dequantize_model` does.
    model.train()
    adapted = logits(model)
    expected_q = dequantized_weight(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer)
    expected_q = expected_q + model.base_model.model.model.layers[0].self_attn.q_proj.adapters["default"].delta_weight()
    merged = model.merge_and_unload()
    assert not any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in merged.modules())
    assert not merged.is_quantized and merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    assert torch.allclose(merged.model.layers[0].self_attn.q_proj.weight, expected_q, atol=1e-6)
    assert torch.allclose(logits(merged), adapted, atol=1e-4)


def test_merge_adapter_into_4bit_codes(base_dir):
    import bitsandbytes.functional as bnb_functional

    model = get_peft_model(load(base_dir, 4), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    model.train()  # the exact dequantisation path (see test_merge_and_unload_dequantises)
    adapted = logits(model)
    with model.disable_adapter():
        base = logits(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    weight, delta = dequantized_weight(layer.base_layer).clone(), layer.adapters["default"].delta_weight().detach()

    def requantized(w: torch.Tensor) -> torch.Tensor:  # NF4 with double quantisation, as loaded
        codes, state = bnb_functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        return bnb_functional.dequantize_4bit(codes, state)

    model.merge_adapter()  # dequantise, add, quantise again: W + delta rounded to the 4-bit grid
    merged_weight = dequantized_weight(layer.base_layer).clone()
    assert torch.equal(merged_weight, requantized(weight + delta))
    assert (logits(model) - adapted).abs().max() < (adapted - base).abs().max()  # lossy, but the adapter's way
    model.unmerge_adapter()
    assert torch.equal(dequantized_weight(layer.base_layer), requantized(merged_weight - delta))
    assert not layer.merged_adapters


def test_8bit_base(base_dir, tmp_path):
    model = prepare_model_for_kbit_training(load(base_dir, 8))
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear8bitLt"
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    losses = train(model, steps=8, lr=3e-2)
    assert losses[-1] < losses[0] - 0.5
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(load(base_dir, 8), tmp_path)
    assert torch.allclose(logits(reloaded), logits(model), atol=1e-5)
    merged = copy.deepcopy(model).merge_and_unload()
    assert torch.allclose(logits(merged), logits(model), atol=0.05)  # int8 matmul vs float matmul


def test_prepare_model_for_int8_training_is_the_old_name_of_kbit(base_dir):
    # *大模型高效微调*: `from peft import prepare_model_for_int8_training` on an 8-bit model (gone in peft 0.21).
    theirs = peft.prepare_model_for_kbit_training(load(base_dir, 8))
    with pytest.warns(
        FutureWarning, match="prepare_model_for_int8_training is deprecated; use prepare_model_for_kbit_training"
    ):
        ours = prepare_model_for_int8_training(load(base_dir, 8))
    assert {n: (p.dtype, p.requires_grad) for n, p in ours.named_parameters()} == {
        n: (p.dtype, p.requires_grad) for n, p in theirs.named_parameters()
    }
    assert ours.is_gradient_checkpointing and ours.get_input_embeddings()(IDS).requires_grad


def test_missing_bitsandbytes_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now fails as if not installed
    with pytest.raises(
        ImportError,
        match=r"load_in_4bit=True needs the bitsandbytes package, which is not installed; pip install bitsandbytes",
    ):
        bitsandbytes_config(load_in_4bit=True)
    with pytest.raises(ImportError, match=r"load_in_8bit=True needs the bitsandbytes package"):
        bitsandbytes_config(load_in_8bit=True)
    from deltatune.cli.models import quantization_config

    with pytest.raises(ImportError, match=r"--load-in-4bit/--load-in-8bit need bitsandbytes: pip install"):
        quantization_config(load_in_4bit=True, load_in_8bit=False)


def test_bad_quantization_request():
    with pytest.raises(ValueError, match="pass exactly one of load_in_4bit=True or load_in_8bit=True"):
        bitsandbytes_config(load_in_4bit=True, load_in_8bit=True)


def test_prepare_model_for_kbit_training_takes_peft_arguments():
    import inspect

    ours = inspect.signature(prepare_model_for_kbit_training).parameters
    theirs = inspect.signature(peft.prepare_model_for_kbit_training).parameters
    assert [(n, p.default) for n, p in ours.items()] == [(n, p.default) for n, p in theirs.items()]
