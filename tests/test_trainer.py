"""Training with transformers.Trainer used unchanged (the tutorials' steps 4-6), and with a plain PyTorch loop.

Trainer only knows peft's classes; deltatune.core.trainer_integration makes it treat our PeftModel the same way, so
checkpoints are adapter files, resume_from_checkpoint works, and a quantized base with adapters is accepted.
"""

import os

import pytest
import torch
from helpers.models import VOCAB, tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments
from transformers.trainer_utils import validate_quantization_for_training

import deltatune
from deltatune import BitFitConfig, LoraConfig, PeftModel, TaskType, get_peft_model

STEPS = 4


def examples(n: int = 8, length: int = 12) -> list[dict[str, torch.Tensor]]:
    """A fixed little set of token rows; labels = inputs (causal LM), which a few steps can start to fit."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(3, VOCAB, (n, length), generator=gen)
    return [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in rows]


def batch_loss(model) -> float:
    batch = {k: torch.stack([e[k] for e in examples()]) for k in ("input_ids", "attention_mask", "labels")}
    training = model.training
    model.eval()  # (no checkpointing of a no-grad pass)
    with torch.no_grad():
        loss = model(**batch).loss.item()
    model.train(training)
    return loss


def lora_model(config=None):
    config = config or LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, target_modules="all-linear")
    return get_peft_model(tiny_model("llama"), config)


def training_args(output_dir, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(output_dir),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_steps=2,
        save_strategy="steps",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def base_snapshot(model: PeftModel) -> dict[str, torch.Tensor]:
    """Every frozen base tensor (not an adapter), copied."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def adapter_snapshot(model: PeftModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.get_adapter_state_dict().items()}


def assert_only_adapter_changed(model: PeftModel, base_before, adapter_before) -> None:
    for name, before in base_before.items():
        assert torch.equal(dict(model.named_parameters())[name], before), f"{name} (frozen) changed"
    after = model.get_adapter_state_dict()
    changed = [k for k in after if not torch.equal(after[k], adapter_before[k])]
    assert len(changed) == len(after), f"adapter tensors left untouched: {sorted(set(after) - set(changed))[:3]}"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One uninterrupted 4-step LoRA run, checkpoints every 2 steps (shared by several tests)."""
    out = tmp_path_factory.mktemp("run")
    model = lora_model()
    before = (batch_loss(model), base_snapshot(model), adapter_snapshot(model))
    trainer = Trainer(model=model, args=training_args(out), train_dataset=examples())
    trainer.train()
    return out, model, before


def test_trainer_lowers_the_loss_and_changes_only_the_adapter(finished_run):
    _, model, (loss_before, base_before, adapter_before) = finished_run
    assert batch_loss(model) < loss_before - 0.05
    assert_only_adapter_changed(model, base_before, adapter_before)


def test_trainer_checkpoints_are_adapter_files(finished_run):
    out, model, _ = finished_run
    checkpoint = out / "checkpoint-4"
    files = set(os.listdir(checkpoint))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}
    saved = load_file(checkpoint / "adapter_model.safetensors")
    assert set(saved) == set(model.get_adapter_state_dict())
    for key, value in model.get_adapter_state_dict().items():
        assert torch.equal(saved[key], value)


def test_trainer_save_model_writes_the_adapter(finished_run, tmp_path):
    out, model, _ = finished_run
    Trainer(model=model, args=training_args(out)).save_model(str(tmp_path))
    assert not (tmp_path / "model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert batch_loss(reloaded) == pytest.approx(batch_loss(model), abs=1e-6)


def test_resume_from_checkpoint_gives_the_uninterrupted_result(finished_run, tmp_path):
    out, model, _ = finished_run
    resumed = lora_model()
    trainer = Trainer(model=resumed, args=training_args(tmp_path), train_dataset=examples())
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert trainer.state.global_step == STEPS
    expected, got = model.get_adapter_state_dict(), resumed.get_adapter_state_dict()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6)
    # and the resumed run really started from the checkpoint: it differs from 2 steps from scratch
    assert not torch.equal(got[next(iter(got))], adapter_snapshot(lora_model())[next(iter(got))])


def test_load_best_model_at_end_reloads_the_adapter(tmp_path):
    model = lora_model()
    args = training_args(
        tmp_path,
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=examples(), eval_dataset=examples()[:4])
    trainer.train()
    best = load_file(os.path.join(trainer.state.best_model_checkpoint, "adapter_model.safetensors"))
    for key, value in model.get_adapter_state_dict().items():
        assert torch.equal(value, best[key])


@pytest.mark.parametrize("reentrant", [False, True])
def test_trainer_with_gradient_checkpointing(tmp_path, reentrant):
    model = lora_model()
    loss_before, base_before, adapter_before = batch_loss(model), base_snapshot(model), adapter_snapshot(model)
    args = training_args(
        tmp_path,
        gradient_checkpointing=True,
        save_strategy="no",
        gradient_checkpointing_kwargs={"use_reentrant": reentrant},
    )
    trainer = Trainer(model=model, args=args, train_dataset=examples())
    trainer.train()
    base = model.get_base_model()  # transformers 5.24 renamed is_gradient_checkpointing
    assert getattr(base, "is_activation_checkpointing", None) or base.is_gradient_checkpointing
    assert batch_loss(model) < loss_before - 0.05
    assert_only_adapter_changed(model, base_before, adapter_before)


def test_trainer_with_bitfit(tmp_path):
    model = get_peft_model(tiny_model("bloom"), BitFitConfig(task_type=TaskType.CAUSAL_LM))
    loss_before, base_before, adapter_before = batch_loss(model), base_snapshot(model), adapter_snapshot(model)
    Trainer(model=model, args=training_args(tmp_path, max_steps=2), train_dataset=examples()).train()
    assert batch_loss(model) < loss_before
    assert_only_adapter_changed(model, base_before, adapter_before)
    saved = load_file(tmp_path / "checkpoint-2" / "adapter_model.safetensors")
    assert saved and all(k.endswith(".bias") for k in saved)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_plain_pytorch_loop(checkpointing):
    model = lora_model()
    if checkpointing:  # peft's call; reentrant checkpointing needs inputs that require grad (frozen embeddings)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    loss_before, base_before, adapter_before = batch_loss(model), base_snapshot(model), adapter_snapshot(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = {k: torch.stack([e[k] for e in examples()]) for k in ("input_ids", "attention_mask", "labels")}
    for _ in range(6):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert batch_loss(model) < loss_before - 0.1
    assert_only_adapter_changed(model, base_before, adapter_before)


def test_quantized_base_with_adapter_passes_trainers_check(tmp_path):
    """Trainer refuses a purely 4-bit model but must accept it once our adapter is attached."""
    tiny_model("llama").save_pretrained(tmp_path)
    quantized = AutoModelForCausalLM.from_pretrained(
        tmp_path,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
        device_map="cpu",
    )
    with pytest.raises(ValueError, match="purely quantized models"):
        validate_quantization_for_training(quantized)
    model = get_peft_model(quantized, LoraConfig(task_type=TaskType.CAUSAL_LM, r=4))
    validate_quantization_for_training(model)
    Trainer(model=model, args=training_args(tmp_path / "out"), train_dataset=examples())  # no error


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_lean_loss_trainer_trains_as_trainer_does(tmp_path, monkeypatch, grad_accum):
    """Same losses and adapter weights as Trainer's own loss, with the lean loss run at every training step."""
    import deltatune.training.lean_loss_trainer as lean_module

    calls = []
    original = lean_module.lean_causal_lm_loss
    monkeypatch.setattr(lean_module, "lean_causal_lm_loss", lambda *a, **k: calls.append(k) or original(*a, **k))
    data = examples()
    data[1]["labels"][:5] = -100  # rows with different counted tokens: the accumulated mean must weigh them
    runs = {}
    for trainer_class in (Trainer, deltatune.LeanLossTrainer):
        torch.manual_seed(0)
        model = lora_model()
        args = training_args(
            tmp_path / trainer_class.__name__,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=grad_accum,
            save_strategy="no",
        )
        trainer = trainer_class(model=model, args=args, train_dataset=data)
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        runs[trainer_class] = losses, adapter_snapshot(model)
    (losses, weights), (lean_losses, lean_weights) = runs.values()
    assert len(calls) == STEPS * grad_accum
    assert all(k["num_items_in_batch"] is not None for k in calls)  # Trainer's divisor, as the model gets it
    assert lean_losses == pytest.approx(losses, rel=1e-5)
    for name, tensor in weights.items():
        assert torch.allclose(lean_weights[name], tensor, atol=1e-5), name


def test_lean_loss_trainer_uses_trainers_loss_where_the_lean_one_would_differ(tmp_path, monkeypatch):
    import deltatune.training.lean_loss_trainer as lean_module

    monkeypatch.setattr(lean_module, "lean_causal_lm_loss", lambda *a, **k: pytest.fail("lean loss used"))
    adalora = get_peft_model(tiny_model("llama"), deltatune.AdaLoraConfig(target_modules=["q_proj"], total_step=STEPS))
    for model, overrides in ((adalora, {}), (lora_model(), {"bf16": True})):
        trainer = deltatune.LeanLossTrainer(
            model=model, args=training_args(tmp_path, save_strategy="no", **overrides), train_dataset=examples()
        )
        trainer.train()
