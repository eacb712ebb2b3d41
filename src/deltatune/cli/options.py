"""Options of `deltatune train` (and `compare`): one dataclass, read from flags and/or `--config run.yaml`.

The YAML file holds the same keys as the flags (`max_steps` or `max-steps`); flags given on the command line
win over the file. The options actually used are written back as `run.yaml` in the output folder, so
`deltatune train --config OUT/run.yaml` repeats a run.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from deltatune.cli.methods import METHOD_OPTIONS

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
    max_length: int = 256
    seed: int = 42
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    resume: bool | str = False  # True: the last checkpoint in --output; a path: that checkpoint
    overwrite: bool = False
    logging_steps: int = 5
    save_steps: int = 50
    cache_dir: str | None = None
    method_options: dict[str, Any] = field(default_factory=dict)

    def to_yaml_dict(self) -> dict[str, Any]:
        """The options as run.yaml keys (method options flattened; run-control flags left out)."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("method_options", "resume", "overwrite")}
        out.update({k: v for k, v in self.method_options.items() if v is not None})
        return out


FIELDS = {f.name for f in dataclasses.fields(TrainOptions)} - {"method_options"}


def parse_target_modules(value: Any) -> Any:
    """`q_proj,v_proj` -> a list; `all-linear` or a regex -> the string; a single name -> a one-item list."""
    if value is None or isinstance(value, list):
        return value
    text = str(value).strip()
    if "," in text:
        return [part.strip() for part in text.split(",") if part.strip()]
    if text == "all-linear" or re.search(r"[.*+?\[\]()|^$\\]", text):
        return text
    return [text]


def make_options(values: dict[str, Any], source: str = "options") -> TrainOptions:
    """Build TrainOptions from a flat dict of keys (dashes or underscores), refusing unknown keys."""
    options = TrainOptions()
    for raw_key, value in values.items():
        key = raw_key.replace("-", "_")
        if key in INFORMATIONAL_KEYS:
            continue
        if key in FIELDS:
            setattr(options, key, value)
        elif key in METHOD_OPTIONS:
            options.method_options[key] = parse_target_modules(value) if key == "target_modules" else value
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
