"""LoRA on a tiny random Llama with transformers.Trainer: the tutorials' steps 1-7 in one script.

Run: .venv/bin/python examples/05_lora.py
"""

import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from deltatune import LoraConfig, PeftModel, TaskType, get_peft_model


def tiny_dataset(n: int = 64, length: int = 16):
    torch.manual_seed(0)
    rows = []
    for _ in range(n):
        start = int(torch.randint(0, 50, ()))
        ids = [(start + i) % 100 for i in range(length)]  # counting sequences: easy to learn
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": ids})
    return rows


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    model = LlamaForCausalLM(config)  # 1. model
    peft_config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16)  # 2. config
    model = get_peft_model(model, peft_config)  # 3. PeftModel
    model.print_trainable_parameters()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=8,
            max_steps=30,
            learning_rate=5e-3,
            logging_steps=10,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
        )  # 4. args
        trainer = Trainer(model=model, args=args, train_dataset=tiny_dataset())  # 5. trainer
        trainer.train()  # 6. train
        model.save_pretrained(out + "/adapter")
        reloaded = PeftModel.from_pretrained(LlamaForCausalLM(config), out + "/adapter")  # 7. load
        print("reloaded adapter:", type(reloaded).__name__)


if __name__ == "__main__":
    main()
