"""The one place adapter files are read and written: `adapter_config.json` + `adapter_model.safetensors`.

Weights are read with safetensors only (never unpickled). Writes go to a temporary file in the same folder and
are renamed over the target, so a failed save leaves the previous adapter intact.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_WEIGHTS_NAME = "adapter_model.bin"


def current_umask() -> int:
    """The process umask (read from /proc where it can be, since setting it to read it is not thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_default_mode(path: str) -> None:
    """`tempfile` makes files 0600 and folders 0700; give `path` the mode a plain open() or mkdir would have."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~current_umask())


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` then rename tmp over `path`; on any failure remove tmp and keep the old file."""
    _atomic_write_all({path: write})


def _atomic_write_all(writes: dict[str, Callable[[str], None]]) -> None:
    """Write every file to a temporary file next to it, then rename them all over their targets.

    Nothing is renamed until every file is written, so a failure (disk full, Ctrl-C) leaves the old files as a
    set: never new weights beside an old config.
    """
    staged: dict[str, str] = {}
    try:
        for path, write in writes.items():
            folder = os.path.dirname(os.path.abspath(path))
            os.makedirs(folder, exist_ok=True)
            fd, staged[path] = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
            os.close(fd)
            write(staged[path])
            give_default_mode(staged[path])  # after the write: a writer may replace the file it was given
        for path, tmp_path in staged.items():
            os.replace(tmp_path, path)
    except BaseException:
        for tmp_path in staged.values():
            if os.path.exists(tmp_path):
                os.remove(tmp_path)
        raise


def _text_writer(text: str) -> Callable[[str], None]:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)

    return write


def atomic_write_text(path: str, text: str) -> None:
    """Write a text file atomically."""
    _atomic_write(path, _text_writer(text))


def save_adapter_files(folder: str, state_dict: dict[str, torch.Tensor], config_text: str) -> None:
    """Write `adapter_model.safetensors` and `adapter_config.json` as a pair (see `_atomic_write_all`); tensors
    are made contiguous and unshared first (safetensors refuses views of one storage)."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    if bad := non_finite_counts(tensors):
        logger.warning(
            "saving %d adapter tensors with NaN or infinite values in %s (e.g. %s); loading them will be refused",
            len(bad),
            folder,
            next(iter(bad)),
        )
    _atomic_write_all(
        {
            os.path.join(folder, WEIGHTS_NAME): lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}),
            os.path.join(folder, CONFIG_NAME): _text_writer(config_text),
        }
    )


def check_save_arguments(
    adapter_names: list[str],
    save_directory: str | os.PathLike,
    selected_adapters: list[str] | None,
    safe_serialization: bool,
) -> None:
    """Refuse a `save_pretrained` call before anything is written: a file as folder, unknown adapters, a pickle."""
    if os.path.isfile(save_directory):
        raise ValueError(f"save_directory={save_directory} is a file; give a folder")
    unknown = [name for name in selected_adapters or () if name not in adapter_names]
    if unknown:
        raise ValueError(
            f"selected_adapters={unknown!r} names no adapter of this model; it has: {', '.join(adapter_names)}"
        )
    if not safe_serialization:  # peft would write a pickled adapter_model.bin
        raise ValueError(
            f"save_pretrained(safe_serialization=False) asks for a pickled {PICKLED_WEIGHTS_NAME}, but deltatune "
            f"writes safetensors only (unpickling a file can run arbitrary code); drop the argument to write "
            f"{WEIGHTS_NAME}, which peft loads as well"
        )


def adapter_folder(model_id: str | os.PathLike, subfolder: str | None) -> str:
    """The folder holding the adapter files: `model_id`, or its sub-folder `subfolder` (peft's keyword)."""
    return os.path.join(str(model_id), subfolder) if subfolder else str(model_id)


def load_weights(folder: str) -> dict[str, torch.Tensor]:
    """Read `adapter_model.safetensors` from `folder` with a clear error if it is missing, pickled or damaged."""
    path = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(folder, PICKLED_WEIGHTS_NAME)):
            raise ValueError(
                f"{os.path.join(folder, PICKLED_WEIGHTS_NAME)} is a pickled PyTorch file, which deltatune refuses to "
                "load because unpickling can run arbitrary code. If you trust it, convert it once with: "
                'python -c "import torch, safetensors.torch as s; '
                f"s.save_file(torch.load('{PICKLED_WEIGHTS_NAME}', weights_only=True), '{WEIGHTS_NAME}')\" "
                "run inside that folder"
            )
        raise FileNotFoundError(
            f"{path} not found: the adapter folder must hold {WEIGHTS_NAME} next to adapter_config.json "
            "(save it with model.save_pretrained(folder))"
        )
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"{path} could not be read ({err}); the file is truncated or damaged, save the adapter again"
        ) from None


def non_finite_counts(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """key -> how many NaN or infinite values the tensor holds (floating tensors with any)."""
    counts = {k: int((~torch.isfinite(v)).sum()) for k, v in tensors.items() if v.dtype.is_floating_point}
    return {k: n for k, n in counts.items() if n}


def refuse_non_finite(weights: dict[str, torch.Tensor], source: str) -> None:
    """An adapter with NaN or infinite values turns every output into NaN: refuse it (peft would load it)."""
    if bad := non_finite_counts(weights):
        key = next(iter(bad))
        raise ValueError(
            f"{source}: {len(bad)} of {len(weights)} adapter tensors hold NaN or infinite values ({key}: "
            f"{bad[key]} of {weights[key].numel()}); the run that made it diverged: train again with a lower "
            "learning rate"
        )


def _target_of(key: str, targets: dict[str, torch.Tensor], everything: dict[str, torch.Tensor]):
    """The model tensor a file key goes into: an adapter tensor, else any model tensor (trained biases)."""
    # peft's bias="all" writes a trainable copy's bias once more as `<module>.modules_to_save.bias`
    return targets.get(key, everything.get(key, targets.get(key.replace(".modules_to_save.", "."))))


class SizeMismatchError(ValueError, RuntimeError):
    """A file tensor whose shape differs from the model's. A ValueError as deltatune's other file errors, and a
    RuntimeError as torch's `load_state_dict` raises it in peft."""


@dataclass
class Placement:
    """Where the tensors of an adapter file go (see `match_tensors`).

    Attributes:
        pairs: (model tensor, file tensor) to copy.
        unexpected: file keys with no place in the model.
        mismatched: (file key, file shape, model shape) of tensors skipped for `ignore_mismatched_sizes`.
        missing: adapter keys the file has no value for.
    """

    pairs: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def _check_dtype_kind(key: str, value: torch.Tensor, target: torch.Tensor, source: str) -> None:
    if value.dtype.is_floating_point != target.dtype.is_floating_point:
        raise ValueError(
            f"{source}: {key} is {value.dtype} in the adapter file but {target.dtype} in this model; the file was "
            "not written by a PEFT library (save the adapter again with save_pretrained)"
        )


def match_tensors(
    weights: dict[str, torch.Tensor],
    targets: dict[str, torch.Tensor],
    everything: dict[str, torch.Tensor],
    source: str,
    ignore_mismatched_sizes: bool = False,
) -> Placement:
    """Pair each tensor of an adapter file with the model tensor it goes into, checking dtypes and shapes.

    Args:
        weights: the file's tensors under peft's keys.
        targets: the adapter's own tensors under the same keys.
        everything: the whole model state dict (keep_vars), for base tensors an adapter trains (biases).
        source: the folder, named in errors.
        ignore_mismatched_sizes: skip (and list) tensors whose shape differs instead of raising (peft's option).
    """
    refuse_non_finite(weights, source)
    placement = Placement()
    for key, value in weights.items():
        if ".original_module." in key:  # peft also writes the frozen original of a modules_to_save copy
            continue
        target = _target_of(key, targets, everything)
        if target is None:
            placement.unexpected.append(key)
            continue
        _check_dtype_kind(key, value, target, source)
        if target.shape == value.shape:
            placement.pairs.append((target, value))
        elif ignore_mismatched_sizes:
            placement.mismatched.append((key, tuple(value.shape), tuple(target.shape)))
        else:
            raise SizeMismatchError(
                f"{source}: {key} has shape {tuple(value.shape)} in the adapter file but {tuple(target.shape)} in "
                "this model (size mismatch); the adapter was trained on a different base model (load it onto the "
                "model it was made for, or pass ignore_mismatched_sizes=True to skip such tensors)"
            )
    placement.missing = sorted(set(targets) - set(weights))
    if placement.mismatched:  # as peft: said, not raised
        warnings.warn(
            f"{source}: skipped {len(placement.mismatched)} tensors whose shape differs from this model's because "
            f"ignore_mismatched_sizes=True (key, file shape, model shape): {placement.mismatched[:3]}",
            stacklevel=4,
        )
    return placement


def place_tensors(
    weights: dict[str, torch.Tensor],
    targets: dict[str, torch.Tensor],
    everything: dict[str, torch.Tensor],
    source: str,
    ignore_mismatched_sizes: bool = False,
) -> Placement:
    """`match_tensors`, strict as loading a file should be: a file tensor with no place in the model is an error
    (the adapter was made for another model); missing values are logged."""
    placement = match_tensors(weights, targets, everything, source, ignore_mismatched_sizes)
    if placement.unexpected:
        raise ValueError(
            f"{source}: {len(placement.unexpected)} tensors in the adapter file have no place in this model, e.g. "
            f"{placement.unexpected[:3]}; the adapter was made for another architecture or another config"
        )
    if placement.missing:
        logger.warning(
            "%s: no values for %d adapter tensors (kept at init), e.g. %s",
            source,
            len(placement.missing),
            placement.missing[:3],
        )
    return placement
