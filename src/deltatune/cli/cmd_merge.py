"""`deltatune merge`: fold a LoRA-family adapter into its base and save a plain `transformers` model.

The result loads with `AutoModelForCausalLM.from_pretrained(output)`, no deltatune needed. The adapter folder
is left as it is: it stays in peft's format, so engines that serve peft LoRA adapters (vLLM, TGI) take it.
A run trained on a 4-/8-bit base is merged onto the full-precision base.
"""

from __future__ import annotations

import logging
import os

from deltatune.cli.models import adapter_folder, load_model, read_run

logger = logging.getLogger(__name__)


def merge(adapter: str, output: str, model: str | None = None, overwrite: bool = False,
          cache_dir: str | None = None) -> str:  # fmt: skip
    """Merge the adapter in `adapter` into its base model and save the merged model in `output`.

    Raises:
        FileExistsError: `output` is not empty (and not `overwrite`).
        TypeError: the method adds nothing that can be folded into the weights (prompt methods, BitFit's
            trained biases are kept in a PeftModel instead).
    """
    from deltatune import PeftConfig, PeftModel

    if os.path.exists(output) and not os.path.isdir(output):
        raise FileExistsError(f"--output {output} is a file; give a folder for the merged model")
    if os.path.isdir(output) and os.listdir(output) and not overwrite:
        raise FileExistsError(f"--output {output} is not empty; pass --overwrite or choose another folder")
    if os.path.abspath(output) == os.path.abspath(adapter):
        raise ValueError("--output must differ from --adapter: the adapter folder stays as it is")
    folder = adapter_folder(adapter)
    run = read_run(adapter)
    if model is None:
        model = run.get("model") if run else PeftConfig.from_pretrained(folder).base_model_name_or_path
    loaded = load_model(model, cache_dir or run.get("cache_dir"))  # full precision, whatever the run used
    peft_model = PeftModel.from_pretrained(loaded.model, folder)
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(output)
    loaded.tokenizer.save_pretrained(output)
    logger.info("merged model saved in %s (load it with AutoModelForCausalLM.from_pretrained)", output)
    return output
