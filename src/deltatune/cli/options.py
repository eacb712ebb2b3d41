"""Options of `deltatune train` (and `compare`): one dataclass, read from flags and/or `--config run.yaml`.

The YAML file holds the same keys as the flags (`max_steps` or `max-steps`); flags given on the command line
win over the file. The options actually used are written back as `run.yaml` in the output folder, so
`deltatune train --config OUT/run.yaml` repeats a run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from deltatune.cli.methods import METHOD_OPTIONS, OPTION_TYPES

RUN_FILE = "run.yaml"
INFORMATIONAL_KEYS = {"resolved_model"}  # written into run.yaml for the reader; not an option


@dataclass
class TrainOptions:
    """Everything `train` needs; method options are None unless given (see methods.METHOD_OPTIONS)."""

    model: str | None = None  # None: the bundled SmolLM2-135M-Instruct
    method: str = "lora"
    data: str | None = None  # None: the bundled sample set
    eval_data: str | None = None  # None: the bundled held-out split when --data is the bundled set
    split: str = "train"
    template: str = "auto"
    output: str = "deltatune-run"
    max_steps: int | None = None  # None: train for --epochs
    epochs: float = 1.0
    lr: float | None = None  # None: the method's default (methods.METHODS[...].lr)
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int | None = None  # None: the longest tokenised row, up to the model's context
    seed: int = 42
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    resume: bool | str = False  # True: the last checkpoint in --output; a path: that checkpoint
    overwrite: bool = False
    logging_steps: int = 5
    save_steps: int = 50
    cache_dir: str | None = None
    trust_remote_code: bool = False  # run Python code shipped in the model folder (auto_map); only code you trust
    # precision, device and Trainer options (see cli/trainer_setup.py)
    dtype: str = "auto"  # auto: the model's own dtype where the device runs it, else fp32
    device: str = "auto"  # auto: cuda, else mps, else cpu
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower steps
    lr_scheduler: str = "linear"  # a TrainingArguments lr_scheduler_type name
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    eval_steps: int | None = None  # None: eval loss only at the end of the run
    keep_best: bool = False  # the adapter saved at the end is the checkpoint with the lowest eval loss
    report_to: str = "none"  # tensorboard, wandb, mlflow or none
    trainer: dict[str, Any] = field(default_factory=dict)  # any other TrainingArguments field, passed through
    # data formats
    train_on: str = "all"  # loss on every assistant turn ("all") or only the conversation's last ("last")
    columns: str | None = None  # "instruction=question,output=answer": deltatune's field -> the file's column
    method_options: dict[str, Any] = field(default_factory=dict)

    def to_yaml_dict(self) -> dict[str, Any]:
        """The options as run.yaml keys (method options flattened; run-control flags left out)."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("method_options", "resume", "overwrite")}
        out.update({k: v for k, v in self.method_options.items() if v is not None})
        return out

    def check(self) -> None:
        """Refuse values no run can use (zero steps, NaN, a no-op adapter), before anything is written."""
        self._check_finite()
        at_least_one = {
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "logging_steps": self.logging_steps,
            "save_steps": self.save_steps,
            "max_steps": 1 if self.max_steps is None else self.max_steps,
            "eval_steps": 1 if self.eval_steps is None else self.eval_steps,
        }
        for key, value in at_least_one.items():
            if value < 1:
                raise ValueError(f"--{key.replace('_', '-')} {value}: must be at least 1")
        if self.max_steps is None and not self.epochs > 0:
            raise ValueError(f"--epochs {self.epochs:g}: must be above 0 (or give --max-steps)")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"--lr {self.lr:g}: the learning rate must be above 0")
        if self.method_options.get("alpha") == 0:
            raise ValueError(
                "--alpha 0: the update is scaled by alpha / r, so the adapter would change nothing; "
                f"give a positive --alpha (default {METHOD_OPTIONS['alpha'][0]})"
            )
        if self.train_on not in ("all", "last"):
            raise ValueError(f"--train-on {self.train_on!r}: use all (every assistant turn) or last (the final one)")
        if self.resume and self.overwrite:
            raise ValueError(
                "--resume and --overwrite exclude each other: --resume continues the run in --output, --overwrite "
                "replaces it; give one"
            )

    def _check_finite(self) -> None:
        """NaN and infinity pass every comparison test above and train an all-NaN adapter: refuse them by name."""
        numbers = {**{k: getattr(self, k) for k in FIELDS}, **self.method_options}
        for key, value in numbers.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"--{key.replace('_', '-')} {value}: must be a finite number")


FIELDS = {f.name for f in dataclasses.fields(TrainOptions)} - {"method_options"}


def parse_target_modules(value: Any) -> Any:
    """`q_proj,v_proj` -> a list; `all-linear` or a regex -> the string; a single name -> a one-item list."""
    if value is None or isinstance(value, list):
        return value
    text = str(value).strip()
    if "," in text:
        return [part.strip() for part in text.split(",") if part.strip()]
    if text == "all-linear":
        return text
    if re.search(r"[.*+?\[\]()|^$\\]", text):
        try:
            re.compile(text)
        except re.error as err:
            raise ValueError(
                f"--target-modules {text!r} is not a valid regular expression ({err}); fix it, or give module "
                "names separated by commas (q_proj,v_proj)"
            ) from None
        return text
    return [text]


def _kinds(key: str) -> tuple[type, ...]:
    """The types option `key` takes (NoneType where None means "the default"), from TrainOptions or METHOD_OPTIONS."""
    if key in METHOD_OPTIONS:
        default = METHOD_OPTIONS[key][0]
        return (OPTION_TYPES.get(key) or type(default), type(None))
    hint = typing.get_type_hints(TrainOptions)[key]
    return typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)


def _coerce(key: str, value: Any, source: str) -> Any:
    """`value` as the type option `key` takes (YAML reads `1e-3` as a string, `"4"` is a string); else an error."""
    kinds = _kinds(key)
    if value is None and type(None) in kinds or key == "target_modules":
        return value
    if isinstance(value, bool):
        if bool in kinds:
            return value
    elif isinstance(value, int) and int in kinds or isinstance(value, str) and str in kinds:
        return value
    elif isinstance(value, (int, float)) and float in kinds:
        return float(value)
    elif isinstance(value, (int, float)) and str in kinds:
        return str(value)  # `output: 2024` in YAML
    elif isinstance(value, str):
        for kind in (int, float):
            if kind in kinds:
                try:
                    return kind(value)
                except ValueError:
                    pass
        if bool in kinds and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
    names = " or ".join(
        {bool: "true/false", int: "an integer", float: "a number", str: "text"}[k] for k in kinds if k is not type(None)
    )
    raise ValueError(f"{source}: option {key!r} must be {names}, not {value!r}")


def _trainer_block(value: Any, source: str) -> dict[str, Any]:
    """The `trainer:` mapping of a run.yaml (its fields are checked against TrainingArguments when a run starts)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(
            f"{source}: option 'trainer' must be a mapping of TrainingArguments fields "
            f"(trainer: {{adam_beta2: 0.95}}), not {value!r}"
        )
    return dict(value)


def make_options(values: dict[str, Any], source: str = "options") -> TrainOptions:
    """Build TrainOptions from a flat dict of keys (dashes or underscores), refusing unknown keys."""
    options = TrainOptions()
    for raw_key, value in values.items():
        key = raw_key.replace("-", "_")
        if key in INFORMATIONAL_KEYS:
            continue
        if key == "trainer":
            options.trainer = _trainer_block(value, source)
        elif key in FIELDS:
            setattr(options, key, _coerce(key, value, source))
        elif key in METHOD_OPTIONS:
            options.method_options[key] = (
                parse_target_modules(value) if key == "target_modules" else _coerce(key, value, source)
            )
        else:
            known = sorted(FIELDS | set(METHOD_OPTIONS))
            raise ValueError(f"{source}: unknown option {raw_key!r}; known options: {', '.join(known)}")
    return options


def read_yaml(path: str) -> dict[str, Any]:
    """The keys of a run.yaml file, with clear errors for a missing or malformed file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path}: no such file")
    with open(path, encoding="utf-8") as handle:
        try:
            data = yaml.safe_load(handle)
        except yaml.YAMLError as err:
            raise ValueError(f"--config {path}: not valid YAML ({err})") from None
        except RecursionError:
            raise ValueError(
                f"--config {path}: nested too deeply to read; give a flat mapping of option: value"
            ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: the file must hold a mapping of option: value, not {type(data).__name__}")
    return data


def load_options(config_path: str | None, flags: dict[str, Any]) -> TrainOptions:
    """Options from `--config` (if any) overridden by the flags given on the command line."""
    values: dict[str, Any] = {}
    if config_path:
        values.update(read_yaml(config_path))
        make_options(values, source=config_path)  # unknown keys are reported against the file
    values.update(flags)
    return make_options(values, source="command line")
