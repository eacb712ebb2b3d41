"""What keeps a training run safe while it trains: signals, a diverging loss, a full disk.

- Ctrl-C (SIGINT) or SIGTERM (what `timeout`, systemd, Slurm and Docker send) finishes the current step, saves a
  checkpoint and stops; a second one stops at once, after saving the last finished step; a third gives up that
  save too. The log always names the newest complete checkpoint, the one `--resume` continues from.
- A step that makes the trained weights (or the logged loss) NaN or infinite stops the run before it is saved.
- A full disk during a checkpoint or the final save becomes one line naming the path and how to resume.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import shutil
import signal
import threading
from collections.abc import Iterator

import torch
from transformers import Trainer, TrainerCallback

from deltatune.cli.runs import checkpoint_problems, complete_checkpoints

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


class StopOnSignal(TrainerCallback):
    """Ctrl-C or SIGTERM during training: finish the current step, save a checkpoint, stop; a second quits now."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""

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

    def _handle(self, signum, frame) -> None:
        name = SIGNAL_NAMES.get(signum, f"signal {signum}")
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signal_name = True, name
        logger.warning("%s: stopping after this step and saving a checkpoint (%s again to quit now)", name, name)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Route SIGINT and SIGTERM to this callback while training (main thread only; elsewhere nothing changes)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def save_interrupted(trainer: Trainer) -> None:
    """Keep a checkpoint of the last finished step (and the adapter) when training is cut short, and say truly
    where `--resume` will continue: a checkpoint a second Ctrl-C cut in half is written again."""
    step, output = trainer.state.global_step, trainer.args.output_dir
    folder = os.path.join(output, f"checkpoint-{step}")
    try:
        if step > 0 and trainer.args.should_save and os.path.isdir(folder) and checkpoint_problems(folder):
            shutil.rmtree(folder)
        if step > 0 and not os.path.isdir(folder):
            trainer._save_checkpoint(trainer.model, trial=None)
        if trainer.args.should_save and step > 0:
            trainer.accelerator.unwrap_model(trainer.model).save_pretrained(output)
    finally:
        if trainer.args.should_save:
            log_resume_point(output, step)


def log_resume_point(output: str, step: int) -> None:
    """Name the checkpoint `--resume` would continue from (or say there is none)."""
    complete = complete_checkpoints(output)
    if complete:
        logger.warning("interrupted at step %d; continue from %s with --resume", step, complete[-1])
    else:
        logger.warning("interrupted at step %d before any checkpoint was complete; train again with --overwrite", step)


class DivergedError(ValueError):
    """Training made the weights or the loss NaN or infinite."""


class StopOnNonFinite(TrainerCallback):
    """Stop the run at the first step whose update leaves a trained weight, or whose logged loss, non-finite.

    Raised in `on_step_end`, before Trainer saves that step: the checkpoints on disk stay the last good ones."""

    def __init__(self, lr: float) -> None:
        self.lr = lr

    def _fail(self, args, step: int, what: str) -> None:
        good = complete_checkpoints(args.output_dir)
        kept = f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was saved"
        raise DivergedError(
            f"training diverged at step {step}: {what} (--lr {self.lr:g}); nothing of this step is saved and {kept}; "
            "lower --lr and train again with --overwrite"
        )

    def on_step_end(self, args, state, control, model=None, **kwargs):
        trained = [p for p in model.parameters() if p.requires_grad] if model is not None else []
        if trained and not all(torch.isfinite(p).all() for p in trained):
            self._fail(args, state.global_step, "the trained weights became NaN or infinite")

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if isinstance(loss, float) and not math.isfinite(loss):
            self._fail(args, state.global_step, f"the loss became {loss}")


class DiskFullError(OSError):
    """A save ran out of disk space."""


def is_disk_full(err: BaseException, folder: str) -> bool:
    """Whether a failed save ran out of space: an OSError with ENOSPC, a wrapper that says so (safetensors), or a
    failed write (torch's "unexpected pos" names no cause) on a disk with under 1 MiB left."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return True
    if "No space left" in str(err) or "StorageFull" in str(err):
        return True
    try:
        stat = os.statvfs(folder)
    except OSError:
        return False
    return isinstance(err, (OSError, RuntimeError)) and stat.f_bavail * stat.f_frsize < 2**20


def disk_full_error(output: str, what: str) -> DiskFullError:
    """The one-line error for a save that ran out of space, naming the last complete checkpoint."""
    complete = complete_checkpoints(output)
    then = (
        f"the last complete checkpoint is {complete[-1]}: free some space, then continue with --resume"
        if complete
        else "no checkpoint is complete: free some space, then train again with --overwrite"
    )
    error = DiskFullError(f"no space left on {os.path.abspath(output)} while saving {what}; {then}")
    error.errno = errno.ENOSPC  # set after: OSError(errno, text) would print as "[Errno 28] text"
    return error
