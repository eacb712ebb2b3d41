"""Bottleneck adapters (Houlsby et al., 2019) on a tiny random Llama with transformers.Trainer (as in *大模型高效微调*).

Small down-project / non-linearity / up-project networks go after the attention block and after the
feed-forward block of every layer ("houlsby"), or after the feed-forward block only ("pfeiffer"). The
up-projection starts at zero, so training starts from the base model exactly. Two named adapters share one
base model; `set_adapter` switches between them.

Run: .venv/bin/python examples/06_adapter.py
"""

import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from deltatune import AdapterConfig, PeftModel, TaskType, get_peft_model


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
        initializer_range=0.1,
    )
    model = LlamaForCausalLM(config)  # 1. model
    peft_config = AdapterConfig(task_type=TaskType.CAUSAL_LM, preset="houlsby", reduction_factor=4)  # 2. config
    model = get_peft_model(model, peft_config)  # 3. PeftModel: 2 adapters per layer, bottleneck 64 / 4 = 16
    model.print_trainable_parameters()
    second = AdapterConfig(task_type=TaskType.CAUSAL_LM, preset="pfeiffer", bottleneck_size=8)  # FFN only
    model.add_adapter("ffn_only", second)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=8,
            max_steps=20,
            learning_rate=1e-2,
            logging_steps=5,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
        )  # 4. args
        trainer = Trainer(model=model, args=args, train_dataset=tiny_dataset())
        trainer.train()  # 5-6. train the "default" adapter
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        print(f"loss {losses[0]:.2f} -> {losses[-1]:.2f}")
        ids = torch.tensor([[10, 11, 12, 13, 14]])
        model.eval()
        with torch.no_grad():
            trained = model(input_ids=ids).logits
            model.set_adapter("ffn_only")  # untrained: zero up-projection, so exactly the base model
            untrained = model(input_ids=ids).logits
            with model.disable_adapter():
                base = model(input_ids=ids).logits
            model.set_adapter("default")
        print(
            "untrained adapter == base:",
            torch.equal(untrained, base),
            "| trained adapter == base:",
            torch.equal(trained, base),
        )
        model.save_pretrained(out + "/adapters")  # "default" in the folder, "ffn_only" in a sub-folder
        reloaded = PeftModel.from_pretrained(LlamaForCausalLM(config), out + "/adapters")  # 7. load
        print("reloaded adapter:", reloaded.active_peft_config.peft_type.value, reloaded.active_peft_config.preset)


if __name__ == "__main__":
    main()
