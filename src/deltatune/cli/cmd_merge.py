"""`deltatune merge`: fold a LoRA-family adapter into its base and save a plain `transformers` model.

The result loads with `AutoModelForCausalLM.from_pretrained(output)`, no deltatune needed. The adapter folder
is left as it is: it stays in peft's format, so engines that serve peft LoRA adapters (vLLM, TGI) take it.
A run trained on a 4-/8-bit base is merged onto the full-precision base.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable

from deltatune.cli.models import adapter_folder, load_model, read_run, resolve_model, resolve_precision
from deltatune.core.config import PeftConfig
from deltatune.core.files import give_default_mode
from deltatune.core.peft_model import PeftModel

logger = logging.getLogger(__name__)


def merge(
    adapter: str,
    output: str,
    model: str | None = None,
    overwrite: bool = False,
    cache_dir: str | None = None,
    trust_remote_code: bool = False,
    dtype: str = "auto",
    device: str = "auto",
) -> str:
    """Merge the adapter in `adapter` into its base model and save the merged model in `output`.

    The base loads in `dtype` on `device` (`--dtype` / `--device`; auto: the model's own dtype where the device
    runs it natively, else fp32), whatever precision the run trained in (a 4-/8-bit run merges into full weights).

    Raises:
        FileExistsError: `output` is not empty (and not `overwrite`).
        TypeError: the method adds nothing that can be folded into the weights (prompt methods, BitFit's
            trained biases are kept in a PeftModel instead).
    """
    if os.path.exists(output) and not os.path.isdir(output):
        raise FileExistsError(f"--output {output} is a file; give a folder for the merged model")
    if os.path.isdir(output) and os.listdir(output):
        if not overwrite:
            raise FileExistsError(f"--output {output} is not empty; pass --overwrite or choose another folder")
        if not os.path.isfile(os.path.join(output, "config.json")):
            raise FileExistsError(
                f"--output {output} holds files that are not a model; --overwrite replaces only a model folder, "
                "pick an empty or new folder"
            )
    if os.path.abspath(output) == os.path.abspath(adapter):
        raise ValueError("--output must differ from --adapter: the adapter folder stays as it is")
    folder = adapter_folder(adapter)
    run = read_run(adapter)
    if model is None:
        model = run.get("model") if run else PeftConfig.from_pretrained(folder).base_model_name_or_path
    cache = cache_dir or run.get("cache_dir")
    refuse_base_as_output(output, resolve_model(model, cache))
    precision = resolve_precision(model, cache, dtype, device, trust_remote_code)
    loaded = load_model(
        model, cache, device=precision.device, trust_remote_code=trust_remote_code, dtype=precision.dtype
    )
    peft_model = PeftModel.from_pretrained(loaded.model, folder)
    merged = peft_model.merge_and_unload()
    _save_replacing(output, lambda folder: (merged.save_pretrained(folder), loaded.tokenizer.save_pretrained(folder)))
    logger.info("merged model saved in %s (load it with AutoModelForCausalLM.from_pretrained)", output)
    return output


def refuse_base_as_output(output: str, base: str) -> None:
    """Writing the merged model over its own base would apply the adapter twice from then on (eval loads the base
    and adds the adapter again): refuse it."""
    if os.path.isdir(base) and os.path.realpath(output) == os.path.realpath(base):
        raise ValueError(
            f"--output {output} is the adapter's base model; merging into it would replace the base, and the "
            "adapter would then be applied twice; choose another --output"
        )


def _save_replacing(output: str, save: Callable[[str], object]) -> None:
    """`save(folder)` into a new folder beside `output`, then swap it in: a failed save leaves the old model whole."""
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    new = tempfile.mkdtemp(prefix=".merging-", dir=parent)
    try:
        give_default_mode(new)
        save(new)
        if os.path.isdir(output):
            old = tempfile.mkdtemp(prefix=".replaced-", dir=parent)
            os.replace(output, os.path.join(old, "model"))
            os.replace(new, output)
            shutil.rmtree(old)
        else:
            os.replace(new, output)
    finally:
        shutil.rmtree(new, ignore_errors=True)
