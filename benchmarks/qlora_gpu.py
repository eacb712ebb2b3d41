"""QLoRA, AdaLoRA and bottleneck adapters on a CUDA GPU (run by hand; CI has no GPU).

4-bit NF4 (double quantisation, bf16 compute) and 8-bit bases through bitsandbytes: trainable counts beside
peft's, a short LoRA run, reload on a 4-bit and on a bf16 base (and in peft), `merge_and_unload` onto dequantised
bf16 weights, 8-bit `merge_adapter`, AdaLoRA reaching its rank budget on a 4-bit base, adapters in a bf16 model.

Run from the repository root: python benchmarks/qlora_gpu.py   (needs bitsandbytes; peft optional)

Seen on one H100 (torch 2.11.0+cu130, transformers 5.17.0, bitsandbytes 0.50.2, peft 0.21.0), 2026-11-23:
counts equal peft's (65,536 trainable of 1,758,464); QLoRA loss 7.18 -> 0.08 in 20 steps at 0.06 s/step;
reload on 4-bit within 0.074 of the trained logits, the same as peft's reload (the trained model's norms were
upcast to fp32 by prepare_model_for_kbit_training, the reloaded one's are bf16); merged model bf16 nn.Linear on
cuda within 0.059; AdaLoRA total rank 8 = budget 8; adapter in a bf16 model starts equal to the base.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))  # run from a checkout, installed or not
import deltatune as dt  # noqa: E402
from deltatune.quantization import bitsandbytes_config  # noqa: E402

warnings.filterwarnings("ignore")
DEVICE = "cuda"
IDS = (torch.arange(64).reshape(4, 16) % 1000).to(DEVICE)
FOLDER = tempfile.mkdtemp()


def load(bits: int | None = None) -> LlamaForCausalLM:
    """The saved base in bf16, or loaded 4-bit / 8-bit with bf16 compute."""
    if bits is None:
        return LlamaForCausalLM.from_pretrained(FOLDER + "/base", dtype=torch.bfloat16).to(DEVICE).eval()
    quant = bitsandbytes_config(load_in_4bit=bits == 4, load_in_8bit=bits == 8, compute_dtype=torch.bfloat16)
    return LlamaForCausalLM.from_pretrained(
        FOLDER + "/base", quantization_config=quant, dtype=torch.bfloat16, device_map={"": DEVICE}
    ).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def train(model, steps: int = 20, lr: float = 1e-2, allocate: bool = False) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        if allocate:
            model.base_model.update_and_allocate(step + 1)
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def qlora(peft) -> None:
    full, quantized = load(), load(4)
    print(f"footprint: bf16 {full.get_memory_footprint():,} B, 4-bit {quantized.get_memory_footprint():,} B")
    kwargs = dict(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    ours = dt.get_peft_model(dt.prepare_model_for_kbit_training(quantized), dt.LoraConfig(**kwargs))
    print("counts: deltatune", ours.get_nb_trainable_parameters())
    if peft is not None:
        theirs = peft.get_peft_model(peft.prepare_model_for_kbit_training(load(4)), peft.LoraConfig(**kwargs))
        print("counts: peft     ", theirs.get_nb_trainable_parameters())
    start = time.perf_counter()
    losses = train(ours)
    torch.cuda.synchronize()
    print(f"QLoRA loss {losses[0]:.3f} -> {losses[-1]:.3f}, {(time.perf_counter() - start) / 20:.3f} s/step")
    trained = logits(ours)
    ours.save_pretrained(FOLDER + "/adapter")
    on_4bit = dt.PeftModel.from_pretrained(load(4), FOLDER + "/adapter")
    print("reload on 4-bit: max diff", gap(logits(on_4bit), trained))
    on_bf16 = dt.PeftModel.from_pretrained(load(), FOLDER + "/adapter")
    base_gap = gap(logits(full), logits(load(4)))
    print("reload on bf16: max diff", gap(logits(on_bf16), trained), "| the bases differ by", base_gap)
    if peft is not None:
        theirs = peft.PeftModel.from_pretrained(load(4), FOLDER + "/adapter")
        print("peft reload on 4-bit: max diff", gap(logits(theirs), trained))
    merged = on_4bit.merge_and_unload()
    q_proj = merged.model.layers[0].self_attn.q_proj
    print(
        "merged:",
        type(q_proj).__name__,
        q_proj.weight.dtype,
        q_proj.weight.device,
        "max diff",
        gap(logits(merged), trained),
    )


def eight_bit() -> None:
    config = dt.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    model = dt.get_peft_model(dt.prepare_model_for_kbit_training(load(8)), config)
    losses = train(model, 10)
    print(f"8-bit loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    adapted = logits(model)
    model.merge_adapter()
    print("8-bit merge_adapter (re-quantised): max diff", gap(logits(model), adapted))


def adalora() -> None:
    config = dt.AdaLoraConfig(
        init_r=8, target_r=2, total_step=12, tinit=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )
    model = dt.get_peft_model(dt.prepare_model_for_kbit_training(load(4)), config)
    losses = train(model, 12, allocate=True)
    pattern = model.peft_config["default"].rank_pattern
    total = sum(sum(keep) for keep in pattern.values())
    print(f"AdaLoRA 4-bit loss {losses[0]:.3f} -> {losses[-1]:.3f}, total rank {total} (budget {2 * len(pattern)})")
    model.save_pretrained(FOLDER + "/adalora")
    reloaded = dt.PeftModel.from_pretrained(load(4), FOLDER + "/adalora")
    print("AdaLoRA reload: max diff", gap(logits(reloaded), logits(model)))


def adapters() -> None:
    model = load()
    base = logits(model)
    model = dt.get_peft_model(model, dt.AdapterConfig(preset="houlsby"))
    print("adapter in bf16 model starts equal to the base:", torch.equal(logits(model), base))
    losses = train(model, 10)
    print(f"adapter bf16 loss {losses[0]:.3f} -> {losses[-1]:.3f}")


def main() -> None:
    import bitsandbytes
    import transformers

    try:
        import peft
    except ImportError:
        peft = None
    print(
        "torch",
        torch.__version__,
        torch.cuda.get_device_name(0),
        "| transformers",
        transformers.__version__,
        "| bitsandbytes",
        bitsandbytes.__version__,
        "| peft",
        getattr(peft, "__version__", None),
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        initializer_range=0.05,
    )
    LlamaForCausalLM(config).save_pretrained(FOLDER + "/base")
    qlora(peft)
    eight_bit()
    adalora()
    adapters()
    print(f"max GPU memory {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
