"""The command line's method table: `--method NAME` -> how to build its config from the options.

Adding a method to the command line is one entry in `METHODS`: the options it reads (each listed in
`METHOD_OPTIONS` with its default) and a function that builds the library config. The end-to-end tests are
parametrized over this table, so a new entry is tested automatically.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from deltatune import (
    AdaLoraConfig,
    AdapterConfig,
    BitFitConfig,
    IA3Config,
    LoraConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    TaskType,
)

CAUSAL_LM = TaskType.CAUSAL_LM


def _adalora_callback() -> Any:
    from deltatune.training.adalora_callback import AdaLoraCallback  # imports the Trainer's utilities: only when used

    return AdaLoraCallback()


# Every method option: name -> (default, help). The same names are keys in --config run.yaml.
METHOD_OPTIONS: dict[str, tuple[Any, str]] = {
    "r": (8, "rank of the low-rank update (lora, adalora: the initial rank)"),
    "alpha": (16, "lora_alpha: the update is scaled by alpha / r"),
    "dropout": (0.05, "dropout on the adapter's input"),
    "dora": (False, "lora: DoRA, a trainable magnitude per output feature beside the low-rank direction"),
    "target_modules": (
        None,
        "modules to adapt: names (q_proj,v_proj), a regex, or all-linear; default: the architecture's",
    ),
    "num_virtual_tokens": (20, "number of virtual tokens (prompt-tuning, p-tuning, prefix-tuning)"),
    "preset": (
        "houlsby",
        "adapter placement: houlsby (after attention and feed-forward) or pfeiffer (feed-forward only)",
    ),
    "reduction_factor": (16.0, "adapter bottleneck = hidden size / reduction_factor"),
    "bottleneck_size": (None, "adapter bottleneck units, instead of --reduction-factor"),
    "init_r": (12, "adalora: the rank every module starts with"),
    "target_r": (8, "adalora: the average rank per module left at the end"),
}
OPTION_TYPES: dict[str, type] = {"bottleneck_size": int}  # for options whose default (None) does not tell


@dataclass(frozen=True)
class MethodEntry:
    """How the command line builds one method.

    Attributes:
        options: the method options (keys of METHOD_OPTIONS) this method reads; others are refused.
        build: options getter -> the library config.
        lr: the default learning rate for a short run (prompt methods need larger steps than LoRA).
        callbacks: makers of the TrainerCallbacks the method needs during training (AdaLoRA's rank allocation).

    Besides METHOD_OPTIONS, the options getter answers "total_step": the run's number of optimizer steps.
    """

    options: tuple[str, ...]
    build: Callable[[Callable[[str], Any]], PeftConfig]
    lr: float
    callbacks: tuple[Callable[[], Any], ...] = ()


METHODS: dict[str, MethodEntry] = {
    "lora": MethodEntry(
        ("r", "alpha", "dropout", "dora", "target_modules"),
        lambda o: LoraConfig(
            task_type=CAUSAL_LM,
            r=o("r"),
            lora_alpha=o("alpha"),
            lora_dropout=o("dropout"),
            use_dora=o("dora"),
            target_modules=o("target_modules"),
        ),
        lr=2e-3,
    ),
    "bitfit": MethodEntry((), lambda o: BitFitConfig(task_type=CAUSAL_LM), lr=2e-3),
    # Prompt methods train few values from a random start: they need larger steps than LoRA.
    "prompt-tuning": MethodEntry(
        ("num_virtual_tokens",),
        lambda o: PromptTuningConfig(task_type=CAUSAL_LM, num_virtual_tokens=o("num_virtual_tokens")),
        lr=3e-2,
    ),
    "p-tuning": MethodEntry(
        ("num_virtual_tokens",),
        lambda o: PromptEncoderConfig(task_type=CAUSAL_LM, num_virtual_tokens=o("num_virtual_tokens")),
        lr=3e-3,
    ),
    # Prefixes start at zero: peft's default N(0, 1) start swamps a trained model's attention (on SmolLM2 the
    # held-out loss starts at 4.38 instead of the base's 0.73; at zero it starts at 0.79).
    "prefix-tuning": MethodEntry(
        ("num_virtual_tokens",),
        lambda o: PrefixTuningConfig(
            task_type=CAUSAL_LM, num_virtual_tokens=o("num_virtual_tokens"), init_weights="zero"
        ),
        lr=1e-2,
    ),
    "adapter": MethodEntry(
        ("preset", "reduction_factor", "bottleneck_size", "dropout", "target_modules"),
        lambda o: AdapterConfig(
            task_type=CAUSAL_LM,
            preset=o("preset"),
            reduction_factor=o("reduction_factor"),
            bottleneck_size=o("bottleneck_size"),
            adapter_dropout=o("dropout"),
            target_modules=o("target_modules"),
        ),
        lr=2e-3,
    ),
    "adalora": MethodEntry(
        ("init_r", "target_r", "alpha", "dropout", "target_modules"),
        lambda o: AdaLoraConfig(
            task_type=CAUSAL_LM,
            init_r=o("init_r"),
            target_r=o("target_r"),
            lora_alpha=o("alpha"),
            lora_dropout=o("dropout"),
            target_modules=o("target_modules"),
            total_step=o("total_step"),
        ),
        lr=2e-3,
        callbacks=(_adalora_callback,),
    ),
    # (IA)^3 vectors start at one and rescale activations: the paper's learning rate (Liu et al., 2022).
    "ia3": MethodEntry(
        ("target_modules",),
        lambda o: IA3Config(task_type=CAUSAL_LM, target_modules=o("target_modules")),
        lr=3e-3,
    ),
}


def method_entry(name: str) -> MethodEntry:
    """The entry of `--method name`, with an error listing the known methods."""
    if name not in METHODS:
        raise ValueError(f"--method {name!r} is not known; use one of: {', '.join(METHODS)}")
    return METHODS[name]


def build_peft_config(name: str, given: dict[str, Any], total_step: int) -> PeftConfig:
    """The library config for method `name` from the method options the user gave (others: defaults).

    Raises:
        ValueError: an option the method does not read was given (it would be silently ignored).
    """
    entry = method_entry(name)
    foreign = sorted(k for k, v in given.items() if v is not None and k in METHOD_OPTIONS and k not in entry.options)
    if foreign:
        flags = ", ".join("--" + k.replace("_", "-") for k in foreign)
        users = {k: [m for m, e in METHODS.items() if k in e.options] for k in foreign}
        where = "; ".join(f"--{k.replace('_', '-')} is for {', '.join(v) or 'no method'}" for k, v in users.items())
        reads = ", ".join("--" + k.replace("_", "-") for k in entry.options) or "none"
        raise ValueError(f"{flags} does not apply to --method {name} (it reads: {reads}); {where}")

    def option(key: str) -> Any:
        if key == "total_step":
            return total_step
        value = given.get(key)
        return METHOD_OPTIONS[key][0] if value is None else value

    return entry.build(option)


def check_target_names(model: Any, target_modules: Any) -> None:
    """Refuse a `--target-modules` list in which some names match no module (peft only refuses when none match,
    so a typo beside a correct name silently adapts fewer layers)."""
    if not isinstance(target_modules, list):
        return
    names = [name for name, _ in model.named_modules()]
    unmatched = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        matched = [t for t in target_modules if t not in unmatched]
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "weight")})
        raise ValueError(
            f"--target-modules: {', '.join(map(repr, unmatched))} matched no module"
            + (f" ({', '.join(matched)} did)" if matched else "")
            + f"; modules with weights here: {', '.join(leaves[:20])}"
        )


def warn_rank_above_layers(peft_model: Any, options: dict[str, Any]) -> None:
    """Warn when --r (or --init-r) is above the smallest side of an adapted layer: a product B @ A cannot have a
    higher rank than that, so the extra rank costs memory and changes nothing."""
    rank = options.get("r") or options.get("init_r")
    sides = [
        (min(m.in_features, m.out_features), name)
        for name, m in peft_model.named_modules()
        if hasattr(m, "base_layer") and isinstance(getattr(m, "in_features", None), int)
    ]
    if rank and sides and rank > min(sides)[0]:
        side, name = min(sides)
        flag = "--r" if options.get("r") else "--init-r"
        logging.getLogger(__name__).warning(
            "%s %d is above the smallest side of the adapted layer %s (%d): its update cannot have a higher rank, "
            "so the extra rank only costs memory; %s %d or less trains the same",
            flag,
            rank,
            name,
            side,
            flag,
            side,
        )
