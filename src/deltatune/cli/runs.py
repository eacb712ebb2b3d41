"""The output folder of a run: what it holds, refusing to clobber another run, checkpoints, Ctrl-C, memory.

A run folder holds the adapter (`adapter_config.json` + `adapter_model.safetensors`, peft's format), the
options used (`run.yaml`), the loss history (`loss_history.json`) and `checkpoint-N/` folders that
`--resume` continues from.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator

import torch
from transformers import TrainerCallback

from deltatune.cli.options import RUN_FILE

logger = logging.getLogger(__name__)

HISTORY_FILE = "loss_history.json"
RUN_MARKERS = (RUN_FILE, HISTORY_FILE, "adapter_config.json")
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(folder: str) -> list[str]:
    """checkpoint-N folders in `folder`, oldest first."""
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(folder) if (m := CHECKPOINT_RE.match(name))]
    return [os.path.join(folder, name) for _, name in sorted(found) if os.path.isdir(os.path.join(folder, name))]


def is_run_folder(folder: str) -> bool:
    """Whether `folder` holds a deltatune run (or its checkpoints)."""
    return os.path.isdir(folder) and (
        any(os.path.exists(os.path.join(folder, m)) for m in RUN_MARKERS) or bool(checkpoints(folder))
    )


def prepare_output(folder: str, overwrite: bool, resume: bool | str) -> str | None:
    """Check the output folder before a run; returns the checkpoint to resume from (or None).

    With --overwrite an earlier run is only checked here: `remove_run` deletes it once the new run has its model
    and data, so a new run that cannot start leaves the old one in place.

    Raises:
        FileExistsError: the folder holds another run (and neither --overwrite nor --resume was given), or
            holds files that are not a run.
        FileNotFoundError: --resume with nothing to resume from.
    """
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise FileExistsError(f"--output {folder} is a file; give a folder (new or empty) for the run")
    if resume:
        return _resume_checkpoint(folder, resume)
    if not os.path.isdir(folder) or not os.listdir(folder):
        return None
    if not is_run_folder(folder):
        raise FileExistsError(
            f"--output {folder} holds files that are not a deltatune run; pick an empty or new folder"
        )
    if not overwrite:
        held = sorted(n for n in os.listdir(folder) if n in RUN_MARKERS or CHECKPOINT_RE.match(n))
        raise FileExistsError(
            f"--output {folder} already holds another run ({', '.join(held)}); pass --overwrite to replace it, "
            "--resume to continue it, or choose another --output"
        )
    return None


def remove_run(folder: str) -> None:
    """--overwrite: delete the earlier run in `folder` (checked by `prepare_output`) just before training starts."""
    if is_run_folder(folder):
        logger.warning("--overwrite: removing the run in %s", folder)
        shutil.rmtree(folder)


CHECKPOINT_FILES = ("adapter_config.json", "adapter_model.safetensors", "trainer_state.json")


def _missing_files(checkpoint: str) -> list[str]:
    return [name for name in CHECKPOINT_FILES if not os.path.isfile(os.path.join(checkpoint, name))]


def _resume_checkpoint(folder: str, resume: bool | str) -> str:
    if isinstance(resume, str):
        if not os.path.isdir(resume):
            raise FileNotFoundError(f"--resume {resume}: no such checkpoint folder")
        if missing := _missing_files(resume):
            raise FileNotFoundError(
                f"--resume {resume}: not a checkpoint of deltatune train (no {', '.join(missing)}); pass a "
                "checkpoint-N folder of a run, or --resume alone to continue from the last checkpoint in --output"
            )
        return resume
    found = checkpoints(folder)
    if not found:
        raise FileNotFoundError(
            f"--resume: {folder} holds no checkpoint-N folder to continue from; train without --resume"
        )
    complete = [c for c in found if not _missing_files(c)]
    if not complete:
        raise FileNotFoundError(
            f"--resume: no checkpoint in {folder} is complete "
            f"({found[-1]} has no {', '.join(_missing_files(found[-1]))}); "
            "train again without --resume (with --overwrite)"
        )
    if complete[-1] != found[-1]:  # a save cut short (killed, disk full) leaves a partial folder
        logger.warning(
            "--resume: %s is incomplete (no %s); continuing from %s",
            found[-1],
            ", ".join(_missing_files(found[-1])),
            complete[-1],
        )
    return complete[-1]


def checkpoint_step(checkpoint: str) -> int:
    """The optimizer step a checkpoint was saved at (from its trainer_state.json)."""
    with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as handle:
        return int(json.load(handle).get("global_step", 0))


class StopOnInterrupt(TrainerCallback):
    """Ctrl-C during training: finish the current step, save a checkpoint, stop (a second Ctrl-C quits at once)."""

    def __init__(self) -> None:
        self.requested = False

    def on_step_end(self, args, state, control, **kwargs):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # under torchrun every rank must stop at the same step, or the others wait forever in all-reduce
            flag = torch.tensor([int(self.requested)], device=args.device)  # NCCL wants it on the GPU
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            self.requested = bool(flag.item())
        if self.requested:
            control.should_save = True
            control.should_training_stop = True
        return control

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Route SIGINT to this callback while training (main thread only; elsewhere nothing changes)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            logger.warning("Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to quit now)")

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


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
