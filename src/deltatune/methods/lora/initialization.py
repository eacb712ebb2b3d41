"""LoRA initialisations read from the base weight: PiSSA, OLoRA and LoftQ (`LoraConfig.init_lora_weights`).

Plain LoRA starts with B = 0. These three start from the weight W (out x in) of each adapted layer instead,
with s = lora_alpha / r (or / sqrt(r) with rslora):

- PiSSA (Meng et al., 2024, arXiv:2404.02948), `"pissa"` / `"pissa_niter_N"`: the principal singular
  triplets W ~ U_r S_r V_r^T go to the adapter, the rest stays frozen::

      B = U_r sqrt(S_r / s)   (out x r)     A = sqrt(S_r / s) V_r^T   (r x in)     W <- W - s B A

  `"pissa"` takes a full SVD; `"pissa_niter_N"` the randomized SVD of Halko et al. (`torch.svd_lowrank`,
  N subspace iterations), which draws from the global RNG (the same draws as peft for the same seed).
- OLoRA (Büyükakyüz, 2024, arXiv:2406.01775), `"olora"`: a thin QR, W = Q R, gives an orthonormal B::

      B = Q[:, :r]   A = R[:r]   W <- W - s B A

  Both leave the model's outputs unchanged at the start (the base holds the residual). The adapter and the
  residual base belong together: `PeftModel.save_pretrained(..., path_initial_model_for_weight_conversion=dir)`
  turns a trained adapter into a plain LoRA of rank 2r for the ORIGINAL base (`convert_to_plain_lora`).
- LoftQ (Li et al., 2023, arXiv:2310.08659), `"loftq"` with `loftq_config=LoftQConfig(...)`: the base will be
  loaded quantised, so start from Q = quant(W) and let the adapter carry the quantisation error. Alternate T
  times (`loftq_iter`)::

      Q_t = dequant(quant(W - B_{t-1} A_{t-1}))     B_t A_t = best rank-r approximation of W - Q_t (SVD)

  W is replaced by Q_T (in full precision; save it and load it in 4-bit later). As in peft, A and B are not
  divided by s: use lora_alpha = r so that Q + s B A approximates W. Quantisation is bitsandbytes' NF4
  (blocks of 64, no double quantisation) or LLM.int8(), computed as peft does, on CUDA when there is one.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
from dataclasses import dataclass

import torch
from torch import nn

from deltatune.core.config import PeftType
from deltatune.core.files import CONFIG_NAME, atomic_write_text, load_weights
from deltatune.quantization import is_quantized_linear, readable_weight, requantize, require_bitsandbytes

logger = logging.getLogger(__name__)

_PISSA = re.compile(r"pissa(?:_niter_(\d+))?")
ALLOWED_INITS = "True, False, 'gaussian', 'pissa', 'pissa_niter_[N]' (N an integer >= 0), 'olora' or 'loftq'"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class LoftQConfig:
    """LoftQ settings (peft's field names and defaults), given as `LoraConfig(loftq_config=...)`.

    Attributes:
        loftq_bits: bits of the quantised base: 4 (NF4) or 8 (LLM.int8()).
        loftq_iter: alternating quantise / SVD steps; 1 is the paper's usual setting.
    """

    loftq_bits: int = 4
    loftq_iter: int = 1


def reads_base_weight(init: bool | str) -> bool:
    """True for the initialisations that set A and B from the base weight (and change that weight)."""
    return isinstance(init, str) and init != "gaussian"


def check_init_lora_weights(init: bool | str, loftq_config: LoftQConfig | dict) -> dict:
    """Validate `init_lora_weights` with `loftq_config`; returns `loftq_config` as a dict (as peft stores it).

    Raises:
        ValueError: an unknown `init_lora_weights`, "loftq" without a `loftq_config`, or bad LoftQ fields.
    """
    known = init in (True, False, "gaussian", "olora", "loftq") or (isinstance(init, str) and _PISSA.fullmatch(init))
    if not known:
        raise ValueError(f"init_lora_weights={init!r} is not known; use {ALLOWED_INITS}")
    if isinstance(loftq_config, LoftQConfig):
        loftq_config = vars(loftq_config).copy()
    loftq_config = dict(loftq_config or {})
    if init != "loftq":
        if loftq_config:  # as peft: ignored (and dropped) unless LoftQ is asked for
            logger.warning("loftq_config is ignored because init_lora_weights=%r is not 'loftq'", init)
        return {}
    if not loftq_config:
        raise ValueError("init_lora_weights='loftq' needs loftq_config, e.g. loftq_config=LoftQConfig(loftq_bits=4)")
    settings = {**vars(LoftQConfig()), **loftq_config}
    unknown = sorted(set(settings) - set(vars(LoftQConfig())))
    if unknown:
        raise ValueError(f"loftq_config has unknown fields {unknown}; LoftQConfig has loftq_bits and loftq_iter")
    if settings["loftq_bits"] not in (4, 8):
        raise ValueError(f"loftq_config['loftq_bits']={settings['loftq_bits']!r}; use 4 (NF4) or 8 (LLM.int8())")
    if not isinstance(settings["loftq_iter"], int) or settings["loftq_iter"] < 1:
        raise ValueError(f"loftq_config['loftq_iter']={settings['loftq_iter']!r}; use an integer >= 1, e.g. 1")
    return settings


def check_init_applies(
    module_name: str, base: nn.Module, shape: tuple[str, int, int], r: int, init: bool | str
) -> None:
    """Refuse, by module name, a base-weight initialisation on a layer it cannot work on (before any change).

    Args:
        module_name: the module's name in the model, for the message.
        base: the layer to be adapted; `shape` is its (kind, in_features, out_features).
        r: the adapter's rank there.
        init: `init_lora_weights`.

    Raises:
        ValueError: an embedding, convolution or attention layer, or r larger than the weight's smaller side.
        TypeError: a non-float base weight, or a quantised one for any init but OLoRA.
    """
    kind = shape[0]
    fix = "leave this module out of target_modules, or use init_lora_weights=True"
    if kind in ("embedding", "conv", "mha"):  # peft has these for linear layers only (a conv refuses them too)
        layer = {"embedding": "embedding", "conv": "convolution", "mha": "nn.MultiheadAttention"}[kind]
        raise ValueError(f"init_lora_weights={init!r} does not apply to the {layer} {module_name}; {fix}")
    if is_quantized_linear(base) and init == "olora":
        return _check_rank(module_name, shape, r, init)  # as peft: OLoRA dequantises, and quantises the residual
    if is_quantized_linear(base) or base.weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"init_lora_weights={init!r} needs a float32, float16 or bfloat16 weight, but {module_name} is a "
            f"{type(base).__name__} with dtype {base.weight.dtype}; load the base unquantised to initialise (then "
            "save the changed base and quantise it when loading; OLoRA also works on a 4-/8-bit base)"
        )
    _check_rank(module_name, shape, r, init)


def _check_rank(module_name: str, shape: tuple[str, int, int], r: int, init: bool | str) -> None:
    _, in_features, out_features = shape
    if r > min(in_features, out_features):
        raise ValueError(
            f"r={r} is larger than the smaller side of {module_name}'s weight ({out_features} x {in_features}), "
            f"so {init!r} has too few singular vectors; lower r, or set a smaller one in rank_pattern"
        )


@torch.no_grad()
def init_from_base(layer: nn.Module, adapter: nn.Module, init: str, loftq_config: dict) -> None:
    """Set `adapter`'s A and B from `layer`'s base weight and write back the residual (or quantised) weight."""
    weight = layer.base_layer.weight
    if weight.device.type == "meta":  # built empty to be filled from a file: nothing to decompose
        return
    conv1d = layer.kind == "conv1d"  # Conv1D stores W as (in, out)
    quantized = is_quantized_linear(layer.base_layer)  # OLoRA only (check_init_applies): W read dequantised
    w = readable_weight(layer.base_layer).to(torch.float32)  # (out, in) after the transpose below
    w = w.T if conv1d else w
    pissa = _PISSA.fullmatch(init)
    if pissa:
        niter = pissa.group(1)
        lora_a, lora_b = pissa_factors(
            w, adapter.lora_A.out_features, adapter.scaling, None if niter is None else int(niter)
        )
        new_w = w - adapter.scaling * lora_b @ lora_a  # (out, in); this order of products is peft's
    elif init == "olora":
        lora_a, lora_b = olora_factors(w, adapter.lora_A.out_features)
        new_w = w - adapter.scaling * lora_b @ lora_a
    else:
        new_w, lora_a, lora_b = loftq_factors(
            w, adapter.lora_A.out_features, loftq_config["loftq_bits"], loftq_config["loftq_iter"]
        )
        warn_if_loftq_scaled(adapter.scaling)
    adapter.lora_A.weight.copy_(lora_a)
    adapter.lora_B.weight.copy_(lora_b)
    if quantized:  # the residual goes back onto the 4-/8-bit grid (lossy, as in peft)
        requantize(layer.base_layer, new_w)
    else:
        weight.copy_((new_w.T if conv1d else new_w).to(weight.dtype))


def warn_if_loftq_scaled(scaling: float) -> None:
    """LoftQ's factors approximate W - Q at scale 1 (as in peft): say so when the adapter scales them."""
    if not math.isclose(scaling, 1.0):
        logger.warning(
            "LoftQ with lora_alpha / r = %s: A and B fit W - Q at scale 1 (as in peft); set "
            "lora_alpha = r for Q + s B A to approximate W",
            scaling,
        )


def pissa_factors(w: torch.Tensor, r: int, scaling: float, niter: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's (A, B) from the fp32 weight w (out x in): full SVD when `niter` is None, else randomized SVD."""
    if niter is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)  # (out, k), (k,), (k, in)
        u_r, s_r, vh_r = u[:, :r], s[:r] / scaling, vh[:r]
    else:
        u_r, s_r, v_r = torch.svd_lowrank(w, r, niter=niter)  # (out, r), (r,), (in, r); draws from the RNG
        s_r, vh_r = s_r / scaling, v_r.t()
    lora_a = torch.diag(torch.sqrt(s_r)) @ vh_r  # (r, in)
    lora_b = u_r @ torch.diag(torch.sqrt(s_r))  # (out, r)
    return lora_a, lora_b


def olora_factors(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """OLoRA's (A, B) from the fp32 weight w (out x in): the first r rows of R and columns of Q of w = Q R."""
    q, rr = torch.linalg.qr(w)  # (out, k), (k, in)
    return rr[:r].contiguous(), q[:, :r].contiguous()  # (r, in), (out, r)


def low_rank(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R), L R the best rank-r approximation of w, split as peft's LoftQ: L = U sqrt(S), R = sqrt(S) V^T."""
    u, s, vh = torch.linalg.svd(w, full_matrices=False)  # (out, k), (k,), (k, in)
    left = u @ torch.sqrt(torch.diag(s)[:, :r])  # (out, r)
    right = torch.sqrt(torch.diag(s)[:r, :]) @ vh  # (r, in)
    return left, right


def quantize_roundtrip(w: torch.Tensor, bits: int, int8_device: torch.device) -> torch.Tensor:
    """dequant(quant(w)) with bitsandbytes, as peft's LoftQ computes it (NF4 blocks of 64, or LLM.int8() rows;
    peft quantises int8 on the weight's own device, `int8_device`)."""
    bnb = require_bitsandbytes("init_lora_weights='loftq'")
    if bits == 4:
        q = bnb.nn.Params4bit(w.to("cpu"), requires_grad=False, compress_statistics=False, quant_type="nf4")
        q = q.to(w.device)
        return bnb.functional.dequantize_4bit(q.data, q.quant_state)  # (out, in) fp32
    q = bnb.nn.Int8Params(w.to("cpu"), requires_grad=False).to(int8_device)
    return bnb.functional.int8_vectorwise_dequant(q.data, q.SCB).to(w.device)  # (out, in) fp32


def loftq_factors(w: torch.Tensor, r: int, bits: int, iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ's (dequantised Q, A, B) for the fp32 weight w (out x in), on CUDA when available (as peft)."""
    device = w.device
    w = w.to("cuda" if torch.cuda.is_available() else device)
    residual = w.clone()
    for step in range(iters):
        dequantized = quantize_roundtrip(residual, bits, device)  # (out, in)
        left, right = low_rank(w - dequantized, r)  # the adapter carries the quantisation error
        if step + 1 < iters:
            residual = w - left @ right
    return dequantized.to(device), right.to(device), left.to(device)


def convert_to_plain_lora(state: dict[str, torch.Tensor], config, initial_folder: str | os.PathLike):
    """A PiSSA / OLoRA adapter trained from the factors saved in `initial_folder`, as a plain LoRA for the
    ORIGINAL base (peft's `subtract_mutated_init`): W_res + s B A = W + s (B A - B0 A0), so::

        A' = [A; A0]  (2r x in)     B' = [B, -B0]  (out x 2r)     r' = 2r, alpha' = 2 alpha (sqrt(2) alpha with rslora)

    Returns the new (tensors, config). Also rewrites `initial_folder`'s config with init_lora_weights=True, as
    peft does, so loading that folder onto the residual base later does not decompose it again.

    Raises:
        ValueError: not a LoRA config, or rslora with rank_pattern / alpha_pattern (the scale cannot be kept).
        FileNotFoundError: `initial_folder` holds no adapter weights.
    """
    if config.peft_type is not PeftType.LORA:
        raise ValueError("path_initial_model_for_weight_conversion only applies to LoRA adapters (PiSSA / OLoRA)")
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ValueError(
            "Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not supported here: the "
            "conversion cannot keep the scale with use_rslora=True and rank_pattern / alpha_pattern; train without "
            "one of them"
        )
    if not reads_base_weight(config.init_lora_weights) or config.init_lora_weights == "loftq":
        logger.warning(
            "path_initial_model_for_weight_conversion converts PiSSA / OLoRA adapters; this one has "
            "init_lora_weights=%r",
            config.init_lora_weights,
        )
    initial = load_weights(str(initial_folder))
    converted = dict(state)
    for key, value in state.items():
        if ".lora_A." in key:
            converted[key] = torch.cat([value, initial[key].to(value)], dim=0)  # (2r, in)
        elif ".lora_B." in key:
            converted[key] = torch.cat([value, -initial[key].to(value)], dim=1)  # (out, 2r)
    config = copy.deepcopy(config)
    config.init_lora_weights = True
    atomic_write_text(os.path.join(initial_folder, CONFIG_NAME), config.saved_json_string())
    config.r *= 2
    config.lora_alpha *= 2 if not config.use_rslora else 2**0.5  # the same scale for the rank-2r product
    config.rank_pattern = {key: 2 * value for key, value in config.rank_pattern.items()}
    config.alpha_pattern = {key: 2 * value for key, value in config.alpha_pattern.items()}
    return converted, config
