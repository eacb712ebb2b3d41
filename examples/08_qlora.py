"""QLoRA (Dettmers et al., 2023): LoRA on a 4-bit NF4 base, on this CPU or a GPU, with transformers.Trainer.

The base is loaded through bitsandbytes (NF4 codes, double-quantised scales, fp32 compute on a CPU), prepared
with `prepare_model_for_kbit_training` (frozen, norms in fp32, input grads, gradient checkpointing), and gets
full-precision LoRA factors beside its 4-bit layers. `merge_and_unload` dequantises the base first and returns a
plain fp32 model with the update folded in. Needs `pip install bitsandbytes` (or `deltatune[quant]`).

Run: .venv/bin/python examples/08_qlora.py
"""

import tempfile

import torch
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from deltatune import LoraConfig, PeftModel, TaskType, get_peft_model, prepare_model_for_kbit_training


def tiny_dataset(n: int = 32, length: int = 16):
    torch.manual_seed(0)
    rows = []
    for _ in range(n):
        start = int(torch.randint(0, 50, ()))
        ids = [(start + i) % 100 for i in range(length)]  # counting sequences: easy to learn
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": ids})
    return rows


def load_4bit(folder: str) -> LlamaForCausalLM:
    compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32  # CPUs lack fast bf16 matmuls
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return LlamaForCausalLM.from_pretrained(folder, quantization_config=quant, device_map={"": device})


def main() -> None:
    torch.manual_seed(0)
    # bitsandbytes quantises in blocks of 64 values: keep layers at least 64 wide.
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        initializer_range=0.05,
    )
    with tempfile.TemporaryDirectory() as out:
        full = LlamaForCausalLM(config)
        full.save_pretrained(out + "/base")  # stands in for a hub model
        model = load_4bit(out + "/base")
        print(
            f"memory footprint: fp32 {full.get_memory_footprint() / 1024:.0f} KiB, "
            f"4-bit {model.get_memory_footprint() / 1024:.0f} KiB"
        )
        model = prepare_model_for_kbit_training(model)
        peft_config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16, target_modules="all-linear")
        model = get_peft_model(model, peft_config)
        model.print_trainable_parameters()
        args = TrainingArguments(
            output_dir=out + "/run",
            per_device_train_batch_size=8,
            max_steps=8,
            learning_rate=2e-2,
            logging_steps=4,
            save_strategy="no",
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
        )
        Trainer(model=model, args=args, train_dataset=tiny_dataset()).train()
        model.save_pretrained(out + "/adapter")  # the LoRA factors only (fp32), as for any LoRA adapter
        reloaded = PeftModel.from_pretrained(load_4bit(out + "/base"), out + "/adapter")  # on a fresh 4-bit base
        merged = reloaded.merge_and_unload()  # dequantised fp32 weights + the update: a plain transformers model
        print(
            "merged q_proj:",
            type(merged.model.layers[0].self_attn.q_proj).__name__,
            merged.model.layers[0].self_attn.q_proj.weight.dtype,
        )


if __name__ == "__main__":
    main()
