"""`PeftModel`: a thin wrapper that puts named adapters on a transformers model, trains, saves and loads them.

Layout (the same as peft, so state-dict keys match): `PeftModel.base_model` is a `TunerModel` whose `.model`
is the transformers model with adapter layers swapped in. Attribute access falls through to the model,
so `peft_model.config`, `peft_model.generation_config` etc. work as on the base.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from deltatune.core import trainer_integration
from deltatune.core.config import PeftConfig, PeftWarning, TaskType
from deltatune.core.files import adapter_folder, check_save_arguments, load_weights, save_adapter_files
from deltatune.core.hub import create_or_update_model_card, push_to_hub
from deltatune.core.layers import AdapterLayer, ModulesToSaveWrapper, as_names, belongs_to_adapter
from deltatune.core.registry import Method, method_for
from deltatune.core.state_dict import IncompatibleKeys, get_peft_model_state_dict, load_adapter_tensors
from deltatune.core.targeting import replace_module
from deltatune.core.tuner_model import TunerModel, cast_adapter_dtype, count_parameters
from deltatune.ops.lora_dispatch import weights_fixed
from deltatune.quantization import dequantize_model, is_quantized_linear

logger = logging.getLogger(__name__)


# The heads peft trains in full next to any adapter of a classifier / QA model (added to `modules_to_save`).
TASK_HEADS: dict[TaskType, tuple[str, ...]] = {
    TaskType.SEQ_CLS: ("classifier", "score"),
    TaskType.TOKEN_CLS: ("classifier", "score"),
    TaskType.QUESTION_ANS: ("qa_outputs",),
}


def _add_task_heads(config: PeftConfig) -> None:
    """As peft: a freshly initialised task head must train, so it joins `modules_to_save` (once)."""
    heads = TASK_HEADS.get(config.task_type, ())
    if heads and hasattr(config, "modules_to_save"):
        config.modules_to_save = list(dict.fromkeys([*(config.modules_to_save or []), *heads]))


# {task type: the PeftModel subclass for it}, filled by `deltatune.core.task_models` (the task classes subclass
# PeftModel, so they are defined after it); `PeftModel.from_pretrained` picks the class here.
MODEL_TYPE_TO_PEFT_MODEL: dict[TaskType, type[PeftModel]] = {}


def _while_loading(config: PeftConfig) -> contextlib.AbstractContextManager[None]:
    """The method's context for creating an adapter whose values a file is about to give (prompt tuning starts
    from random values instead of reading a tokenizer)."""
    hook = method_for(config).while_loading
    return hook(config) if hook else contextlib.nullcontext()


class PeftModel(nn.Module):
    """A transformers model with parameter-efficient adapters.

    Args:
        model: the transformers model; it is changed in place (its layers are wrapped).
        peft_config: the first adapter's config.
        adapter_name: the first adapter's name.
        autocast_adapter_dtype: keep adapters over a float16/bfloat16 base in float32 (peft's default, True).
        low_cpu_mem_usage: accepted for peft's signature; adapters are small and made in place either way.
    """

    is_deltatune_peft_model = True  # how transformers.Trainer's integration recognises this class

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        super().__init__()
        trainer_integration.install()  # Trainer must treat this model as a peft one (first use; idempotent)
        self.base_model = TunerModel(model)
        self.add_adapter(adapter_name, peft_config, autocast_adapter_dtype=autocast_adapter_dtype)
        self.set_adapter(adapter_name)

    # ---- attribute pass-through -------------------------------------------------------------------------
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules") or {}  # none yet while __init__ runs (DeepSpeed's zero.Init)
            if name == "base_model" or "base_model" not in modules:
                raise
            return getattr(modules["base_model"], name)

    def get_base_model(self) -> nn.Module:
        """The transformers model (with adapter layers inside)."""
        return self.base_model.model

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        """{adapter name: config}, in the order the adapters were added."""
        return self.base_model.peft_config

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    @property
    def active_adapter(self) -> str | list[str]:
        return self.base_model.active_adapter

    @property
    def active_peft_config(self) -> PeftConfig:
        """The config of the (first) active adapter; the model's method is the same for all its adapters."""
        if not self.peft_config:
            raise ValueError("this model has no adapter left (all were deleted); add one with add_adapter()")
        return self.peft_config[self.active_peft_name()]

    @property
    def modules_to_save(self) -> set[str] | None:
        """The module names any adapter trains a full copy of (peft's attribute); None when there are none."""
        names = {
            name for config in self.peft_config.values() for name in getattr(config, "modules_to_save", None) or ()
        }
        return names or None

    @property
    def has_active_enabled_adapter(self) -> bool:
        """True when an adapter is active and not switched off (peft's property)."""
        return bool(self.active_adapters) and not self.base_model.adapters_disabled

    def active_peft_name(self) -> str:
        """The name of the (first) active adapter, else of the first adapter."""
        return next(iter(self.active_adapters), next(iter(self.peft_config), "default"))

    @property
    def method(self) -> Method | None:
        """The registered method of this model's adapters (`deltatune.core.registry.Method`)."""
        return self.base_model.method

    def _adapter_modules(self) -> Iterator[nn.Module]:
        return self.base_model.adapter_modules()

    # ---- adapters ----------------------------------------------------------------------------------------
    def add_adapter(
        self,
        adapter_name: str,
        peft_config: PeftConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Add a new adapter (not activated; call `set_adapter`). peft's arguments: `autocast_adapter_dtype`
        keeps adapters over a half-precision base in fp32; `low_cpu_mem_usage` is accepted (nothing to save)."""
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter with name {adapter_name!r} already exists; pick another adapter_name")
        if self.peft_config and method_for(peft_config) is not method_for(self.active_peft_config):
            raise ValueError(
                f"this model holds {self.active_peft_config.peft_type.value} adapters; a "
                f"{peft_config.peft_type.value} adapter needs its own base model"
            )
        method = method_for(peft_config)
        if self.peft_config and method.refuse_second_adapter is not None:
            method.refuse_second_adapter(self.peft_config, peft_config)
        model = self.get_base_model()
        _add_task_heads(peft_config)
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = getattr(model, "name_or_path", None) or None
        self.peft_config[adapter_name] = peft_config
        try:
            beside = method.add(model, peft_config, adapter_name)
            if beside is not None:  # a module that lives next to the model (a prompt encoder)
                if "prompt_encoder" not in self._modules:
                    self.prompt_encoder = nn.ModuleDict()
                self.prompt_encoder[adapter_name] = beside
        except Exception:
            for module in self._adapter_modules():  # undo what the method did before it failed
                module.delete_adapter(adapter_name)
            del self.peft_config[adapter_name]
            raise
        self.base_model.method = method
        cast_adapter_dtype(model, adapter_name, autocast_adapter_dtype)
        self.base_model.record_targets(adapter_name)
        self._set_trainable()

    def set_adapter(self, adapter_name: str | Sequence[str], inference_mode: bool = False) -> None:
        """Make `adapter_name` the adapter used in forward and trained (unless `inference_mode`); a list of LoRA
        adapters activates them all, their updates adding up (peft does this on `base_model.set_adapter`)."""
        names = as_names(adapter_name)
        known = [self.peft_config[n] for n in names if n in self.peft_config]
        if len(names) > 1 and any(method_for(config).one_adapter_at_a_time for config in known):
            raise ValueError("a prompt method runs one prompt at a time: activate one adapter with set_adapter(name)")
        self.base_model.set_adapter(adapter_name, inference_mode=inference_mode)
        self._set_trainable(inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter and its weights (the last one too: the model then runs as the base)."""
        if adapter_name not in self.peft_config:
            raise ValueError(
                f"Adapter {adapter_name} does not exist: this model has {', '.join(self.peft_config) or 'none'}"
            )
        if any(adapter_name in getattr(m, "merged_adapters", ()) for m in self._adapter_modules()):
            # as peft: unmerging here would also unmerge the others, and is lossy on a quantised base
            raise ValueError(
                f"Cannot delete adapter(s) {[adapter_name]} while they are merged. Please unmerge them first. Call "
                "unmerge_adapter(), or keep the update in the weights with merge_and_unload()"
            )
        if adapter_name in self._modules.get("prompt_encoder", {}):
            del self.prompt_encoder[adapter_name]
        self.base_model.delete_adapter(adapter_name)
        self._set_trainable()

    def add_weighted_adapter(
        self,
        adapters: Sequence[str],
        weights: Sequence[float],
        adapter_name: str,
        combination_type: str = "svd",
        **options: Any,
    ) -> None:
        """Add `adapter_name`, the `adapters` combined with `weights`, for methods that can (LoRA: "svd", "cat",
        "linear", TIES, DARE...; peft's arguments; see `deltatune.methods.lora.combine`)."""
        hook = self.method.add_weighted_adapter if self.method else None
        if hook is None:
            name, kind = self.active_peft_name(), self.active_peft_config.peft_type.value
            raise ValueError(f"add_weighted_adapter combines LoRA adapters; {name!r} is {kind}")
        hook(self, adapters, weights, adapter_name, combination_type, **options)

    def _set_trainable(self, inference_mode: bool = False) -> None:
        """Freeze everything but the active adapters (nothing trains in inference mode)."""
        self.base_model.set_trainable(inference_mode)
        frozen = inference_mode or not self.peft_config or self.active_peft_config.inference_mode
        for name, encoder in self._modules.get("prompt_encoder", {}).items():
            encoder.requires_grad_(name in self.active_adapters and not frozen)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Turn gradients on or off for the named adapters only (peft's method; layer adapters only)."""
        if self.peft_config and method_for(self.active_peft_config).one_adapter_at_a_time:
            raise TypeError(
                "Setting `requires_grad` is not supported for prompt learning methods like "
                f"{self.active_peft_config.peft_type.value}."
            )
        self.base_model.set_requires_grad(adapter_names, requires_grad)

    # ---- forward and generation ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _rows_use(self, adapter_names: Sequence[str] | None) -> Iterator[None]:
        """Within the block, row i of the batch runs adapter adapter_names[i] ("__base__": none)."""
        if adapter_names is None:
            yield
            return
        unknown = sorted(set(adapter_names) - set(self.peft_config) - {"__base__"})
        if unknown:
            raise ValueError(
                f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}; this model has "
                f"{', '.join(self.peft_config)} (and '__base__' for no adapter)"
            )
        refuse_rows = method_for(self.active_peft_config).refuse_rows
        if refuse_rows is not None:  # rows the method cannot serve (one prompt per batch, biases changed in place)
            refuse_rows(self.active_peft_config, adapter_names)
        if any(isinstance(m, AdapterLayer) and m.merged_adapters for m in self._adapter_modules()):
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first "
                "(a merged update is in the base weight, so every row would see it)"
            )
        modules = list(self._adapter_modules())
        for module in modules:
            module.row_adapters = list(adapter_names)
        try:
            yield
        finally:
            for module in modules:
                module.row_adapters = None

    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any):
        """The base model's forward, with the inputs as given (positional ones stay positional, so any
        nn.Module works); `adapter_names` (one per row) runs a mixed batch of adapters."""
        if not self.peft_config:  # every adapter was deleted: the base model alone
            return self.get_base_model()(*args, **kwargs)
        method = method_for(self.active_peft_config)
        with self._rows_use(adapter_names):
            if method.forward:  # the method builds its inputs (virtual tokens) from named ones
                outputs = method.forward(self, **self._named_inputs(args, kwargs))
            else:
                outputs = self.get_base_model()(*args, **kwargs)
        return method.after_forward(self, outputs) if method.after_forward else outputs

    def _named_inputs(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """Positional inputs under the names the base model's forward gives them; None values dropped."""
        if args:
            signature = inspect.signature(self.get_base_model().forward)
            kwargs = dict(signature.bind_partial(*args, **kwargs).arguments)
            kwargs.update(kwargs.pop("kwargs", {}))
        return {key: value for key, value in kwargs.items() if value is not None}

    def generate(self, *args, adapter_names: Sequence[str] | None = None, **kwargs):
        """The base model's `generate`, with the active adapter (or one adapter per row)."""
        method = method_for(self.active_peft_config)
        with self._rows_use(adapter_names), weights_fixed():  # no weight changes mid-generate: layers may cache
            if method.generate:
                return method.generate(self, *args, **kwargs)
            return self.get_base_model().generate(*args, **kwargs)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the block; on leaving, every layer is as it was before."""
        hook = method_for(self.active_peft_config).while_disabled if self.peft_config else None
        in_place = hook(self.get_base_model()) if hook else contextlib.nullcontext()  # BitFit's trained biases
        modules = list(self._adapter_modules())
        # A merged update lives in the base weight: take it out for the block, fold it back in after.
        merged = {m: list(m.merged_adapters) for m in modules if isinstance(m, AdapterLayer) and m.merged_adapters}
        before = {module: module.disabled for module in modules}
        if len(set(before.values())) > 1:  # peft's words; on leaving, every layer is enabled
            warnings.warn(
                "The model contains some adapter layers that are enabled and others that are disabled. This is most "
                "likely unintentional. After exiting the disable_adapter context, all adapters will be enabled",
                PeftWarning,
                stacklevel=3,
            )
            before = dict.fromkeys(before, False)
        was_disabled = self.base_model.adapters_disabled
        for module in merged:
            module.unmerge()
        for module in modules:
            module.disabled = True
        self.base_model.adapters_disabled = True
        try:
            with in_place:
                yield
        finally:
            for module, names in merged.items():
                module.merge(names)
            self.base_model.adapters_disabled = was_disabled
            for module, disabled in before.items():
                module.disabled = disabled

    # ---- merging ------------------------------------------------------------------------------------------
    def _check_mergeable(self) -> None:
        if not method_for(self.active_peft_config).can_merge:
            raise TypeError(
                f"{self.active_peft_config.peft_type.value} adds no weight that can be folded into the base; "
                "merging is only for LoRA-family adapters (keep the PeftModel for inference)"
            )
        refuse_merge = method_for(self.active_peft_config).refuse_merge
        if refuse_merge is not None:  # LoRA's replicated layers share one base weight
            refuse_merge(self.get_base_model())

    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Fold the active (or named) adapters into the base weights; `unmerge_adapter` undoes it.

        Args:
            adapter_names: the adapters to merge (default: the active one).
            safe_merge: check each layer's merged weight for NaN / inf before writing it (as peft).
        """
        self._check_mergeable()
        unknown = sorted(set(adapter_names or ()) - set(self.peft_config))
        if unknown:
            raise ValueError(f"cannot merge unknown adapters {unknown}; this model has: {', '.join(self.peft_config)}")
        for name, module in self.get_base_model().named_modules():
            if isinstance(module, AdapterLayer):
                try:
                    module.merge(adapter_names, safe_merge=safe_merge)
                except ValueError as err:
                    raise ValueError(f"{name}: {err}") from None

    def unmerge_adapter(self) -> None:
        """Restore the base weights after `merge_adapter`."""
        for module in self._adapter_modules():
            if isinstance(module, AdapterLayer) and module.merged_adapters:
                module.unmerge()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Sequence[str] | None = None
    ) -> nn.Module:
        """Return the transformers model with the adapter folded in and no adapter layers left.

        peft's arguments, in peft's order: `progressbar` is accepted and ignored (merging takes seconds here),
        `safe_merge` and `adapter_names` are as in `merge_adapter`.

        On a 4-bit / 8-bit base (QLoRA) the bitsandbytes layers are dequantised first, so the merge is exact and
        the result is a plain full-precision model (folding into 4-bit codes would round the update away).
        """
        self._check_mergeable()
        if any(is_quantized_linear(m) for m in self.get_base_model().modules()):
            dequantize_model(self.get_base_model())
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        return self._unwrap_all()

    def unload(self) -> nn.Module:
        """Return the transformers model without any adapter (base weights as before)."""
        self.unmerge_adapter()
        return self._unwrap_all(keep_trained=False)

    def _unwrap_all(self, keep_trained: bool = True) -> nn.Module:
        """Replace every adapter layer by the layer it wraps; `keep_trained`: what a method changed in place
        (BitFit's biases) keeps its trained values (merge_and_unload) or gets the originals back (unload)."""
        model = self.get_base_model()
        method = self.base_model.method
        if method is not None and method.before_unload is not None:
            method.before_unload(model, keep_trained)
        for name, module in list(model.named_modules()):
            if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
                replace_module(model, name, module.unwrap())
        return model

    # ---- counting -----------------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters), counted as peft counts them."""
        return count_parameters(self.named_parameters())

    def print_trainable_parameters(self) -> None:
        """Print peft's line: `trainable params: N || all params: M || trainable%: P`."""
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    # ---- files --------------------------------------------------------------------------------------------
    def get_adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The adapter's tensors under peft's file keys (`base_model.model.<module>.lora_A.weight`, ...), without
        embedding layers (see `deltatune.get_peft_model_state_dict` for peft's function and its options)."""
        adapter_name = adapter_name or self.active_peft_name()
        return get_peft_model_state_dict(self, adapter_name=adapter_name, save_embedding_layers=False)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: Sequence[str] | None = None,
        save_embedding_layers: bool | str = "auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Write each adapter as `adapter_config.json` + `adapter_model.safetensors` (peft's layout: the
        "default" adapter in the folder itself, any other in a sub-folder named after it), then the model card
        `README.md` (created, or updated if present, as peft).

        peft's arguments, in peft's order. `safe_serialization=False` (peft's pickled `adapter_model.bin`) is
        refused: a pickle can run code when loaded, so deltatune writes safetensors only. `save_embedding_layers`
        ("auto", True, False) also saves the embeddings (see `get_peft_model_state_dict`); `state_dict=` gives the
        values to save (as peft).

        `path_initial_model_for_weight_conversion=folder` (peft's option): `folder` holds the PiSSA / OLoRA
        adapter as saved right after initialisation; the adapter is written as a plain LoRA of rank 2r that
        applies to the ORIGINAL base weights (the method's `convert_on_save` hook; LoRA's is
        `deltatune.methods.lora.initialization.convert_to_plain_lora`).
        """
        check_save_arguments(list(self.peft_config), save_directory, selected_adapters, safe_serialization)
        if not is_main_process:
            return
        for name in selected_adapters or list(self.peft_config):
            folder = os.path.join(save_directory, name) if name != "default" else str(save_directory)
            os.makedirs(folder, exist_ok=True)
            config = self.peft_config[name]
            state = get_peft_model_state_dict(self, kwargs.get("state_dict"), name, False, save_embedding_layers)
            if path_initial_model_for_weight_conversion is not None:  # PiSSA / OLoRA -> plain LoRA
                state, config = self._converted(state, config, path_initial_model_for_weight_conversion)
            save_adapter_files(folder, state, config.saved_json_string())  # both files or neither
        self.create_or_update_model_card(save_directory)  # after the adapters: a failed save writes no card

    @staticmethod
    def _converted(state: dict[str, torch.Tensor], config: PeftConfig, initial_folder: str):
        """`save_pretrained(path_initial_model_for_weight_conversion=...)`: the method's conversion of the tensors
        and config, if it has one."""
        convert = method_for(config).convert_on_save
        if convert is None:
            raise ValueError("path_initial_model_for_weight_conversion only applies to LoRA adapters (PiSSA / OLoRA)")
        return convert(state, config, initial_folder)

    def create_or_update_model_card(self, output_dir: str | os.PathLike) -> None:
        """Write peft's model card `README.md` into `output_dir`, or update the one there (see `deltatune.core.hub`)."""
        create_or_update_model_card(self, output_dir)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Upload the adapters (as `save_pretrained` writes them) to Hub repo `repo_id`, creating it if needed;
        transformers' arguments (`commit_message`, `private`, `token`, `revision`, `create_pr`, `tags`), plus
        `save_pretrained`'s. See `deltatune.core.hub.push_to_hub`."""
        return push_to_hub(self, repo_id, **kwargs)

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        low_cpu_mem_usage: bool = False,
        **kwargs: Any,
    ) -> IncompatibleKeys:
        """Add adapter `adapter_name` from a folder written by deltatune or peft (not activated: `set_adapter`).

        If `adapter_name` exists already, its values are replaced in place, as peft does (this is how Trainer's
        `resume_from_checkpoint` and `load_best_model_at_end` load a checkpoint; an optimizer keeps working).
        `subfolder=` reads the adapter from that sub-folder of `model_id`, `ignore_mismatched_sizes=True` skips
        tensors whose shape differs (peft's options). `low_cpu_mem_usage` is accepted and changes nothing: adapter
        weights are created on the base layer's device and the values copied in.

        Returns:
            peft's load result: `missing_keys` (this adapter's tensors the file had no value for) and
            `unexpected_keys` (always empty: a file tensor with no place in the model is an error).
        """
        folder = adapter_folder(model_id, kwargs.get("subfolder"))
        weights = load_weights(folder)  # file errors first, before the model is touched
        created = adapter_name not in self.peft_config
        if created:
            config = config or PeftConfig.from_pretrained(folder)
            config.inference_mode = not is_trainable
            with _while_loading(config):
                self.add_adapter(
                    adapter_name, config, autocast_adapter_dtype=kwargs.get("autocast_adapter_dtype", True)
                )
            if is_trainable:  # as peft: it trains even while another adapter is the active one
                self.base_model.loaded_trainable.add(adapter_name)
        try:
            result = self.load_adapter_weights(weights, adapter_name, folder, kwargs.get("ignore_mismatched_sizes"))
        except Exception:
            if created:  # leave no half-loaded adapter behind
                self.delete_adapter(adapter_name)
            raise
        self._set_trainable()
        if not is_trainable:
            self.eval()  # as peft does: no adapter dropout at inference
        return IncompatibleKeys([k for k in result.missing_keys if belongs_to_adapter(k, adapter_name)], [])

    def load_adapter_weights(
        self,
        weights: dict[str, torch.Tensor],
        adapter_name: str,
        source: str = "",
        ignore_mismatched_sizes: bool = False,
    ) -> IncompatibleKeys:
        """Copy peft-keyed tensors into adapter `adapter_name`; every key and shape is checked before any copy.
        Returns the model's keys left without a value (base weights included, as torch reports them)."""
        return load_adapter_tensors(self, weights, adapter_name, source, True, bool(ignore_mismatched_sizes))

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        low_cpu_mem_usage: bool = False,
        **kwargs: Any,
    ) -> "PeftModel":
        """Wrap `model` and load the adapter saved in folder `model_id`, or in its sub-folder `subfolder=` (as peft);
        frozen unless `is_trainable`. `ignore_mismatched_sizes=True` skips tensors whose shape differs; with
        `low_cpu_mem_usage` (accepted, as peft) nothing changes: adapter weights are small and made on the base
        layer's device before the values are copied in."""
        folder = adapter_folder(model_id, kwargs.get("subfolder"))
        config = config or PeftConfig.from_pretrained(folder)
        weights = load_weights(folder)  # file errors first, before the model is wrapped
        config.inference_mode = not is_trainable
        model_class = cls if cls is not PeftModel else MODEL_TYPE_TO_PEFT_MODEL.get(config.task_type, PeftModel)
        with _while_loading(config):
            peft_model = model_class(
                model, config, adapter_name, autocast_adapter_dtype=kwargs.get("autocast_adapter_dtype", True)
            )
        peft_model.load_adapter_weights(weights, adapter_name, folder, kwargs.get("ignore_mismatched_sizes"))
        if not is_trainable:
            peft_model.eval()  # as peft does: a model loaded for inference runs without adapter dropout
        return peft_model

    # ---- training helpers ---------------------------------------------------------------------------------
    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """peft's question "can this adapter be converted to a LoRA?": deltatune has no such conversion."""
        return False

    def prepare_model_for_gradient_checkpointing(self, model: nn.Module) -> nn.Module:
        """Make the inputs of a (not quantised) model require grads, so that activation checkpointing over a frozen
        embedding still reaches the adapters (peft's method)."""
        quantized = any(getattr(model, flag, False) for flag in ("is_loaded_in_8bit", "is_loaded_in_4bit"))
        if not quantized and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        return model

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, **kwargs: Any
    ) -> None:
        """Turn on activation (gradient) checkpointing in the base model (what Trainer calls for
        `gradient_checkpointing=True`); inputs get grads so that frozen embeddings do not cut the graph."""
        model = self.get_base_model()
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs, **kwargs)
        else:  # transformers releases before the rename
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=activation_checkpointing_kwargs)
        model.enable_input_require_grads()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        """The older name of `activation_checkpointing_enable` (peft's and the tutorials' spelling)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)
