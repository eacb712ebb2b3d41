"""Prefix Tuning on a tiny random Llama (grouped-query attention): learned keys and values in front of every
attention layer, trained with transformers.Trainer to make the model answer every question with
"w42 w43 w44 w45"; then saved, loaded onto the base model again and used for generation, greedy and sampled,
on a left-padded batch (the prefixes go into the KV cache before the first step).

Run: .venv/bin/python examples/04_prefix_tuning.py
"""

import tempfile

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Trainer, TrainingArguments

from deltatune import PeftModel, PrefixTuningConfig, TaskType, get_peft_model

ANSWER = [42, 43, 44, 45]


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Words w0 ... w99 are token ids 0 ... 99 (built offline, no hub)."""
    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(100)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", pad_token="w0")


def question_answer_rows(n: int = 512, width: int = 9) -> list[dict]:
    """Two to five random question tokens, then the fixed answer, right-padded to `width`; the loss is on the
    answer only. Varied lengths matter here: the prefix keys carry no rotary position, so a prefix trained on one
    question length learns that length's positions."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        length = int(torch.randint(2, 6, (), generator=generator))
        question = torch.randint(1, 100, (length,), generator=generator).tolist()
        pad = width - length - len(ANSWER)
        rows.append(
            {
                "input_ids": question + ANSWER + [0] * pad,
                "attention_mask": [1] * (length + 4) + [0] * pad,
                "labels": [-100] * length + ANSWER + [-100] * pad,
            }
        )
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
        raw = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5)  # prefixes trained directly
        trainable, _ = get_peft_model(
            LlamaForCausalLM.from_pretrained(out + "/base"), raw
        ).get_nb_trainable_parameters()
        print(
            f"without projection: {trainable} trainable = 5 tokens x 2 layers x (key + value) x {raw.token_dim} "
            "(2 key/value heads x 16: grouped-query attention, not the hidden size 64)"
        )
        model = LlamaForCausalLM.from_pretrained(out + "/base")  # 1. model
        peft_config = PrefixTuningConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5, prefix_projection=True
        )  # 2. config: embedding -> Linear -> Tanh -> Linear
        model = get_peft_model(model, peft_config)  # 3. PeftModel
        model.print_trainable_parameters()  # with projection
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=8,
            max_steps=100,
            learning_rate=1e-2,
            logging_steps=20,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
        )  # 4. args
        Trainer(model=model, args=args, train_dataset=question_answer_rows()).train()  # 5-6. train
        model.save_pretrained(out + "/adapter")  # the computed prefixes, (5, 2 layers x 2 x 32), as in peft
        reloaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(out + "/base"), out + "/adapter")  # 7.
    questions = ["w10 w71 w3 w58", "w7 w7"]
    batch = tokenizer(questions, return_tensors="pt", padding=True, padding_side="left")
    greedy = reloaded.generate(**batch, max_new_tokens=4, do_sample=False)
    torch.manual_seed(0)
    sampled = reloaded.generate(**batch, max_new_tokens=4, do_sample=True, top_k=5, num_return_sequences=2)
    for question, answer in zip(questions, tokenizer.batch_decode(greedy[:, -4:]), strict=True):
        print(f"greedy  {question!r} -> {answer!r}")
    for i, answer in enumerate(tokenizer.batch_decode(sampled[:, -4:])):
        print(f"sampled {questions[i // 2]!r} -> {answer!r}")


if __name__ == "__main__":
    main()
