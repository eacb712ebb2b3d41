"""Let `transformers.Trainer`, used unchanged, treat a deltatune `PeftModel` as it treats a peft one.

Trainer recognises PEFT models with one helper, `transformers.trainer_utils._is_peft_model`, which only knows
peft's classes. Without help, Trainer would therefore
- write checkpoints with the *full* state dict (`model.safetensors`, every frozen base weight; it even fails on
  tied weights) instead of the adapter,
- fail to `resume_from_checkpoint` / `load_best_model_at_end` from an adapter checkpoint,
- refuse a 4-bit/8-bit base ("You cannot perform fine-tuning on purely quantized models") although adapters are
  attached,
- inspect our wrapper's `forward` instead of the model's (label names, columns to keep, causal-LM loss counting).

So `install()` makes two small changes once `transformers.trainer` is imported (now, or later through an import
hook, so that creating a model does not pay for importing Trainer). Importing deltatune changes nothing; the
first `PeftModel` calls `install()` (it is idempotent), and code that needs it earlier may call it itself:
1. `_is_peft_model` also answers True for a deltatune `PeftModel`; everything above then follows Trainer's own
   peft code paths, which call only the peft-compatible API we have (`get_base_model`, `active_adapters`,
   `load_adapter(folder, name, is_trainable=...)`, `peft_config`, `base_model.model`).
2. `Trainer._save` (a checkpoint or `save_model`) writes our adapter files (`adapter_config.json` +
   `adapter_model.safetensors`) where it would call peft's `save_pretrained`; for every other model it is
   Trainer's own `_save`.
"""

from __future__ import annotations

import importlib.abc
import logging
import os
import sys
from types import ModuleType

logger = logging.getLogger(__name__)

TRAINER_MODULE = "transformers.trainer"


def _is_deltatune_model(model) -> bool:
    # A class attribute, not isinstance: this module is imported by the model wrapper it recognises.
    return getattr(type(model), "is_deltatune_peft_model", False)


def _patch_is_peft_model() -> None:
    """Make `_is_peft_model` (in trainer_utils and every module that imported it) know our PeftModel."""
    utils = sys.modules["transformers.trainer_utils"]
    original = utils._is_peft_model
    if getattr(original, "deltatune", False):
        return

    def _is_peft_model(model) -> bool:
        return _is_deltatune_model(model) or original(model)

    _is_peft_model.deltatune = True
    for name, module in list(sys.modules.items()):
        # vars(), not getattr: a lazy transformers module would import whatever the name resolves to
        if name.startswith("transformers") and vars(module).get("_is_peft_model") is original:
            module._is_peft_model = _is_peft_model


def _patch_save(trainer_module: ModuleType) -> None:
    """Wrap `Trainer._save` so that a deltatune model is saved as adapter files."""
    trainer_class = trainer_module.Trainer
    original_save = trainer_class._save
    if getattr(original_save, "deltatune", False):
        return

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not _is_deltatune_model(model):
            return original_save(self, output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return None
        logger.info("Saving adapter checkpoint to %s", output_dir)
        model.save_pretrained(output_dir)  # adapter files only, never the frozen base weights
        # The rest is what Trainer._save does after saving a model: tokenizer and training arguments.
        tokenizer = self.processing_class
        if tokenizer is None:
            tokenizer = getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        import torch

        torch.save(self.args, os.path.join(output_dir, trainer_module.TRAINING_ARGS_NAME))
        return None

    _save.deltatune = True
    _save.__doc__ = original_save.__doc__
    trainer_class._save = _save


def patch_trainer(trainer_module: ModuleType) -> None:
    """Apply both changes to an imported `transformers.trainer` (idempotent)."""
    _patch_is_peft_model()
    _patch_save(trainer_module)


class _PatchAfterExec(importlib.abc.Loader):
    """Runs the real loader of `transformers.trainer`, then patches the fresh module."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        patch_trainer(module)

    def __getattr__(self, name: str):  # get_source, get_code, ... for tracebacks and inspect
        return getattr(self.loader, name)


class _TrainerImportHook(importlib.abc.MetaPathFinder):
    """Finds `transformers.trainer` with the other finders and swaps in a loader that patches it."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TRAINER_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchAfterExec(spec.loader)
                return spec
        return None


def install() -> None:
    """Patch Trainer now if it is imported, otherwise as soon as it is."""
    if TRAINER_MODULE in sys.modules:
        patch_trainer(sys.modules[TRAINER_MODULE])
    elif not any(isinstance(f, _TrainerImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _TrainerImportHook())
