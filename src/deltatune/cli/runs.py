"""The output folder of a run: what it holds, refusing to clobber another run, checkpoints, step time, memory.

A run folder holds the adapter (`adapter_config.json` + `adapter_model.safetensors`, peft's format), the
options used (`run.yaml`), the loss history (`loss_history.json`) and `checkpoint-N/` folders that
`--resume` continues from.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time

import torch
from transformers import TrainerCallback

from deltatune.cli.options import RUN_FILE
from deltatune.cli.run_lock import LOCK_FILE

logger = logging.getLogger(__name__)

HISTORY_FILE = "loss_history.json"  # written last: a run folder without it has not finished
RUN_MARKERS = (RUN_FILE, HISTORY_FILE, "adapter_config.json")
# what --overwrite removes
RUN_FILES = (*RUN_MARKERS, "adapter_model.safetensors", "eval.json", "README.md", "loss.png")
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TEMP_PREFIX = ".tmp-"  # files.py stages every write under this prefix


def checkpoints(folder: str) -> list[str]:
    """checkpoint-N folders in `folder`, oldest first (a deltatune run named checkpoint-N is not one)."""
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(folder) if (m := CHECKPOINT_RE.match(name))]
    paths = [os.path.join(folder, name) for _, name in sorted(found)]
    return [path for path in paths if os.path.isdir(path) and not os.path.exists(os.path.join(path, RUN_FILE))]


def _entries(folder: str) -> list[str]:
    """What `folder` holds, leaving out the run lock (a lock alone is an empty run folder)."""
    return [name for name in os.listdir(folder) if name != LOCK_FILE]


def is_run_folder(folder: str) -> bool:
    """Whether `folder` holds a deltatune run (or its checkpoints)."""
    return os.path.isdir(folder) and (
        any(os.path.exists(os.path.join(folder, m)) for m in RUN_MARKERS) or bool(checkpoints(folder))
    )


def _holds_run_output(folder: str) -> bool:
    """Whether a run has written into `folder` (a run.yaml alone may be a config file the user keeps there)."""
    written = (HISTORY_FILE, "adapter_config.json", LOCK_FILE)
    return any(os.path.exists(os.path.join(folder, name)) for name in written) or bool(checkpoints(folder))


def _refuse_nested(folder: str) -> None:
    """A run inside another run's folder is deleted by its checkpoint clean-up or --overwrite: refuse it."""
    parent = os.path.dirname(os.path.abspath(folder))
    while parent != os.path.dirname(parent):
        if _holds_run_output(parent):
            raise FileExistsError(
                f"--output {folder} lies inside the run folder {parent}, whose checkpoint clean-up and --overwrite "
                "would delete it; choose an --output outside any run folder"
            )
        parent = os.path.dirname(parent)


def prepare_output(folder: str, overwrite: bool, resume: bool | str) -> str | None:
    """Check the output folder before a run (with its lock held); returns the checkpoint to resume from, or None.

    With --overwrite an earlier run is only checked here: `remove_run` deletes it once the new run has its model
    and data, so a new run that cannot start leaves the old one in place.

    Raises:
        FileExistsError: the folder holds another run (and neither --overwrite nor --resume was given), holds
            files that are not a run, or lies inside another run.
        FileNotFoundError: --resume with nothing to resume from.
    """
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise FileExistsError(f"--output {folder} is a file; give a folder (new or empty) for the run")
    _refuse_nested(folder)
    if resume:
        return _resume_checkpoint(folder, resume)
    if not os.path.isdir(folder) or not _entries(folder):
        return None
    if not is_run_folder(folder):
        raise FileExistsError(
            f"--output {folder} holds files that are not a deltatune run; pick an empty or new folder"
        )
    if not overwrite:
        held = sorted(n for n in _entries(folder) if n in RUN_MARKERS or CHECKPOINT_RE.match(n))
        raise FileExistsError(
            f"--output {folder} already holds another run ({', '.join(held)}); pass --overwrite to replace it, "
            "--resume to continue it, or choose another --output"
        )
    return None


def remove_run(folder: str) -> None:
    """--overwrite: delete the earlier run in `folder` (checked by `prepare_output`) just before training starts.

    Only what a run writes goes (its files, checkpoints, staged writes); anything else in the folder stays."""
    if not is_run_folder(folder):
        return
    ours = [os.path.join(folder, n) for n in _entries(folder) if n in RUN_FILES or n.startswith(TEMP_PREFIX)]
    ours += checkpoints(folder)
    logger.warning("--overwrite: removing the run in %s (%d files and folders)", folder, len(ours))
    for path in ours:
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    if kept := sorted(set(_entries(folder)) - {os.path.basename(p) for p in ours}):
        logger.warning("--overwrite: kept what the run did not write: %s", ", ".join(kept))


def tidy_run_folder(folder: str, resume_from: str | None) -> None:
    """Delete what saves cut short left behind (`.tmp-*` files, checkpoints newer than the one resumed from that
    are incomplete); the main process calls it with the run lock held, once every process has checked the folder."""
    for place in (folder, *checkpoints(folder)):
        for name in os.listdir(place) if os.path.isdir(place) else ():
            if name.startswith(TEMP_PREFIX) and os.path.isfile(os.path.join(place, name)):
                os.remove(os.path.join(place, name))
                logger.info("removed %s, left by a save that was cut short", os.path.join(place, name))
    resumed = CHECKPOINT_RE.match(os.path.basename(os.path.normpath(resume_from or "")))
    for partial in checkpoints(folder) if resumed else ():
        if int(CHECKPOINT_RE.match(os.path.basename(partial)).group(1)) > int(resumed.group(1)):
            if checkpoint_problems(partial):
                logger.warning("removing the incomplete %s", partial)
                shutil.rmtree(partial)


CHECKPOINT_FILES = ("adapter_config.json", "adapter_model.safetensors", "trainer_state.json")


def checkpoint_problems(checkpoint: str) -> list[str]:
    """Why `checkpoint` cannot be resumed from (files missing, a trainer_state.json cut short); [] when complete."""
    problems = [f"no {name}" for name in CHECKPOINT_FILES if not os.path.isfile(os.path.join(checkpoint, name))]
    if not problems:
        try:
            checkpoint_step(checkpoint)
        except (ValueError, AttributeError, TypeError):  # json's errors are ValueErrors; a list has no .get
            problems.append("trainer_state.json is damaged")
    return problems


def complete_checkpoints(folder: str) -> list[str]:
    """The checkpoints `--resume` can continue from, oldest first."""
    return [c for c in checkpoints(folder) if not checkpoint_problems(c)]


def _resume_checkpoint(folder: str, resume: bool | str) -> str:
    if isinstance(resume, str):
        if not os.path.isdir(resume):
            raise FileNotFoundError(f"--resume {resume}: no such checkpoint folder")
        if problems := checkpoint_problems(resume):
            raise FileNotFoundError(
                f"--resume {resume}: not a complete checkpoint of deltatune train ({', '.join(problems)}); pass "
                "another checkpoint-N folder of the run, or --resume alone to continue from its last complete one"
            )
        return resume
    found = checkpoints(folder)
    if not found:
        raise FileNotFoundError(
            f"--resume: {folder} holds no checkpoint-N folder to continue from; train without --resume"
        )
    complete = complete_checkpoints(folder)
    if not complete:
        raise FileNotFoundError(
            f"--resume: no checkpoint in {folder} is complete "
            f"({found[-1]}: {', '.join(checkpoint_problems(found[-1]))}); train again with --overwrite"
        )
    for partial in found[found.index(complete[-1]) + 1 :]:  # a save cut short (killed, disk full, Ctrl-C twice)
        logger.warning(
            "--resume: %s is incomplete (%s); continuing from %s",
            partial,
            ", ".join(checkpoint_problems(partial)),
            complete[-1],
        )
    return complete[-1]


def checkpoint_step(checkpoint: str) -> int:
    """The optimizer step a checkpoint was saved at (from its trainer_state.json)."""
    with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as handle:
        return int(json.load(handle).get("global_step", 0))


class StepTimer(TrainerCallback):
    """Seconds per optimizer step (the first step, which warms caches up, is left out when there are more)."""

    def __init__(self) -> None:
        self.durations: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.durations.append(time.perf_counter() - self._start)

    @property
    def seconds_per_step(self) -> float | None:
        steps = self.durations[1:] if len(self.durations) > 1 else self.durations
        return sum(steps) / len(steps) if steps else None


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory while a block runs: CUDA max allocated, else the process's resident set sampled every 10 ms."""

    def __init__(self) -> None:
        self.peak_bytes = 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakMemory":
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        elif os.path.exists("/proc/self/statm"):
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, _rss_bytes())
            self._stop.wait(0.01)

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            self.peak_bytes = torch.cuda.max_memory_allocated()
        elif hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20
