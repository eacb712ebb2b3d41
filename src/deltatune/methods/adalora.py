"""AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning (Zhang et al., 2023, arXiv:2303.10512).

Each adapted weight W (out x in) gets an update in SVD form, whose rank AdaLoRA shrinks where it matters least::

    h = W x + (alpha / (r_0 + 1e-5)) * P diag(Λ) Q x
    Q = lora_A: (r x in), Λ = lora_E: (r x 1), P = lora_B: (out x r), r_0 = init_r

Λ starts at zero (the model starts equal to the base); P and Q start small and random. Training adds an
orthogonality penalty mean(||QQᵀ - I||_F, ||PᵀP - I||_F) to the loss so that P and Q stay near-orthogonal and
Λ behaves like singular values. After each optimizer step `update_and_allocate(step)`:

1. scores each triplet (P[:, i], Λ[i], Q[i]) by sensitivity |θ · ∂L/∂θ|, smoothed with an EMA (beta1) and
   weighted by its uncertainty, an EMA (beta2) of |sensitivity - smoothed|;
2. follows a cubic budget schedule: init_r per module for `tinit` steps, then falling as
   target + (init - target) (1 - (t - tinit) / (T - tfinal - tinit))³ down to target_r per module at step
   T - tfinal, then fixed for the last `tfinal` steps;
3. every `deltaT` steps zeroes the Λ entries of the lowest-scoring triplets so that the budget holds.

The final choice is `config.rank_pattern` ({module.lora_E: [kept, ...]}); the file keeps only the kept triplets,
and loading it builds each module at its pruned rank. Same fields, files and numbers as peft's AdaLoRA.

An nn.Conv2d kernel (out x in x kH x kW) is adapted as the matrix (out x in*kH*kW), as peft's `SVDConv2d`:
Q: (r x in*kH*kW), and the update P diag(Λ) Q, reshaped to the kernel, runs as a second convolution.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.core.config import PeftType, check_range
from deltatune.core.layer_kinds import is_conv1d, layer_dims
from deltatune.core.layers import MergeableLayer
from deltatune.core.peft_model import PeftModel
from deltatune.core.targeting import find_targets, wrap_modules_to_save, wrap_targets
from deltatune.core.tuner_model import TunerModel
from deltatune.methods.lora.initialization import reads_base_weight
from deltatune.methods.lora.lora import LoraConfig
from deltatune.methods.lora.replication import prepare_replication
from deltatune.methods.lora.trainable_tokens import add_trainable_tokens, plan_trainable_tokens

logger = logging.getLogger(__name__)

# peft's AdaLoRA defaults (wider than LoRA's: the budget is shared out among more modules).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "gpt_bigcode": ["c_attn"],
    "deberta": ["in_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
}


@dataclass
class AdaLoraConfig(LoraConfig):
    """AdaLoRA settings: LoRA's fields (`lora_alpha`, `lora_dropout`, `target_modules`, ...) plus the budget.

    Attributes:
        target_r: the average rank per module at the end (the budget is target_r x number of modules).
        init_r: the rank every module starts with (`r` is not used).
        tinit: warm-up steps at full rank before any pruning.
        tfinal: final steps at the target budget with the rank pattern fixed.
        deltaT: prune every deltaT steps during the budget phase.
        beta1: EMA factor of the smoothed sensitivity.
        beta2: EMA factor of the uncertainty.
        orth_reg_weight: weight of the orthogonality penalty added to the loss.
        total_step: the number of optimizer steps of the run (required: the schedule is laid out over it).
        rank_pattern: set by training: for each module, which of its init_r triplets are kept.
    """

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict | None = None

    def __post_init__(self) -> None:
        if self.loftq_config or self.init_lora_weights == "loftq":  # before LoRA's own checks of loftq_config
            raise ValueError(
                "ADALORA does not support LOFTQ (init_lora_weights='loftq' / loftq_config, as in peft); use "
                "LoraConfig(init_lora_weights='loftq', loftq_config=...) for LoftQ"
            )
        super().__post_init__()
        self.peft_type = PeftType.ADALORA
        self._check_options()
        self._check_schedule()

    def _check_options(self) -> None:
        """LoRA options AdaLoRA has no use for. The first words of the errors and warning are peft's."""
        if self.use_dora:  # DoRA's magnitude has no place in AdaLoRA's SVD update
            raise ValueError(
                "ADALORA does not support DoRA (use_dora=True, as in peft); use LoraConfig(use_dora=True) for "
                "DoRA, or AdaLoRA with use_dora=False"
            )
        if self.lora_bias:  # its SVD layers have no B module to hold a bias
            raise ValueError("AdaLoraConfig does not support lora_bias=True; use LoraConfig(lora_bias=True)")
        if self.r != 8:
            warnings.warn(
                "Note that `r` is not used in AdaLora and will be ignored. If you intended to set the initial "
                "rank, use `init_r` instead.",
                stacklevel=4,
            )
        if reads_base_weight(self.init_lora_weights):  # PiSSA / OLoRA are LoRA's only
            raise ValueError(f"AdaLoRA does not support init_lora_weights={self.init_lora_weights!r}; use True")

    def _check_schedule(self) -> None:
        """The budget schedule needs a run length, a warm-up and a final phase that leave room to prune."""
        if self.total_step is None or self.total_step <= 0:
            got = "is None" if self.total_step is None else f"is {self.total_step}"
            raise ValueError(
                f"AdaLoRA does not work when `total_step` {got}, supply a value > 0. It is the number of optimizer "
                "steps of the run, over which the rank budget schedule is laid out; e.g. "
                "total_step=len(train_dataloader) * num_epochs"
            )
        if self.init_r <= 0 or not 0 <= self.target_r <= self.init_r:
            raise ValueError(
                f"need 0 <= target_r <= init_r and init_r > 0; got target_r={self.target_r}, init_r={self.init_r}"
            )
        if self.orth_reg_weight < 0:
            raise ValueError(
                "`orth_reg_weight` should be greater than or equal to 0, but the value passed is "
                f"{self.orth_reg_weight}; it weighs the orthogonality penalty (peft's default: 0.5)"
            )
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(
                "The supplied schedule values don't allow for a budgeting phase. Decrease `tfinal`/`tinit` or "
                f"increase `total_step` (tinit={self.tinit}, tfinal={self.tfinal} and total_step={self.total_step} "
                "leave no step between them: need tinit < total_step - tfinal)"
            )
        if self.deltaT < 1:
            raise ValueError(f"deltaT={self.deltaT} must be a positive number of steps")
        for name in ("beta1", "beta2"):
            check_range(name, getattr(self, name), 1e-12, 1.0, "use an EMA factor in (0, 1) such as 0.85")


class SVDAdapter(nn.Module):
    """One adapter's P, Λ, Q for one layer, its scale, and the allocator's running statistics."""

    def __init__(self, in_features: int, out_features: int, r: int, config: AdaLoraConfig, device) -> None:
        super().__init__()
        self.config = config  # the allocator reads the schedule from here (a plain attribute, not saved)
        self.scaling = config.lora_alpha if config.lora_alpha > 0 else float(r)
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        make = "meta" if str(device) == "meta" else "cpu"  # draw on the CPU: the same seed gives peft's values
        # Drawn in peft's order (Q, Λ, P, then one value for the rank), so a seed gives peft's init.
        lora_A = torch.randn(r, in_features, device=make)  # Q: (r, in)
        lora_E = torch.randn(r, 1, device=make)  # Λ: (r, 1)
        lora_B = torch.randn(out_features, r, device=make)  # P: (out, r)
        torch.randn(1, device=make)
        if config.init_lora_weights:
            nn.init.zeros_(lora_E)
            nn.init.normal_(lora_A, mean=0.0, std=0.02)
            nn.init.normal_(lora_B, mean=0.0, std=0.02)
        self.lora_A = nn.Parameter(lora_A.to(device))
        self.lora_B = nn.Parameter(lora_B.to(device))
        self.lora_E = nn.Parameter(lora_E.to(device))
        self.stats: dict[str, dict[str, torch.Tensor]] = {}  # importance EMAs, per parameter name

    def delta_weight(self, ranknum: torch.Tensor) -> torch.Tensor:
        """The update P diag(Λ) Q * scale / rank, shaped (out, in) (`ranknum`: the layer's, see `SVDLayer`)."""
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scaling / (ranknum + 1e-5)


def _in_out(base: nn.Module) -> tuple[int, int]:
    if isinstance(base, nn.Conv2d):  # the kernel as a matrix (out, in * kH * kW), as peft
        if base.groups > 1:  # a grouped kernel holds in/groups channels: the update would not fit it
            raise ValueError(
                f"AdaLoRA does not support a Conv2d with groups={base.groups} (peft's update is shaped for "
                "groups=1); leave it out of target_modules or use LoraConfig"
            )
        return base.in_channels * base.kernel_size[0] * base.kernel_size[1], base.out_channels
    if is_conv1d(base) or (hasattr(base, "in_features") and hasattr(base, "out_features")):
        return layer_dims(base)
    raise TypeError(
        f"AdaLoRA supports nn.Linear, Conv1D, nn.Conv2d and bitsandbytes linear layers, not {type(base).__name__}; "
        "choose other target_modules"
    )


class SVDLayer(MergeableLayer):
    """A linear layer (Linear, Conv1D or bitsandbytes 4/8-bit) or an nn.Conv2d with AdaLoRA adapters beside it."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = _in_out(base_layer)
        # Per adapter, the rank the scale divides by: init_r, also after pruning (as peft), so pruning does not
        # rescale. A frozen parameter beside the adapters, as peft keeps it: counted among all parameters,
        # never trained (its name has no `.adapters.`) and not saved in the adapter file.
        self.ranknum = nn.ParameterDict()

    def add(self, name: str, rank: int, config: AdaLoraConfig) -> None:
        device = self.base_layer.weight.device
        self.adapters[name] = SVDAdapter(self.in_features, self.out_features, rank, config, device)
        ranknum = torch.full((1,), float(config.init_r), device=device)
        self.ranknum[name] = nn.Parameter(ranknum, requires_grad=False)

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        if name in self.ranknum:
            del self.ranknum[name]

    def rank_divisor(self, name: str) -> torch.Tensor:
        """Adapter `name`'s ranknum in the adapter's dtype (which autocast_adapter_dtype may have changed)."""
        return self.ranknum[name].to(self.adapters[name].lora_A.dtype)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        delta = self.adapters[adapter_name].delta_weight(self.rank_divisor(adapter_name))
        return delta.T if is_conv1d(self.base_layer) else delta

    def resize(self, name: str, rank: int) -> None:
        """Rebuild adapter `name` at `rank` (the values are loaded next); ranknum stays init_r."""
        old = self.adapters[name]
        new = SVDAdapter(self.in_features, self.out_features, rank, old.config, old.lora_A.device)
        new.requires_grad_(old.lora_A.requires_grad)
        self.adapters[name] = new

    def _base_weight_delta(self, name: str) -> torch.Tensor:
        delta = super()._base_weight_delta(name)
        return delta.reshape(self.base_layer.weight.shape) if isinstance(self.base_layer, nn.Conv2d) else delta

    def adapter_forward(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        a = self.adapters[name]
        x = x.to(a.lora_A.dtype)
        if isinstance(self.base_layer, nn.Conv2d):  # the update as a second kernel, in peft's order of operations
            base = self.base_layer
            kernel = self._base_weight_delta(name)  # (out, in, kH, kW)
            update = F.conv2d(a.dropout(x), kernel, None, base.stride, base.padding, base.dilation, base.groups)
            return (result + update).to(result.dtype)
        # Same operations in the same order as peft, so outputs match bit for bit.
        ranknum = self.rank_divisor(name)
        update = (a.dropout(x) @ (a.lora_A * a.lora_E).T @ a.lora_B.T) * a.scaling / (ranknum + 1e-5)  # (B, T, out)
        return (result + update).to(result.dtype)  # added in the adapter's dtype, rounded once (peft's `+=`)


def refuse_second_trainable(model: nn.Module, config: AdaLoraConfig, adapter_name: str) -> None:
    """One trainable AdaLoRA adapter per model: the rank allocator budgets the ranks of a single adapter."""
    if config.inference_mode:
        return
    training = sorted(
        {
            name
            for m in model.modules()
            if isinstance(m, SVDLayer)
            for name, a in m.adapters.items()
            if name != adapter_name and not a.config.inference_mode
        }
    )
    if training:  # the first sentence is peft's, which its tests match
        raise ValueError(
            "AdaLoraModel supports only 1 trainable adapter. When using multiple adapters, set inference_mode to "
            f"True for all adapters except the one you want to train ({training[0]!r} trains already; add "
            f"{adapter_name!r} with inference_mode=True, or load it with is_trainable=False)"
        )


def add_adalora(model: nn.Module, config: AdaLoraConfig, adapter_name: str) -> None:
    """Wrap every targeted module in an `SVDLayer` with adapter `adapter_name` at rank init_r.

    A `rank_pattern` in the config is applied when weights are loaded (`load_rank_pattern`), as in peft.
    """
    refuse_second_trainable(model, config, adapter_name)
    prepare_replication(model, config.layer_replication, adapter_name)  # deepen the model first, as peft (and LoRA)
    targets = find_targets(model, config, DEFAULT_TARGET_MODULES)
    tokens = plan_trainable_tokens(model, config, targets)  # checked before any layer is changed
    for _, module in wrap_targets(model, targets, SVDLayer):
        module.add(adapter_name, config.init_r, config)
    wrap_modules_to_save(model, config.modules_to_save, adapter_name)
    add_trainable_tokens(model, tokens, adapter_name)  # token rows train beside it, as with LoRA


# ---- the rank allocator --------------------------------------------------------------------------------------
def _adapters(model: nn.Module, name: str) -> list[tuple[str, SVDAdapter]]:
    """(module name, adapter) for every layer holding AdaLoRA adapter `name`, in model order."""
    return [(n, m.adapters[name]) for n, m in model.named_modules() if isinstance(m, SVDLayer) and name in m.adapters]


def budget_schedule(config: AdaLoraConfig, step: int, init_budget: int, target_budget: int) -> tuple[int, bool]:
    """(total rank allowed at `step`, whether to prune now): flat, cubic decrease, flat."""
    if step <= config.tinit:
        return init_budget, False
    if step > config.total_step - config.tfinal:
        return target_budget, True
    remaining = 1 - (step - config.tinit) / (config.total_step - config.tfinal - config.tinit)
    budget = int((init_budget - target_budget) * remaining**3 + target_budget)
    return budget, step % config.deltaT == 0


def update_importance(adapters: list[tuple[str, SVDAdapter]], beta1: float, beta2: float) -> None:
    """Fold this step's sensitivity |θ ∂L/∂θ| into each parameter's smoothed importance and uncertainty."""
    with torch.no_grad():
        for module_name, adapter in adapters:
            for key in ("lora_A", "lora_B", "lora_E"):
                param = getattr(adapter, key)
                if param.grad is None:
                    raise RuntimeError(
                        f"{module_name}.{key} has no gradient: call update_and_allocate(step) after loss.backward() "
                        "and before optimizer.zero_grad()"
                    )
                stats = adapter.stats.setdefault(key, {"avg": torch.zeros_like(param), "unc": torch.zeros_like(param)})
                sensitivity = (param * param.grad).abs()
                stats["avg"] = beta1 * stats["avg"] + (1 - beta1) * sensitivity
                stats["unc"] = beta2 * stats["unc"] + (1 - beta2) * (sensitivity - stats["avg"]).abs()


def triplet_scores(adapter: SVDAdapter) -> torch.Tensor:
    """Score of each of the adapter's triplets (r,): Λ_i's score plus the mean scores of Q's row i and P's column i."""
    score = {key: s["avg"] * s["unc"] for key, s in adapter.stats.items()}
    rows_a = score["lora_A"].mean(dim=1, keepdim=True)  # (r, 1)
    cols_b = score["lora_B"].mean(dim=0, keepdim=False).view(-1, 1)  # (r, 1)
    return score["lora_E"].view(-1) + torch.cat([rows_a, cols_b], dim=1).sum(dim=1).view(-1)


def mask_to_budget(adapters: list[tuple[str, SVDAdapter]], budget: int) -> dict[str, list[bool]]:
    """Zero the Λ entries of the lowest-scoring triplets so `budget` remain; return the rank pattern."""
    if any(not a.stats for _, a in adapters):
        raise RuntimeError("no importance scores yet: update_and_allocate must run at least once before pruning")
    scores = [triplet_scores(adapter) for _, adapter in adapters]
    all_scores = torch.cat(scores)
    to_prune = all_scores.numel() - budget
    threshold = torch.kthvalue(all_scores, k=to_prune)[0].item() if to_prune > 0 else -float("inf")
    pattern = {}
    with torch.no_grad():
        for (module_name, adapter), score in zip(adapters, scores, strict=True):
            pruned = (score <= threshold).view(-1, 1)  # (r, 1)
            adapter.lora_E.masked_fill_(pruned, 0.0)
            pattern[f"{module_name}.lora_E"] = (~pruned).view(-1).tolist()
    return pattern


def mask_by_pattern(adapters: list[tuple[str, SVDAdapter]], pattern: dict[str, list[bool]]) -> None:
    """Keep pruned triplets at zero during the final phase (the optimizer would revive them)."""
    with torch.no_grad():
        for module_name, adapter in adapters:
            keep = torch.tensor(pattern[f"{module_name}.lora_E"], device=adapter.lora_E.device).view(-1, 1)
            adapter.lora_E.masked_fill_(~keep, 0.0)


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a `PeftModel` or its `base_model`, else `model` itself."""
    if isinstance(model, PeftModel):
        return model.get_base_model()
    return model.model if isinstance(model, TunerModel) else model


def trainable_adapter(model: nn.Module) -> tuple[str, AdaLoraConfig, list[tuple[str, SVDAdapter]]]:
    """The AdaLoRA adapter being trained (the active one) in a transformers model."""
    layers = [m for m in model.modules() if isinstance(m, SVDLayer)]
    if not layers:
        raise ValueError("update_and_allocate is AdaLoRA's rank budget step, but this model holds no AdaLoRA adapter")
    name = next((n for m in layers for n in m.active_adapters if n in m.adapters), None) or next(
        iter(layers[0].adapters)
    )
    adapters = _adapters(model, name)
    config = adapters[0][1].config
    if config.inference_mode:
        raise ValueError(
            f"AdaLoRA adapter {name!r} was loaded for inference; load it with is_trainable=True to train it"
        )
    return name, config, adapters


def update_and_allocate(model: nn.Module, global_step: int) -> int:
    """AdaLoRA's step: update importance scores and prune to the budget of `global_step` (peft's method name).

    Call it after `loss.backward()` (and `optimizer.step()`) and before `optimizer.zero_grad()`, with the
    number of the optimizer step; `AdaLoraCallback` does this inside `transformers.Trainer`.

    Args:
        model: the transformers model holding the adapters (or a `PeftModel`).
        global_step: the optimizer step, counted as the schedule counts it (up to `total_step`).

    Returns:
        The total rank budget at this step.
    """
    name, config, adapters = trainable_adapter(transformers_model(model))
    init_budget = config.init_r * len(adapters)
    target_budget = config.target_r * len(adapters)
    last = config.total_step - config.tfinal
    if global_step < last:
        update_importance(adapters, config.beta1, config.beta2)
        budget, prune_now = budget_schedule(config, global_step, init_budget, target_budget)
        if prune_now:
            config.rank_pattern = mask_to_budget(adapters, budget)
        return budget
    if global_step == last or config.rank_pattern is None:  # the final allocation
        config.rank_pattern = mask_to_budget(adapters, target_budget)
        for _, adapter in adapters:
            adapter.stats = {}
        logger.info("AdaLoRA: final rank budget %d reached at step %d", target_budget, global_step)
    else:
        mask_by_pattern(adapters, config.rank_pattern)
    return target_budget


# ---- PeftModel hooks: the orthogonality penalty and the pruned file layout -----------------------------------
def add_orthogonal_regularizer(peft_model: nn.Module, outputs: Any) -> Any:
    """Add orth_reg_weight * mean(||QQᵀ - I||_F, ||PᵀP - I||_F) to `outputs.loss` (when there is a loss)."""
    loss = getattr(outputs, "loss", None)
    config = peft_model.active_peft_config
    if not isinstance(loss, torch.Tensor) or config.inference_mode:
        return outputs
    penalty, count = 0, 0
    for _, adapter in _adapters(peft_model.get_base_model(), peft_model.active_adapter):
        for cov in (adapter.lora_A @ adapter.lora_A.T, adapter.lora_B.T @ adapter.lora_B):  # (r, r) each
            eye = torch.eye(*cov.size(), out=torch.empty_like(cov))
            penalty = penalty + torch.norm(cov - eye, p="fro")
            count += 1
    if count:
        outputs.loss = loss + config.orth_reg_weight * (penalty / count)
    return outputs


def _module_of(pattern_key: str, adapter_name: str) -> str:
    """'model.layers.0.self_attn.q_proj.lora_E[.default]' -> 'model.layers.0.self_attn.q_proj'."""
    key = pattern_key.removesuffix(f".{adapter_name}")
    return key.removesuffix(".lora_E")


def pruned_tensors(peft_model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor]) -> dict:
    """For the file: keep only the triplets the rank pattern keeps (peft's layout)."""
    config = peft_model.peft_config[adapter_name]
    if not config.rank_pattern:
        return tensors
    config.rank_pattern = {_module_of(k, adapter_name) + ".lora_E": v for k, v in config.rank_pattern.items()}
    out = dict(tensors)
    for key, keep in config.rank_pattern.items():
        prefix = f"base_model.model.{_module_of(key, adapter_name)}"
        keep = torch.tensor(keep, dtype=torch.bool)
        for part, dim in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
            tensor = out[f"{prefix}.{part}"]
            if tensor.shape[dim] != int(keep.sum()):  # still at init_r: drop the pruned triplets
                out[f"{prefix}.{part}"] = tensor[keep] if dim == 0 else tensor[:, keep]
    return out


def load_rank_pattern(peft_model: nn.Module, weights: dict, adapter_name: str, source: str) -> dict:
    """Before loading: rebuild each module at the rank its pattern keeps, so the pruned tensors fit."""
    config = peft_model.peft_config[adapter_name]
    model = peft_model.get_base_model()
    for key, keep in (config.rank_pattern or {}).items():
        module_name = _module_of(key, adapter_name)
        try:
            layer = model.get_submodule(module_name)
        except AttributeError:
            raise ValueError(
                f"{source}: rank_pattern names {module_name}, which this model does not have; the adapter was "
                "trained on another architecture"
            ) from None
        layer.resize(adapter_name, int(sum(bool(k) for k in keep)))
    return weights


# The Method fields AdaLoRA registers beside the LoRA family's (see deltatune.core.registry.Method).
ADALORA_HOOKS = dict(
    after_forward=add_orthogonal_regularizer,
    to_file=pruned_tensors,
    from_file=load_rank_pattern,
    update_and_allocate=update_and_allocate,
)
