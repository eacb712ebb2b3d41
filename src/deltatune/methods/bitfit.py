"""BitFit: train only the bias terms (Ben Zaken et al., 2021, arXiv:2106.10199).

In every affine map W x + b the weights W stay frozen and only b trains. Nothing is added to the model,
so the trainable fraction is (number of bias values) / (all parameters); on bloom-1b4-zh that is about
0.04%. The adapter file holds the trained biases under peft-style keys (`base_model.model.<module>.bias`).
Because the biases are trained in place, the original values are kept aside so that `disable_adapter()`
and `unload()` can give the base model back.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from deltatune.core.config import PeftConfig, PeftType
from deltatune.core.targeting import modules_to_save_names, wrap_modules_to_save

# Parameters of a `modules_to_save` wrapper: its frozen original and its trainable copies are not base biases.
_WRAPPER_PARTS = (".original_module.", ".modules_to_save.")


@dataclass
class BitFitConfig(PeftConfig):
    """BitFit settings.

    Attributes:
        bias_pattern: None trains every bias; a list keeps biases whose module name ends with one of the
            entries (e.g. ``["query_key_value", "dense"]``); a string is a regex matched against the full
            parameter name (e.g. ``r".*attention.*bias"``).
        modules_to_save: modules trained in full beside the biases. The paper trains the new task head too;
            for SEQ_CLS / TOKEN_CLS / QUESTION_ANS the head ("classifier", "score", "qa_outputs") is added for
            you, as for LoRA.
    """

    bias_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.BITFIT
        super().__post_init__()

    def selects(self, param_name: str) -> bool:
        """Whether `param_name` is a bias this config trains."""
        if not param_name.endswith("bias") or any(part in param_name for part in _WRAPPER_PARTS):
            return False
        if self.bias_pattern is None:
            return True
        if isinstance(self.bias_pattern, str):
            return re.fullmatch(self.bias_pattern, param_name) is not None
        module_name = param_name.rsplit(".", 1)[0]
        return any(module_name == p or module_name.endswith(f".{p}") for p in self.bias_pattern)


def add_bitfit(model: nn.Module, config: BitFitConfig, adapter_name: str) -> None:
    """Check that some bias is selected and keep the original values for `disable_adapter`/`unload`."""
    if getattr(model, "_bitfit_original_biases", None) is not None:
        raise ValueError(
            "this model already has a BitFit adapter; BitFit trains the base biases in place, so only one "
            "BitFit adapter fits on one base (load the other onto a fresh copy of the model)"
        )
    modules_to_save_names(model, config.modules_to_save)  # checked before anything is changed
    if not any(config.selects(n) for n, _ in model.named_parameters()):
        pattern = f" matching bias_pattern={config.bias_pattern!r}" if config.bias_pattern is not None else ""
        names = sorted({n.rsplit(".", 1)[0].split(".")[-1] for n, _ in model.named_parameters() if n.endswith("bias")})
        hint = f"modules with a bias here: {', '.join(names[:20])}" if names else "this model has no bias at all"
        raise ValueError(f"BitFit found no bias parameter{pattern} in {type(model).__name__}; {hint}")
    wrap_modules_to_save(model, config.modules_to_save, adapter_name)
    # Selected after wrapping: a bias inside a modules_to_save copy trains as part of that copy instead.
    model._bitfit_original_biases = {n: p.detach().clone() for n, p in model.named_parameters() if config.selects(n)}


def swap_bitfit_biases(model: nn.Module) -> None:
    """Exchange the trained and the original biases (called twice, it restores the trained ones)."""
    original = model._bitfit_original_biases
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, saved in original.items():
            trained = params[name].detach().clone()
            params[name].copy_(saved)
            original[name] = trained


@contextlib.contextmanager
def original_biases(model: nn.Module) -> Iterator[None]:
    """Within the block the model has its original biases (`disable_adapter`); the trained ones come back after."""
    swap_bitfit_biases(model)
    try:
        yield
    finally:
        swap_bitfit_biases(model)


def refuse_base_rows(config: BitFitConfig, adapter_names: Sequence[str]) -> None:
    """The trained biases are the model's own, so no row of the batch can see the original ones."""
    if "__base__" in adapter_names:
        raise ValueError(
            "BitFit trains the base biases in place, so one batch cannot mix BitFit rows with '__base__' rows; "
            "run the base rows in a separate pass inside `with model.disable_adapter():`"
        )


def remove_bitfit(model: nn.Module, keep_trained: bool) -> None:
    """Forget the BitFit record; the biases keep their trained values (merge) or get the originals back (unload)."""
    if getattr(model, "_bitfit_original_biases", None) is None:
        return
    if not keep_trained:
        swap_bitfit_biases(model)
    del model._bitfit_original_biases


def bitfit_is_trainable(param_name: str, config: BitFitConfig) -> bool:
    """The base parameters BitFit trains and saves."""
    return config.selects(param_name)


# The Method fields BitFit registers (see deltatune.core.registry.Method): the biases change in place.
BITFIT_HOOKS = dict(
    base_param_trains=bitfit_is_trainable,
    can_merge=True,  # nothing to fold: merge_and_unload keeps the trained biases
    while_disabled=original_biases,
    before_unload=remove_bitfit,
    refuse_rows=refuse_base_rows,
)
