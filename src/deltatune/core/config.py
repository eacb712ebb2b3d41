"""Configs shared by every method: task and method enums, the base `PeftConfig`, and its JSON file.

A method's config is a dataclass subclassing `PeftConfig`; its fields are written to `adapter_config.json`
with peft's field names, so HF peft can read our files and we can read theirs.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.metadata
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import packaging.version

from deltatune.core.files import CONFIG_NAME, atomic_write_text  # CONFIG_NAME is still importable from here
from deltatune.core.registry import config_class_for

# Keys peft writes that describe the file rather than the method; dropped without a warning.
INFORMATIONAL_KEYS = {"qalora_group_size"}

# The peft release whose adapter format deltatune writes (tests/test_files.py checks both directions against it).
# Each config records it as `peft_version`, the field peft's readers consult to pick format conversions, so it must
# name a peft format, not deltatune's own release. Read at construction time: peft's tests monkeypatch it.
__version__ = "0.21.2"


def _get_commit_hash(pkg_name: str) -> str | None:
    """The VCS commit `pkg_name` was installed from (pip's direct_url.json), or None (as peft's helper)."""
    try:
        dist = importlib.metadata.distribution(pkg_name)
    except importlib.metadata.PackageNotFoundError:
        return None
    for path in dist.files or []:
        if path.name == "direct_url.json":
            vcs_info = json.loads(dist.locate_file(path).read_text()).get("vcs_info") or {}
            if "commit_id" in vcs_info:
                return vcs_info["commit_id"]
    return None


def current_peft_version() -> str:
    """`__version__`, with `@<commit>` after a dev version (ambiguous alone), as peft records it."""
    version = __version__
    if packaging.version.Version(version).dev is None:
        return version
    try:
        commit = _get_commit_hash("deltatune") or "UNKNOWN"
    except Exception as err:  # a version string must never break building a config
        warnings.warn(
            "A dev version of PEFT is used but there was an error while trying to determine the commit hash of the "
            f"deltatune install ({err}); recording {version}@UNKNOWN",
            stacklevel=3,
        )
        commit = "UNKNOWN"
    return f"{version}@{commit}"


class TaskType(str, enum.Enum):
    """What the wrapped model is for; picks the `PeftModel` subclass and how prompts are handled."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


class PeftType(str, enum.Enum):
    """The method; written as `peft_type` in the adapter file. BITFIT and BOTTLENECK are deltatune's own."""

    LORA = "LORA"
    ADALORA = "ADALORA"
    PROMPT_TUNING = "PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    BITFIT = "BITFIT"
    BOTTLENECK = "BOTTLENECK"
    IA3 = "IA3"


def enum_value(enum_class: type[enum.Enum], value: Any, field_name: str) -> Any:
    """Turn a string into the enum member, with an error that lists the allowed values."""
    if value is None or isinstance(value, enum_class):
        return value
    try:
        return enum_class(str(value).upper() if enum_class is not TaskType else str(value))
    except ValueError:
        allowed = ", ".join(m.value for m in enum_class)
        if enum_class is TaskType:  # peft's words, which code written against peft matches
            raise ValueError(
                f"Invalid task type: '{value}'. Must be one of the following task types: {allowed}."
            ) from None
        raise ValueError(f"{field_name}={value!r} is not known; use one of: {allowed}") from None


class PeftError(Exception):
    """The base class of deltatune's own errors (peft's name)."""


class NoMatchingPeftModuleError(PeftError, ValueError):
    """A config's `target_modules` (after `exclude_modules`) selects no module of the model (peft's name)."""


class PeftWarning(UserWarning):
    """A warning about an adapter's set-up or use (peft's class of the same name, so filters work on both)."""


@dataclass
class PeftConfig:
    """Fields every method has.

    Attributes:
        task_type: what the model does (CAUSAL_LM, SEQ_CLS, ...); None wraps the model as it is.
        inference_mode: True freezes everything, as after `PeftModel.from_pretrained(..., is_trainable=False)`.
        base_model_name_or_path: where the base model came from, so `AutoPeftModel*` can load it again.
    """

    peft_type: PeftType | str | None = None
    auto_mapping: dict | None = None  # peft's field (custom model classes); kept so peft's printed configs type back in
    task_type: TaskType | str | None = None
    inference_mode: bool = False
    base_model_name_or_path: str | None = None
    revision: str | None = None
    peft_version: str | None = None  # the adapter format's peft release; None fills in `__version__` (as peft)

    def __post_init__(self) -> None:
        self.task_type = enum_value(TaskType, self.task_type, "task_type")
        self.peft_type = enum_value(PeftType, self.peft_type, "peft_type")
        if self.peft_version is None:
            self.peft_version = current_peft_version()

    # True for methods that add virtual tokens instead of changing layers (peft's attribute); the prompt
    # methods' config base sets it.
    is_prompt_learning: ClassVar[bool] = False

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict with peft's field names (enums as strings, sets as sorted lists)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, set):
                value = sorted(value)
            out[f.name] = value
        return out

    def to_json_string(self) -> str:
        """The text of `adapter_config.json`."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    def saved_json_string(self) -> str:
        """The text `PeftModel.save_pretrained` writes: this config with inference_mode=True (as peft does).

        The config itself is left unchanged."""
        inference_mode, self.inference_mode = self.inference_mode, True
        try:
            return self.to_json_string()
        finally:
            self.inference_mode = inference_mode

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write `adapter_config.json` atomically into `save_directory`."""
        os.makedirs(save_directory, exist_ok=True)
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), self.to_json_string())

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "PeftConfig":
        """Build the config of the method named by `peft_type`; unknown keys are dropped with a warning."""
        if "peft_type" not in data:  # peft's words and error type, which its tests match
            raise TypeError(
                f"The {cls.__name__} config that is trying to be loaded is missing required keys: {{'peft_type'}}. "
                f"({source} holds no adapter config; save_pretrained writes one with peft_type)"
            )
        config_class = cls
        if cls is PeftConfig:
            config_class = config_class_for(data.get("peft_type"), source)
        known = {f.name for f in dataclasses.fields(config_class) if f.init}
        # peft writes many fields for features we lack; only ones set to a non-default value matter.
        unknown = sorted(
            k for k in set(data) - known if k not in INFORMATIONAL_KEYS and data[k] not in (None, False, {}, [])
        )
        if unknown:
            warnings.warn(  # peft's words first, so filters and code written against peft see the same warning
                f"Unexpected keyword arguments {unknown} for class {config_class.__name__}, these are ignored. "
                f"({source}: keys deltatune does not know)",
                stacklevel=3,
            )
        try:
            return config_class(**{k: v for k, v in data.items() if k in known})
        except TypeError as err:  # a field of the wrong type (r: "8") fails inside the config's own checks
            raise ValueError(
                f"{source}: a field has a value of the wrong type ({err}); save the adapter again"
            ) from None

    @classmethod
    def from_json_file(cls, path_json_file: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
        """peft's reader: the dict stored in a config JSON file (a stray `runtime_config` key is dropped, as peft)."""
        data = _read_json_object(str(path_json_file))
        if data.pop("runtime_config", None) is not None:
            warnings.warn(
                f"{path_json_file}: ignoring its runtime_config key (runtime settings are not saved)", stacklevel=2
            )
        return data

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> "PeftConfig":
        """Read `adapter_config.json` from a folder (or the file itself)."""
        config_file = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else str(path)
        if not os.path.isfile(config_file):
            raise FileNotFoundError(
                f"{config_file} not found: an adapter folder holds adapter_config.json and "
                "adapter_model.safetensors, as written by save_pretrained()"
            )
        data = cls.from_json_file(config_file)
        data.update(overrides)
        return cls.from_dict(data, source=config_file)


def _read_json_object(path: str) -> dict[str, Any]:
    """The JSON object in file `path`, with an error naming the file if it is not valid JSON or not an object."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); save the adapter again") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{path} must hold a JSON object of config fields, not {type(data).__name__}; save the adapter again"
        )
    return data


def get_peft_config(config_dict: dict[str, Any]) -> PeftConfig:
    """peft's `get_peft_config`: the config of the method named by `config_dict["peft_type"]`.

    Args:
        config_dict: the config's fields by name, e.g. ``{"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8}``
            or a dict peft wrote (fields of peft's that deltatune lacks are dropped with a warning, as when
            reading `adapter_config.json`).
    """
    if "peft_type" not in config_dict:
        raise KeyError(
            f"get_peft_config: the dict has no 'peft_type' (keys: {', '.join(sorted(config_dict))}); add one, "
            "e.g. 'peft_type': 'LORA', or build the config directly (LoraConfig(...))"
        )
    return PeftConfig.from_dict(dict(config_dict), source="get_peft_config")


@dataclass
class PeftConfigWithTargets(PeftConfig):
    """Base for methods that change chosen modules (LoRA, AdaLoRA, bottleneck adapters).

    Attributes:
        target_modules: names (exact or dotted suffix, e.g. ``["q_proj", "v_proj"]``, kept as a set as in peft),
            one regex string matched against the full module name (``".*\\.1.*query_key_value"``), or
            ``"all-linear"``. None uses the architecture's defaults.
        modules_to_save: modules trained in full next to the adapter (a classifier head, the embeddings);
            each gets a trainable copy that is saved with the adapter.
        layers_to_transform: only these layer indices (a list, or one int, kept as given like peft) get the adapter.
        layers_pattern: the name of the layer list (``"layers"``, ``"h"``) used to read the layer index.
        exclude_modules: modules to leave out of what `target_modules` selects: names (exact or dotted
            suffix) or one regex string matched against the full module name (peft's option).
    """

    target_modules: set[str] | list[str] | str | None = None
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    exclude_modules: set[str] | list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        # A list of names is a set (as peft keeps it); files store it as a sorted list.
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(
                f"layers_pattern={self.layers_pattern!r} only tells where the layer index is; give "
                "layers_to_transform=[...] too (the indices to adapt), or drop layers_pattern"
            )
        if (self.layers_to_transform is not None or self.layers_pattern) and isinstance(self.target_modules, str):
            raise ValueError(
                "layers_to_transform cannot be used with a string target_modules (a regex or 'all-linear'); "
                "list the module names instead, or put the layer index in the regex"
            )


def check_range(name: str, value: float, low: float, high: float | None, fix: str) -> None:
    """Raise a ValueError naming the field when `value` is outside [low, high)."""
    if value < low or (high is not None and value >= high):
        bounds = f"[{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"{name}={value} is outside {bounds}; {fix}")


def default_field(value: Any) -> Any:
    """A dataclass field whose default is a fresh copy of a mutable value."""
    return field(default_factory=lambda: type(value)(value))
