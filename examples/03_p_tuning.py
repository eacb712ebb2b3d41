"""P-Tuning on a tiny random Llama: the soft prompt comes out of a small MLP (or a BiLSTM + MLP), trained with
transformers.Trainer to make the model answer every question with "w42 w43 w44 w45"; then saved, loaded onto
the base model again and used for batched generation (left padding, KV cache).

The saved file holds only the encoder's output (`prompt_embeddings`, 5 x 64 values here), as in peft: the
MLP is needed to train, not to use the prompt.

Run: .venv/bin/python examples/03_p_tuning.py
"""

import tempfile

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Trainer, TrainingArguments

from deltatune import PeftModel, PromptEncoderConfig, PromptEncoderReparameterizationType, TaskType, get_peft_model

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
        for kind in (PromptEncoderReparameterizationType.LSTM, PromptEncoderReparameterizationType.MLP):
            probe = PromptEncoderConfig(
                task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5, encoder_reparameterization_type=kind
            )
            trainable, _ = get_peft_model(
                LlamaForCausalLM.from_pretrained(out + "/base"), probe
            ).get_nb_trainable_parameters()
            print(f"{kind.value} encoder (hidden size 64): {trainable:,} trainable parameters")
        model = LlamaForCausalLM.from_pretrained(out + "/base")  # 1. model
        peft_config = PromptEncoderConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=5,
            encoder_reparameterization_type=PromptEncoderReparameterizationType.MLP,
            encoder_hidden_size=64,
        )  # 2. config
        model = get_peft_model(model, peft_config)  # 3. PeftModel
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=8,
            max_steps=60,
            learning_rate=1e-2,
            logging_steps=20,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
        )  # 4. args
        Trainer(model=model, args=args, train_dataset=question_answer_rows()).train()  # 5-6. train
        model.save_pretrained(out + "/adapter")
        reloaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(out + "/base"), out + "/adapter")  # 7.
        reloaded.print_trainable_parameters()  # loaded for inference: nothing trains, only the 5 x 64 prompt is kept
    questions = ["w10 w71 w3 w58", "w7 w7"]
    batch = tokenizer(questions, return_tensors="pt", padding=True, padding_side="left")
    output = reloaded.generate(**batch, max_new_tokens=4, do_sample=False)
    for question, answer in zip(questions, tokenizer.batch_decode(output[:, -4:]), strict=True):
        print(f"{question!r} -> {answer!r}")


if __name__ == "__main__":
    main()
