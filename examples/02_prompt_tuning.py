"""Prompt Tuning on a tiny random Llama, the tutorials' steps 1-7: a hard prompt (TEXT init) trained with
transformers.Trainer to make the model answer every question with "w42 w43 w44 w45", saved, loaded onto the
base model again and used for batched generation (left padding, KV cache).

Run: .venv/bin/python examples/02_prompt_tuning.py
"""

import tempfile

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Trainer, TrainingArguments

from deltatune import PeftModel, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

ANSWER = [42, 43, 44, 45]


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Words w0 ... w99 are token ids 0 ... 99 (built offline, no hub)."""
    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(100)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", pad_token="w0")


def question_answer_rows(n: int = 512) -> list[dict]:
    """Four random question tokens, then the fixed answer; the loss is on the answer only."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        question = torch.randint(1, 100, (4,), generator=generator).tolist()
        rows.append({"input_ids": question + ANSWER, "attention_mask": [1] * 8, "labels": [-100] * 4 + ANSWER})
    return rows


def main() -> None:
    tokenizer = word_tokenizer()
    with tempfile.TemporaryDirectory() as out:
        torch.manual_seed(0)
        config = LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=100,
            pad_token_id=0,
            initializer_range=0.2,
        )
        LlamaForCausalLM(config).save_pretrained(out + "/base")  # stands in for a pretrained model
        model = LlamaForCausalLM.from_pretrained(out + "/base")  # 1. model
        text = "w1 w2 w3 w4 w5"  # the hard prompt: its word embeddings start the soft prompt
        peft_config = PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            prompt_tuning_init=PromptTuningInit.TEXT,
            prompt_tuning_init_text=text,
            num_virtual_tokens=len(tokenizer(text)["input_ids"]),
            tokenizer_name_or_path=tokenizer,
        )  # 2. config
        model = get_peft_model(model, peft_config)  # 3. PeftModel
        model.print_trainable_parameters()  # 5 virtual tokens x 64 = 320
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=8,
            max_steps=100,
            learning_rate=1e-1,
            logging_steps=20,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
        )  # 4. args
        Trainer(model=model, args=args, train_dataset=question_answer_rows()).train()  # 5-6. train
        model.save_pretrained(out + "/adapter")  # adapter_model.safetensors holds `prompt_embeddings`, as in peft
        base = LlamaForCausalLM.from_pretrained(out + "/base")
        reloaded = PeftModel.from_pretrained(base, out + "/adapter")  # 7. load
    questions = tokenizer(["w10 w71 w3 w58", "w7 w7"], return_tensors="pt", padding=True, padding_side="left")
    output = reloaded.generate(**questions, max_new_tokens=4, do_sample=False)
    for question, answer in zip(["w10 w71 w3 w58", "w7 w7"], tokenizer.batch_decode(output[:, -4:]), strict=True):
        print(f"{question!r} -> {answer!r}")  # the trained prompt makes the answer w42 w43 w44 w45


if __name__ == "__main__":
    main()
