"""LoRA's `layer_replication`: depth up-scaling by stacking ranges of the base model's layers (as peft).

LLaMA Pro (Wu et al., 2024, arXiv:2401.02415) and SOLAR (Kim et al., 2023, arXiv:2312.15166) grow a model
by repeating some of its decoder layers. With a map of [start, end) ranges the layer list is rebuilt as::

    layers 0..4, layer_replication=[[0, 4], [2, 5]]  ->  0, 1, 2, 3, 2, 3, 4

Each position is a fresh module whose *parameters are the original layer's* (shared storage, frozen), so
the deeper model costs no extra weight memory. LoRA is applied after the rebuild, so every position gets its
own adapter: the copies W are shared, their updates B_i A_i are not, which lets them learn to differ::

    h_i = W_k x + (alpha / r) B_i A_i x          W_k shared by every position i that repeats layer k

Details kept equal to peft (`replicate_layers` in peft/tuners/tuners_utils.py): the layer list is found at
`model(.model)*.layers` (Llama, Mistral, Qwen2, ...), `.bert.encoder.layer` / `.encoder.layer` (BERT) or
`.h` on the model itself (a bare Bloom / Falcon model); each copy's `layer_idx` attributes are renumbered to
its new position so the KV cache has one slot per position; `config.num_hidden_layers` becomes the new depth.
Loading a saved adapter redoes the replication from its config before the weights are read.

Merging is refused: the copies of a layer share one weight, so folding each copy's update into it would add
every copy's update to all of them (peft 0.21.2 means to refuse too, but its check never fires and its
merged model is silently wrong).
"""

from __future__ import annotations

import copy
import logging

from torch import nn

from deltatune.core.layers import AdapterLayer, ModulesToSaveWrapper

logger = logging.getLogger(__name__)

# Set on the transformers model once its layers are replicated: the map used (for later adapters and merging).
REPLICATED_ATTR = "deltatune_layer_replication"

_WHERE_LOOKED = (
    "model(.model)*.layers (Llama, Mistral, Qwen2, ...), .bert.encoder.layer or .encoder.layer (BERT), "
    "or .h on the model itself (a bare BloomModel / FalconModel)"
)


def check_layer_map(layer_map: object) -> list[list[int]]:
    """Validate `layer_replication` as a list of [start, end) pairs of ints, 0 <= start < end.

    Returns:
        The map as lists (the form a JSON config reads back as).
    """
    if not isinstance(layer_map, (list, tuple)):
        raise ValueError(f"layer_replication={layer_map!r} must be a list of [start, end) pairs, e.g. [[0, 4], [2, 5]]")
    pairs = []
    for pair in layer_map:
        is_pair = isinstance(pair, (list, tuple)) and len(pair) == 2
        if not is_pair or not all(isinstance(i, int) and not isinstance(i, bool) for i in pair):
            raise ValueError(
                f"layer_replication entry {pair!r} is not a [start, end) pair of ints; write e.g. [[0, 4], [2, 5]]"
            )
        start, end = pair
        if not 0 <= start < end:
            raise ValueError(
                f"layer_replication entry [{start}, {end}] is empty or negative: each range is [start, end) with "
                "0 <= start < end (end is exclusive, so [2, 3] is layer 2 alone)"
            )
        pairs.append([start, end])
    return pairs


def find_layer_list(model: nn.Module) -> tuple[nn.Module, str]:
    """(owner module, attribute path) of the model's `nn.ModuleList` of layers, searched where peft searches."""
    while hasattr(model, "model"):
        model = model.model
    if hasattr(model, "bert"):  # some BERT heads nest the encoder under `.bert`
        model = model.bert
    if hasattr(model, "layers"):
        owner, attr = model, "layers"
    elif hasattr(model, "encoder") and hasattr(model.encoder, "layer"):
        owner, attr = model.encoder, "layer"
    elif hasattr(model, "h"):
        owner, attr = model, "h"
    else:
        owner, attr = None, None
    if owner is None or not isinstance(getattr(owner, attr), nn.ModuleList):
        raise ValueError(
            f"layer_replication: no list of layers found in {type(model).__name__}; looked at {_WHERE_LOOKED}, "
            "which are the layouts peft handles (so that the adapter file stays readable by peft). Use a model "
            "with one of these layouts, or leave layer_replication=None"
        )
    return owner, attr


def clone_sharing_parameters(module: nn.Module) -> nn.Module:
    """A deep copy of `module` whose parameters are the original's (same tensors); buffers are copied."""
    clone = copy.deepcopy(module)
    for name, submodule in module.named_modules():
        target = clone.get_submodule(name)
        for param_name, param in submodule.named_parameters(recurse=False):
            target.register_parameter(param_name, param)
    return clone


def replicate_layers(model: nn.Module, layer_map: list[list[int]]) -> None:
    """Rebuild the model's layer list from `layer_map` in place (see the module docstring).

    Args:
        model: the transformers model; its layer list and `config.num_hidden_layers` are changed.
        layer_map: [start, end) ranges of the current layers, stacked in order.
    """
    layer_map = check_layer_map(layer_map)
    owner, attr = find_layer_list(model)
    layers = getattr(owner, attr)
    for start, end in layer_map:
        if end > len(layers):
            raise ValueError(
                f"layer_replication range [{start}, {end}] goes past the model's {len(layers)} layers "
                f"(valid ends are 1..{len(layers)}); fix the range"
            )
    new_layers = []
    for start, end in layer_map:
        for i in range(start, end):
            clone = clone_sharing_parameters(layers[i])
            for submodule in clone.modules():  # the KV cache is indexed by layer_idx: one slot per position
                if hasattr(submodule, "layer_idx"):
                    submodule.layer_idx = len(new_layers)
            new_layers.append(clone)
    setattr(owner, attr, nn.ModuleList(new_layers))
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = len(new_layers)
    setattr(model, REPLICATED_ATTR, layer_map)


def prepare_replication(model: nn.Module, layer_map: list | None, adapter_name: str) -> None:
    """Replicate the layers for the first adapter that asks for it; check a later adapter against the model.

    A later adapter with the same map, or with none, is added to the replicated layers as they are (peft would
    replicate again on top of the replicated list, which drops or repeats the first adapter's layers); a later
    adapter with a different map, or a map asked for after adapters were put on the plain layers, is refused.
    """
    done = getattr(model, REPLICATED_ATTR, None)
    wanted = layer_map or None  # checked and made lists by LoraConfig
    if done is None:
        if wanted is not None and any(isinstance(m, (AdapterLayer, ModulesToSaveWrapper)) for m in model.modules()):
            raise ValueError(
                f"adapter {adapter_name!r} asks for layer_replication={wanted}, but this model already holds "
                "adapters on its unreplicated layers; replicating now would make the copies share those adapters. "
                "Give layer_replication to the first adapter, or add this one to a fresh base model"
            )
        if wanted is not None:
            replicate_layers(model, wanted)
        return
    if wanted is not None and wanted != done:
        raise ValueError(
            f"adapter {adapter_name!r} asks for layer_replication={wanted}, but this model's layers were already "
            f"replicated with {done}; an adapter on this model must use the same layer_replication (or None), "
            "or be added to a fresh base model"
        )
    if wanted is None:
        logger.info(
            "adapter %r is added to every layer of the replicated model (layer_replication=%s)", adapter_name, done
        )


def refuse_merge_if_replicated(model: nn.Module) -> None:
    """Merging into shared weights would give every copy the sum of all copies' updates: refuse it."""
    done = getattr(model, REPLICATED_ATTR, None)
    if done is not None:
        raise ValueError(
            f"cannot merge adapters into a model whose layers are replicated (layer_replication={done}): the repeated "
            "layers share one base weight, so each copy's update would be added to all of them. Keep the PeftModel "
            "with the adapters unmerged for inference (unload() returns the replicated base without adapters)"
        )
