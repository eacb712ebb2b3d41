"""How `deltatune train` sets up the run around the method: the `TrainingArguments` (scheduler, warm-up,
evaluation during training, the best checkpoint, a `trainer:` block passed through, logging integrations,
gradient checkpointing), defaults that scale with the model and data, and the loss plot written at the end.

The device and dtype are chosen in `deltatune.cli.precision`; on a GPU with a half-precision base the Trainer
runs the forward pass under autocast (`bf16=True` / `fp16=True`) while the adapter weights stay in fp32.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import logging
import os
from typing import Any

from transformers import SchedulerType, TrainingArguments

logger = logging.getLogger(__name__)

# --report-to name -> the module its Trainer integration imports, and the package that provides it
REPORTERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}
LR_SCHEDULERS = tuple(kind.value for kind in SchedulerType)
# TrainingArguments fields that deltatune's own flags set: a `trainer:` block must use the flag instead
FLAG_FIELDS = {
    "output_dir": "--output",
    "max_steps": "--max-steps",
    "num_train_epochs": "--epochs",
    "learning_rate": "--lr",
    "per_device_train_batch_size": "--batch-size",
    "gradient_accumulation_steps": "--grad-accum",
    "logging_steps": "--logging-steps",
    "save_steps": "--save-steps",
    "seed": "--seed",
    "report_to": "--report-to",
    "lr_scheduler_type": "--lr-scheduler",
    "warmup_steps": "--warmup-ratio",
    "weight_decay": "--weight-decay",
    "eval_steps": "--eval-steps",
    "eval_strategy": "--eval-steps",
    "load_best_model_at_end": "--keep-best",
    "metric_for_best_model": "--keep-best",
    "bf16": "--dtype",
    "fp16": "--dtype",
    "use_cpu": "--device",
    "gradient_checkpointing": "--gradient-checkpointing",
}
LARGE_MODEL_PARAMS = 1_000_000_000
LORA_LR_RANGE = "1e-4 to 2e-4"
PLOT_FILE = "loss.png"


def enable_gradient_checkpointing(peft_model: Any) -> None:
    """Recompute activations in the backward pass. With reentrant checkpointing the frozen embedding output must
    require grad, or no gradient reaches the adapters inside the checkpointed layers (peft does the same)."""
    base = peft_model.get_base_model()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    base.enable_input_require_grads()
    if getattr(base.config, "use_cache", False):
        base.config.use_cache = False  # a KV cache is useless in training and conflicts with checkpointing


def check_schedule(lr_scheduler: str, warmup_ratio: float) -> None:
    if lr_scheduler not in LR_SCHEDULERS:
        raise ValueError(f"--lr-scheduler {lr_scheduler!r}: choose one of {', '.join(LR_SCHEDULERS)}")
    if not 0 <= warmup_ratio < 1:
        raise ValueError(f"--warmup-ratio {warmup_ratio:g}: give a fraction of the steps, from 0 up to 1")


def check_report_to(report_to: str) -> list[str]:
    """`--report-to` as TrainingArguments takes it; the integration's package must be installed."""
    if report_to == "none":
        return []
    if report_to not in REPORTERS:
        raise ValueError(f"--report-to {report_to!r}: choose one of {', '.join(REPORTERS)} or none")
    module, package = REPORTERS[report_to]
    alternatives = ("tensorboardX",) if report_to == "tensorboard" else ()
    if all(importlib.util.find_spec(name) is None for name in (module, *alternatives)):
        raise ImportError(f"--report-to {report_to} needs the {package} package: pip install {package}")
    return [report_to]


def check_trainer_block(block: dict[str, Any]) -> dict[str, Any]:
    """A run.yaml `trainer:` block: every key must be a TrainingArguments field that no deltatune flag sets."""
    fields = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    for key in block:
        if key in FLAG_FIELDS:
            raise ValueError(f"trainer: {key!r} is set by {FLAG_FIELDS[key]}; give that option instead")
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(
                f"trainer: {key!r} is not a TrainingArguments field{hint}; fix or remove it (the fields are listed "
                "in the transformers TrainingArguments documentation)"
            )
    return dict(block)


def evaluation_arguments(eval_steps: int | None, keep_best: bool, save_steps: int, has_eval: bool) -> dict[str, Any]:
    """TrainingArguments for eval loss during training and for keeping the best checkpoint."""
    if keep_best and eval_steps is None:
        eval_steps = save_steps  # a checkpoint can only be the best if it was evaluated
    if eval_steps is None:
        return {"eval_strategy": "no"}
    if not has_eval:
        flag = "--keep-best" if keep_best else "--eval-steps"
        raise ValueError(f"{flag} needs held-out data to evaluate: give --eval-data FILE")
    args: dict[str, Any] = {"eval_strategy": "steps", "eval_steps": eval_steps}
    if keep_best:
        if save_steps % eval_steps:
            raise ValueError(
                f"--keep-best: --save-steps {save_steps} must be a multiple of --eval-steps {eval_steps}, so that "
                "every checkpoint has an eval loss to compare"
            )
        args.update(load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False)
    return args


def default_max_length(config: Any, tokenizer: Any) -> int:
    """The longest sequence the model takes (max_position_embeddings); rows are cut only there."""
    context = getattr(config, "max_position_embeddings", None)
    if not context:
        limit = getattr(tokenizer, "model_max_length", None)
        context = limit if isinstance(limit, int) and limit < 1_000_000 else 2048
    return int(context)


def warn_large_model_lr(param_count: int, lr: float, lr_given: bool) -> str | None:
    """The warning for a model above 1B parameters trained at the sample task's default learning rate."""
    if lr_given or param_count <= LARGE_MODEL_PARAMS or lr <= 2e-4:
        return None
    message = (
        f"the model has {param_count / 1e9:.1f}B parameters, and --lr defaults to {lr:g}, tuned for the 135M "
        f"sample task; larger models usually train LoRA at {LORA_LR_RANGE} (pass --lr)"
    )
    logger.warning(message)
    return message


def save_loss_plot(folder: str, train: list[dict[str, Any]], evals: list[dict[str, Any]]) -> str:
    """loss.png: train and eval loss against step (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([e["step"] for e in train], [e["loss"] for e in train], label="train loss")
    if evals:
        ax.plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(folder, PLOT_FILE)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
