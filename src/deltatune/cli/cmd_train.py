"""`deltatune train`: fine-tune a causal LM with one method through `transformers.Trainer`.

Steps (the tutorials' 1-7): load the base model and tokenizer, build the method's config from the options,
wrap with `get_peft_model`, tokenize the data (loss on responses only), train with `Trainer` (progress bar,
logs every `logging_steps`, a checkpoint every `save_steps`), then save the adapter, `run.yaml` and
`loss_history.json` in the output folder. Works the same under `torchrun`/`accelerate launch`. The Trainer is
`LeanLossTrainer`: on a single CPU process it computes the same loss without the full vocabulary logits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import pickle
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

import deltatune
from deltatune import PeftConfig, get_peft_model
from deltatune.cli import data as data_mod
from deltatune.cli import precision as precision_mod
from deltatune.cli import trainer_setup as setup
from deltatune.cli.generation import eval_loss, perplexity
from deltatune.cli.methods import (
    METHOD_OPTIONS,
    build_peft_config,
    check_target_names,
    method_entry,
    warn_rank_above_layers,
)
from deltatune.cli.models import cache_dir, load_model, read_run, resolve_model
from deltatune.cli.options import RUN_FILE, TrainOptions, make_options
from deltatune.cli.run_guard import (
    StopOnNonFinite,
    StopOnSignal,
    disk_full_error,
    is_disk_full,
    save_interrupted,
)
from deltatune.cli.run_lock import RunLock
from deltatune.cli.runs import (
    HISTORY_FILE,
    PeakMemory,
    StepTimer,
    checkpoint_step,
    prepare_output,
    remove_run,
    tidy_run_folder,
)
from deltatune.core.files import atomic_write_text
from deltatune.training.lean_loss_trainer import LeanLossTrainer

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a run produced and measured."""

    output: str
    method: str
    steps: int
    train_loss: float | None
    eval_loss: float | None
    seconds_per_step: float | None
    peak_memory_mb: float
    trainable_params: int
    all_params: int
    interrupted: bool = False
    stopped_by: str = ""  # "Ctrl-C" or "SIGTERM" when a signal stopped the run early
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def trainable_percent(self) -> float:
        return 100 * self.trainable_params / self.all_params


def as_options(options: TrainOptions | dict[str, Any]) -> TrainOptions:
    return options if isinstance(options, TrainOptions) else make_options(options)


def load_data(options: TrainOptions) -> tuple[list, list | None, str | None]:
    """Checked train rows, held-out rows (None without held-out data) and where the held-out rows came from."""
    rows = data_mod.load_rows(options.data, options.split, columns=options.columns)
    eval_source = options.eval_data or (data_mod.bundled_path(data_mod.BUNDLED_EVAL) if options.data is None else None)
    if not eval_source:
        return rows, None, None
    # --columns names the columns of the user's files; the bundled held-out split has deltatune's own names
    eval_columns = options.columns if options.eval_data else None
    return rows, data_mod.load_rows(eval_source, flag="--eval-data", columns=eval_columns), eval_source


def tokenize_data(options: TrainOptions, tokenizer: Any, rows: list, eval_rows: list | None, eval_source: str | None):
    """Tokenized train and held-out examples (loss on response tokens only), cached in the cache folder's
    `tokenized/` so that a second run on the same data does not tokenize again."""
    settings = {"train_on": options.train_on, "cache_dir": os.path.join(cache_dir(options.cache_dir), "tokenized")}
    train = data_mod.tokenize_rows(
        rows, tokenizer, options.template, options.max_length, options.data or "the sample set", **settings
    )
    if eval_rows is None:
        return train, None
    return train, data_mod.tokenize_rows(
        eval_rows, tokenizer, options.template, options.max_length, eval_source, **settings
    )


def fit_max_length(options: TrainOptions, config: Any, tokenizer: Any, rows: list, eval_rows: list | None, source):
    """Tokenize the data; without --max-length, rows are cut only at the model's context, and --max-length becomes
    the longest row (what run.yaml records). Returns (options with max_length set, train set, held-out set)."""
    if options.max_length is not None:
        return (options, *tokenize_data(options, tokenizer, rows, eval_rows, source))
    context = dataclasses.replace(options, max_length=setup.default_max_length(config, tokenizer))
    train_set, eval_set = tokenize_data(context, tokenizer, rows, eval_rows, source)
    longest = max(len(example["input_ids"]) for example in [*train_set, *(eval_set or [])])
    logger.info("--max-length %d: the longest tokenised row (the model takes %d)", longest, context.max_length)
    return dataclasses.replace(options, max_length=longest), train_set, eval_set


def total_steps(options: TrainOptions, examples: int, processes: int) -> int:
    """The optimizer steps Trainer will run (what AdaLoRA lays its rank schedule over)."""
    if options.max_steps:
        return options.max_steps
    batches = math.ceil(examples / (options.batch_size * processes))
    return max(math.ceil(options.epochs * max(batches // options.grad_accum, 1)), 1)


def wrap_model(model: torch.nn.Module, options: TrainOptions, total_step: int):
    """The base model (prepared for training if quantized) wrapped with the method's adapter."""
    if options.load_in_4bit or options.load_in_8bit:
        model = deltatune.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    check_target_names(model, options.method_options.get("target_modules"))
    set_seed(options.seed)  # the adapter's initial weights depend on it
    peft_model = get_peft_model(model, build_peft_config(options.method, options.method_options, total_step))
    warn_rank_above_layers(peft_model, options.method_options)
    if options.gradient_checkpointing:
        setup.enable_gradient_checkpointing(peft_model)
    return peft_model


def training_arguments(
    options: TrainOptions, precision: precision_mod.Precision | None = None, has_eval: bool = False
) -> TrainingArguments:
    """The Trainer's arguments: deltatune's flags, then the run.yaml `trainer:` block (checked) for the rest."""
    lr = options.lr if options.lr is not None else method_entry(options.method).lr
    precision = precision or precision_mod.choose_precision("fp32", options.device, None)
    mixed = precision.mixed_precision
    setup.check_schedule(options.lr_scheduler, options.warmup_ratio)
    return TrainingArguments(
        output_dir=options.output,
        max_steps=options.max_steps or -1,
        num_train_epochs=options.epochs,
        learning_rate=lr,
        per_device_train_batch_size=options.batch_size,
        gradient_accumulation_steps=options.grad_accum,
        logging_steps=options.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=options.save_steps,
        save_total_limit=2,
        seed=options.seed,
        data_seed=options.seed,
        report_to=setup.check_report_to(options.report_to),
        use_cpu=precision.device == "cpu",
        bf16=mixed == "bf16",
        fp16=mixed == "fp16",
        remove_unused_columns=False,
        label_names=["labels"],
        lr_scheduler_type=options.lr_scheduler,
        warmup_steps=options.warmup_ratio,  # below 1: a fraction of the total steps
        weight_decay=options.weight_decay,
        per_device_eval_batch_size=options.batch_size,
        **setup.evaluation_arguments(options.eval_steps, options.keep_best, options.save_steps, has_eval),
        disable_tqdm=False,
        ddp_find_unused_parameters=False,
        **setup.check_trainer_block(options.trainer),
    )


def write_run_files(options: TrainOptions, model_path: str) -> None:
    """run.yaml: the options used (method options with their defaults filled in, local paths made absolute) and
    the resolved model."""
    entry = method_entry(options.method)
    values = options.to_yaml_dict()
    values["lr"] = options.lr if options.lr is not None else entry.lr
    for key in entry.options:
        values[key] = options.method_options.get(key, METHOD_OPTIONS[key][0])
    values["resolved_model"] = model_path
    for key in ("model", "data", "eval_data", "cache_dir", "resolved_model"):  # chat/eval may run from another folder
        if isinstance(values.get(key), str) and os.path.exists(values[key]):
            values[key] = os.path.abspath(values[key])
    os.makedirs(options.output, exist_ok=True)
    text = "# written by deltatune train; repeat the run with: deltatune train --config run.yaml --overwrite\n"
    atomic_write_text(
        os.path.join(options.output, RUN_FILE), text + yaml.safe_dump(values, sort_keys=False, allow_unicode=True)
    )


class WriteRunFiles(TrainerCallback):
    """Writes run.yaml once training starts: after Trainer has loaded a --resume checkpoint, so that a resume that
    fails (another method, other shapes) leaves the run's own run.yaml as it was."""

    def __init__(self, options: TrainOptions, model_path: str, is_main: bool) -> None:
        self.options, self.model_path, self.is_main = options, model_path, is_main
        self.started = False  # True once Trainer has loaded everything it resumes from

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = True
        if self.is_main:
            write_run_files(self.options, self.model_path)


def check_resume(options: TrainOptions, peft_config: Any, checkpoint: str) -> None:
    """Refuse a --resume that cannot continue: a checkpoint of another method, a new --lr (Trainer would keep the
    checkpoint's), or a finished run already at --max-steps (an unfinished one is finished from the checkpoint)."""
    saved = PeftConfig.from_pretrained(checkpoint).peft_type
    if saved != peft_config.peft_type:
        raise ValueError(
            f"--resume: {checkpoint} holds a {saved.value} adapter, but --method {options.method} makes "
            f"{peft_config.peft_type.value}; continue it with the method it was trained with, or train another "
            "method in a new --output"
        )
    run = read_run(os.path.dirname(os.path.abspath(checkpoint)))
    lr = options.lr if options.lr is not None else method_entry(options.method).lr
    if run.get("lr") is not None and float(run["lr"]) != lr:
        raise ValueError(
            f"--resume continues with the run's learning rate {run['lr']} (its optimizer and schedule are in "
            f"the checkpoint), not --lr {lr:g}; leave --lr out, or start a new run to change it"
        )
    step = checkpoint_step(checkpoint)
    if options.max_steps and step >= options.max_steps and finished_steps(options.output) >= step:
        raise ValueError(
            f"--resume: {checkpoint} is at step {step}, and --max-steps is {options.max_steps}: nothing is "
            f"left to train; raise --max-steps to continue the run"
        )


def finished_steps(output: str) -> int:
    """The steps of the run's last finished train (loss_history.json is written last); 0 when none finished."""
    try:
        with open(os.path.join(output, HISTORY_FILE), encoding="utf-8") as handle:
            summary = json.load(handle)["summary"]
        return 0 if summary.get("interrupted") else int(summary["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def train(options: TrainOptions | dict[str, Any], callbacks: list | None = None) -> TrainResult:
    """Run `deltatune train` with these options (flags as keys); see the module docstring.

    The run folder is locked for the whole run (one process per folder; every rank of a torchrun job is one run).

    Raises:
        KeyboardInterrupt: when interrupted hard; a checkpoint of the last finished step is saved first.
    """
    from accelerate import PartialState

    options = as_options(options)
    options.check()
    peft_config = build_peft_config(
        options.method, options.method_options, options.max_steps or 10**6
    )  # bad options fail first
    state = PartialState(cpu=precision_mod.choose_device(options.device) == "cpu")
    with RunLock(options.output) if state.is_main_process else contextlib.nullcontext():
        return _train_locked(options, peft_config, state, callbacks)


def _train_locked(options: TrainOptions, peft_config: Any, state: Any, callbacks: list | None) -> TrainResult:
    resume_from = prepare_output(options.output, options.overwrite, options.resume)
    if resume_from:
        check_resume(options, peft_config, resume_from)
    rows, eval_rows, eval_source = load_data(options)  # bad data fails before anything is written
    state.wait_for_everyone()  # every rank has checked the folder before the main one writes into it
    config = model_config(options)
    precision = precision_mod.choose_precision(options.dtype, options.device, config)
    args = training_arguments(options, precision, has_eval=eval_rows is not None)  # bad Trainer options fail here
    precision_mod.log_precision(precision)
    loaded = load_model(
        options.model,
        options.cache_dir,
        options.load_in_4bit,
        options.load_in_8bit,
        device=precision.device,
        trust_remote_code=options.trust_remote_code,
        dtype=precision.dtype,
    )
    tokenizer = loaded.tokenizer
    options, train_set, eval_set = fit_max_length(options, loaded.model.config, tokenizer, rows, eval_rows, eval_source)
    base_params = sum(p.numel() for p in loaded.model.parameters())
    setup.warn_large_model_lr(base_params, args.learning_rate, lr_given=options.lr is not None)
    peft_model = wrap_model(loaded.model, options, total_steps(options, len(train_set), state.num_processes))
    if state.is_main_process:
        if options.overwrite and not resume_from:
            remove_run(options.output)  # only now: a run that could not start has left the old one in place
        tidy_run_folder(options.output, resume_from)
    state.wait_for_everyone()
    if state.is_main_process:
        peft_model.print_trainable_parameters()
    timer, stopper = StepTimer(), StopOnSignal()
    method_callbacks = [make() for make in method_entry(options.method).callbacks]
    run_files = WriteRunFiles(options, loaded.path, state.is_main_process)
    guards = [timer, stopper, StopOnNonFinite(args.learning_rate)]
    trainer = LeanLossTrainer(
        model=peft_model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set if args.eval_strategy != "no" else None,
        data_collator=data_mod.Collator(tokenizer.pad_token_id),
        callbacks=[run_files, *guards, *method_callbacks, *(callbacks or [])],
    )
    with PeakMemory() as memory, stopper.installed():
        if resume_from and options.max_steps and checkpoint_step(resume_from) >= options.max_steps:
            _restore_finished_steps(trainer, peft_model, resume_from)  # killed after its last step: finish it
        else:
            _run_trainer(trainer, resume_from, run_files)
        return _finish(options, trainer, peft_model, tokenizer, eval_set, timer, memory, stopper.signal_name)


def model_config(options: TrainOptions) -> Any:
    """The base model's config, read before its weights to choose their dtype (None: unreadable here; loading the
    model then reports why)."""
    from transformers import AutoConfig

    try:
        path = resolve_model(options.model, options.cache_dir)
        return AutoConfig.from_pretrained(path, trust_remote_code=options.trust_remote_code)
    except Exception:  # noqa: BLE001 - load_model gives the error that names the fix
        return None


def _restore_finished_steps(trainer: Trainer, peft_model: Any, checkpoint: str) -> None:
    """Take the weights and log of a checkpoint at --max-steps, so `_finish` writes the run's adapter and history
    (Trainer itself would train one step more)."""
    from transformers import TrainerState

    logger.info("%s is at --max-steps: finishing the run from it (final adapter, eval and history)", checkpoint)
    peft_model.load_adapter(checkpoint, adapter_name=peft_model.active_adapter, is_trainable=True)
    trainer.state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))


def _run_trainer(trainer: Trainer, resume_from: str | None, run_files: WriteRunFiles) -> None:
    """`trainer.train`, keeping a checkpoint on a hard Ctrl-C, naming a damaged --resume checkpoint or a full disk."""
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    except KeyboardInterrupt:
        save_interrupted(trainer)
        raise
    except (RuntimeError, OSError, pickle.UnpicklingError) as err:
        if is_disk_full(err, trainer.args.output_dir):
            step = trainer.state.global_step
            raise disk_full_error(trainer.args.output_dir, f"the checkpoint of step {step}") from None
        if resume_from and not run_files.started:  # torch.load of optimizer.pt, scheduler.pt, rng_state.pth
            raise ValueError(
                f"--resume: {resume_from} is damaged ({str(err).splitlines()[0]}); resume from an "
                "earlier checkpoint (--resume PATH) or train again with --overwrite"
            ) from None
        raise


def _finish(
    options: TrainOptions,
    trainer: Trainer,
    peft_model: Any,
    tokenizer: Any,
    eval_set: list | None,
    timer: StepTimer,
    memory: PeakMemory,
    stopped_by: str,
) -> TrainResult:
    """The adapter first (a kill during the final eval keeps it), then the final eval, then loss_history.json,
    which marks the run finished."""
    if trainer.args.should_save:
        _save_final(options.output, lambda: peft_model.save_pretrained(options.output), "the adapter")
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    eval_history = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    final_eval = None
    if eval_set is not None:
        final_eval = eval_loss(peft_model, eval_set, tokenizer.pad_token_id, options.batch_size)
    trainable, total = peft_model.get_nb_trainable_parameters()
    result = TrainResult(
        output=options.output,
        method=options.method,
        steps=trainer.state.global_step,
        train_loss=history[-1]["loss"] if history else None,
        eval_loss=final_eval,
        seconds_per_step=timer.seconds_per_step,
        peak_memory_mb=memory.peak_mb,
        trainable_params=trainable,
        all_params=total,
        interrupted=bool(stopped_by),
        stopped_by=stopped_by,
        history=history,
    )
    if trainer.args.should_save:
        summary = {k: v for k, v in result.__dict__.items() if k != "history"}
        if final_eval is not None:
            summary["eval_perplexity"] = perplexity(final_eval)
        if trainer.state.best_model_checkpoint:
            summary["best_checkpoint"] = os.path.basename(trainer.state.best_model_checkpoint)
        setup.save_loss_plot(options.output, history, eval_history)
        text = json.dumps({"train": history, "eval": eval_history, "summary": summary}, indent=2) + "\n"
        _save_final(
            options.output, lambda: atomic_write_text(os.path.join(options.output, HISTORY_FILE), text), HISTORY_FILE
        )
        logger.info("adapter saved in %s (steps %d, eval loss %s)", options.output, result.steps, final_eval)
    return result


def _save_final(output: str, save: Any, what: str) -> None:
    """Run a final save, turning a full disk into one line that says how to finish the run."""
    try:
        save()
    except (RuntimeError, OSError) as err:
        if is_disk_full(err, output):
            raise disk_full_error(output, what) from None
        raise
