"""AdaLoRA (Zhang et al., 2023) on a tiny random Llama with transformers.Trainer.

Every targeted weight starts with an SVD-form update of rank init_r; during training AdaLoRA scores each
rank-1 component and prunes the weakest ones, down to target_r per module on average at step
total_step - tfinal. `AdaLoraCallback` calls the allocation after every optimizer step for you; in a
plain loop call `model.base_model.update_and_allocate(step)` after `optimizer.step()` instead.

Run: .venv/bin/python examples/07_adalora.py
"""

import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from deltatune import AdaLoraCallback, AdaLoraConfig, PeftModel, TaskType, get_peft_model

STEPS = 20


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
    peft_config = AdaLoraConfig(
        task_type=TaskType.CAUSAL_LM,
        init_r=8,
        target_r=2,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "down_proj"],
        tinit=4,
        tfinal=4,
        total_step=STEPS,
    )  # the budget schedule spans the run
    model = get_peft_model(LlamaForCausalLM(config), peft_config)
    model.print_trainable_parameters()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=8,
            max_steps=STEPS,
            learning_rate=1e-2,
            logging_steps=10,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=tiny_dataset(), callbacks=[AdaLoraCallback()])
        trainer.train()
        pattern = model.peft_config["default"].rank_pattern  # which rank-1 components each module kept
        for name, keep in pattern.items():
            print(f"{name.removesuffix('.lora_E'):35s} rank {sum(keep)} of {len(keep)}")
        print("total rank", sum(sum(keep) for keep in pattern.values()), "= budget", 2 * len(pattern))
        model.save_pretrained(out + "/adapter")  # only the kept components are written
        reloaded = PeftModel.from_pretrained(LlamaForCausalLM(config), out + "/adapter")
        q_proj = reloaded.base_model.model.model.layers[0].self_attn.q_proj
        print("reloaded layer 0 q_proj at rank", q_proj.adapters["default"].lora_A.shape[0])


if __name__ == "__main__":
    main()
