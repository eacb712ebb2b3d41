"""Training data for the command line: read, check, format with a prompt template, tokenize, batch.

Accepted sources (`--data`):
- alpaca rows in a JSON list or a JSONL file: `{"instruction": ..., "input": ..., "output": ...}`
  (`input` optional; optional `system` and `history` = [[instruction, output], ...], the turns before this one);
- chat rows in JSONL/JSON: `{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}`;
- ShareGPT rows: `{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}`;
- CSV and Parquet files of such columns (see data_formats; `--columns` renames other column names);
- a folder written by `datasets`' `save_to_disk` (a Dataset, or a DatasetDict whose split is chosen);
- a hub dataset name, only when the hub is reachable (a clear error says what to do offline).

Prompts use the tokenizer's chat template when it has one, else the tutorials' template
`Human: {instruction}\\n{input}\\n\\nAssistant: {output}`. The loss counts only response tokens: prompt
and padding positions get the label -100 (with `train_on="last"`, the earlier answers of a conversation too).
Sequences are cut at `max_length` from the end, so the prompt is kept whole and rows whose prompt leaves no room
for a single response token are dropped. Tokenized rows can be cached by the data's fingerprint (`encode_cached`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch

from deltatune.cli.data_formats import (
    DataError,
    parse_columns,
    read_table_rows,
    rename_columns,
    sharegpt_messages,
    table_format,
)

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value the loss skips
ANSWER_CUE = "\n\nAssistant: "
TEMPLATES = ("auto", "chat", "human-assistant")
TRAIN_ON = ("all", "last")  # which assistant turns of a conversation the loss counts
BUNDLED_TRAIN = "sample_train.jsonl"
BUNDLED_EVAL = "sample_eval.jsonl"


# ---- reading ------------------------------------------------------------------------------------------------
def bundled_path(name: str) -> str:
    """Path of a file of the bundled sample set (package data under deltatune/data/)."""
    return str(resources.files("deltatune").joinpath("data", name))


def _too_deep(where: str) -> DataError:
    return DataError(
        f"{where}: the JSON is nested too deeply to read (thousands of levels of [ or {{); a row is one object "
        'of strings, as in {"instruction": ..., "output": ...}'
    )


def _parse_jsonl(path: str, text: str) -> list[tuple[int, Any]]:
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((line_no, json.loads(line)))
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}, row {line_no}: not valid JSON ({err.msg}); each line of a .jsonl file is one JSON object"
            ) from None
        except RecursionError:
            raise _too_deep(f"{path}, row {line_no}") from None
    return rows


def read_json_rows(path: str, flag: str = "--data") -> list[tuple[int, Any]]:
    """(row number, object) pairs from a JSON list or a JSONL file; row numbers are 1-based (JSONL: line)."""
    if not os.path.isfile(path):
        raise DataError(f"data file {path} not found; pass {flag} with an existing .json/.jsonl file or dataset folder")
    try:
        with open(path, encoding="utf-8-sig") as handle:  # -sig: a leading BOM (Windows editors) is dropped
            text = handle.read()
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text; the data must be JSON or JSON Lines") from None
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}: not valid JSON ({err.msg} at line {err.lineno}); fix the file or use one JSON object per line"
            ) from None
        except RecursionError:
            raise _too_deep(path) from None
        return list(enumerate(data, start=1))
    if text.lstrip().startswith("{") and not path.endswith(".jsonl"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return _parse_jsonl(path, text)  # several objects: JSON Lines in a .json file
        except RecursionError:
            raise _too_deep(path) from None
        for key in ("data", "train", "rows"):
            if isinstance(data.get(key), list):
                return list(enumerate(data[key], start=1))
        return [(1, data)]
    return _parse_jsonl(path, text)  # errors name the row (line) that is not JSON


def check_row(row: Any, where: str) -> dict[str, Any]:
    """Validate one row and return it as alpaca fields or `messages`."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object, not {type(row).__name__}")
    if "messages" in row:
        return {"messages": _check_messages(row["messages"], where)}
    if "conversations" in row:  # ShareGPT
        return {"messages": _check_messages(sharegpt_messages(row["conversations"], where), where)}
    missing = [k for k in ("instruction", "output") if k not in row]
    if missing:
        raise DataError(
            f"{where}: no {' and no '.join(repr(k) for k in missing)} field; alpaca rows need 'instruction' and "
            f"'output' ('input' is optional), chat rows need 'messages' or ShareGPT 'conversations' "
            f"(this row has: {', '.join(map(repr, row)) or 'nothing'})"
        )
    nulls = [k for k in ("instruction", "output") if row[k] is None]
    if nulls:
        raise DataError(
            f"{where}: {' and '.join(repr(k) for k in nulls)} is null; give it as a string, or remove the row"
        )
    fields = {k: row.get(k) if row.get(k) is not None else "" for k in ("instruction", "input", "output")}
    for key, value in fields.items():
        if not isinstance(value, str):
            raise DataError(f"{where}: {key!r} must be a string, not {type(value).__name__}")
    if not fields["output"].strip():
        raise DataError(f"{where}: 'output' is empty; every row needs a response to learn from")
    return fields | _check_alpaca_context(row, where)


def _check_alpaca_context(row: dict[str, Any], where: str) -> dict[str, Any]:
    """Alpaca's optional `system` (a string) and `history` ([[instruction, output], ...], the turns before this
    one); kept only when given, so plain rows stay three fields."""
    context: dict[str, Any] = {}
    if row.get("system") is not None:
        if not isinstance(row["system"], str):
            raise DataError(f"{where}: 'system' must be a string, not {type(row['system']).__name__}")
        if row["system"].strip():
            context["system"] = row["system"]
    history = row.get("history")
    if history is None or history == []:
        return context
    pairs = history if isinstance(history, list) else None
    if pairs is None or not all(
        isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair) for pair in pairs
    ):
        raise DataError(
            f"{where}: 'history' must be a list of [instruction, output] string pairs, the turns before this one"
        )
    return context | {"history": [[instruction, output] for instruction, output in pairs]}


def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role': ..., 'content': ...}}")
    for i, message in enumerate(messages):
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("role"), str)
            or not isinstance(message.get("content"), str)
        ):
            raise DataError(f"{where}: messages[{i}] needs a string 'role' and a string 'content'")
    if messages[0]["role"] == "assistant":
        raise DataError(
            f"{where}: 'messages' starts with an assistant turn; put the user turn it answers (or a system turn) first"
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: 'messages' has no assistant turn; the loss is computed on assistant turns only")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _load_saved_dataset(path: str, split: str, flag: str) -> list[tuple[int, Any]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except FileNotFoundError:
        raise DataError(
            f"{flag} {path}: the folder is not a dataset written by datasets' save_to_disk; pass such a "
            "folder or a .json/.jsonl file"
        ) from None
    except IndexError:  # datasets cannot open a saved dataset of 0 rows (no data file to read)
        raise DataError(
            f"{flag} {path}: the saved dataset holds no rows; the data needs at least one example"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path}: the dataset has splits {list(loaded)}, not {split!r}; pass --split")
        loaded = loaded[split]
    return list(enumerate(loaded, start=1))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub can be reached (offline mode or no route: False)."""
    if (
        os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    ):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _load_hub_dataset(name: str, split: str, flag: str) -> list[tuple[int, Any]]:
    if not hub_reachable():
        raise DataError(
            f"{flag} {name}: not a local file or folder, and the Hugging Face hub is not reachable (offline). "
            f"On a machine with network run: python -c \"import datasets; datasets.load_dataset('{name}', "
            f"split='{split}').save_to_disk('my_data')\", copy my_data here and pass {flag} my_data"
        )
    import datasets

    try:
        return list(enumerate(datasets.load_dataset(name, split=split), start=1))
    except Exception as err:  # the hub raises many types; the message matters here
        raise DataError(f"{flag} {name}: could not load it from the hub ({type(err).__name__}: {err})") from None


def load_rows(
    source: str | None, split: str = "train", flag: str = "--data", columns: str | None = None
) -> list[dict[str, Any]]:
    """All rows of a data source, checked (see the module docstring); None is the bundled sample set.

    `flag` is the option that named the source (`--data`, `--eval-data`), for the errors; `columns` renames the
    source's columns to deltatune's fields (`instruction=question,output=answer`).
    """
    source = source or bundled_path(BUNDLED_TRAIN)
    mapping = parse_columns(columns)  # a bad --columns fails before any file is read
    if os.path.isdir(source):
        raw, name = _load_saved_dataset(source, split, flag), source
    elif table_format(source):
        raw, name = read_table_rows(source, table_format(source), flag), source
    elif (
        os.path.isfile(source)
        or source.endswith((".json", ".jsonl"))
        or os.sep in source
        and not _looks_like_hub_id(source)
    ):
        raw, name = read_json_rows(source, flag), source
    else:
        raw, name = _load_hub_dataset(source, split, flag), source
    raw = rename_columns(raw, mapping, name)
    rows = [check_row(row, f"{name}, row {n}") for n, row in raw]
    if not rows:
        raise DataError(f"{name} holds no rows; the data needs at least one example")
    return rows


def _looks_like_hub_id(source: str) -> bool:
    return source.count("/") == 1 and not source.startswith((".", "/", "~"))


# ---- formatting -----------------------------------------------------------------------------------------------
def to_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """A row as chat messages (alpaca: the system turn if any, a user and an assistant turn per `history` pair,
    then one user turn = instruction + input, one assistant turn = output)."""
    if "messages" in row:
        return row["messages"]
    messages = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    for instruction, output in row.get("history", []):
        messages += [{"role": "user", "content": instruction}, {"role": "assistant", "content": output}]
    user = row["instruction"] + ("\n" + row["input"] if row["input"] else "")
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]


def resolve_template(template: str, tokenizer: Any) -> str:
    """`auto` -> `chat` when the tokenizer has a chat template, else `human-assistant`."""
    if template not in TEMPLATES:
        raise ValueError(f"--template {template!r} is not known; use one of: {', '.join(TEMPLATES)}")
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has_chat:
        raise ValueError("--template chat: this tokenizer has no chat template; use --template human-assistant")
    if template == "auto":
        return "chat" if has_chat else "human-assistant"
    return template


def _human_assistant_prompt(history: list[dict[str, str]], eos: str) -> str:
    """The tutorials' prompt for the turns before an answer: `Human: {instruction}\\n{input}` (stripped) and the
    answer cue; a system turn goes first as plain text, earlier answers are written out in the same form."""
    text = ""
    for message in history:
        if message["role"] == "user":  # the user turn is instruction + "\\n" + input (see to_messages)
            text += "Human: " + message["content"].strip() + ANSWER_CUE
        elif message["role"] == "assistant":  # as it was trained: the answer, then EOS
            text += message["content"] + eos + "\n\n"
        else:
            text += message["content"] + "\n\n"
    return text


def segments(messages: list[dict[str, str]], template: str, tokenizer: Any) -> list[tuple[str, bool]]:
    """Split a conversation into (text, is_response) pieces; response pieces end with the EOS marker."""
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render_prompt(messages[:i], template, tokenizer)
        if template == "chat":
            full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        else:
            full = prompt + message["content"] + (tokenizer.eos_token or "")
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError(
                "the chat template does not render conversations as growing prefixes; use --template human-assistant"
            )
        pieces += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    return [(text, is_response) for text, is_response in pieces if text]


def render_prompt(history: list[dict[str, str]], template: str, tokenizer: Any) -> str:
    """The text the model sees before it answers (used for training, chat and exact-match)."""
    if template == "chat":
        return tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    return _human_assistant_prompt(history, tokenizer.eos_token or "")


# ---- tokenizing ---------------------------------------------------------------------------------------------
def encode(
    messages: list[dict[str, str]], template: str, tokenizer: Any, max_length: int, train_on: str = "all"
) -> dict[str, list[int]] | None:
    """input_ids + labels (-100 outside the trained responses), cut at max_length; None when no trained token fits.

    `train_on="all"` trains every assistant turn, `"last"` only the final one (earlier answers are context)."""
    input_ids: list[int] = []
    labels: list[int] = []
    bos = getattr(tokenizer, "bos_token_id", None)
    pieces = segments(messages, template, tokenizer)
    last_response = max((n for n, (_, is_response) in enumerate(pieces) if is_response), default=-1)
    for n, (text, is_response) in enumerate(pieces):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if n == 0 and template != "chat" and bos is not None and _adds_bos(tokenizer):
            ids = [bos] + ids
        trained = is_response and (train_on == "all" or n == last_response)
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": input_ids, "labels": labels}


def _adds_bos(tokenizer: Any) -> bool:
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def tokenize_rows(
    rows: list[dict[str, Any]],
    tokenizer: Any,
    template: str,
    max_length: int,
    source: str = "data",
    train_on: str = "all",
    cache_dir: str | None = None,
) -> list[dict[str, list[int]]]:
    """Encode every row; rows with no trained token inside max_length are dropped (all dropped: error).

    With `cache_dir`, the encoded rows are kept there under a key of the rows' fingerprint, the tokenizer, the
    template, max_length and train_on, so a second run on the same data does not tokenize again."""
    if max_length < 2:
        raise ValueError(f"--max-length {max_length} is too small; use at least a few hundred tokens")
    if train_on not in TRAIN_ON:
        raise ValueError(f"--train-on {train_on!r} is not known; use one of: {', '.join(TRAIN_ON)}")
    template = resolve_template(template, tokenizer)
    if cache_dir:
        encoded = encode_cached(rows, tokenizer, template, max_length, train_on, cache_dir)
    else:
        encoded = [encode(to_messages(row), template, tokenizer, max_length, train_on) for row in rows]
    kept = [e for e in encoded if e]
    if not kept:
        shortest = min(
            len(
                tokenizer(render_prompt(to_messages(r)[:-1], template, tokenizer), add_special_tokens=False)[
                    "input_ids"
                ]
            )
            for r in rows
        )
        raise DataError(
            f"--max-length {max_length} is too small for any response in {source}: the shortest prompt is "
            f"{shortest} tokens; raise --max-length above {shortest}"
        )
    if len(kept) < len(encoded):
        logger.warning(
            "%s: %d of %d rows dropped: their prompt fills --max-length %d",
            source,
            len(encoded) - len(kept),
            len(encoded),
            max_length,
        )
    cut = sum(1 for e in kept if len(e["input_ids"]) == max_length)
    if cut:
        logger.warning("%s: %d rows were cut at --max-length %d", source, cut, max_length)
    return kept


ENCODING_VERSION = 1  # part of the cache key: raise it when encode() changes what it makes


def encode_cached(
    rows: list[dict[str, Any]], tokenizer: Any, template: str, max_length: int, train_on: str, cache_dir: str
) -> list[dict[str, list[int]] | None]:
    """`encode` over the rows through `datasets.Dataset.map`, whose file in `cache_dir` is named by the rows'
    dataset fingerprint and the encoding settings: when that file exists, map reads it instead of tokenizing."""
    import datasets
    from datasets.fingerprint import Hasher

    # One JSON string per row: alpaca and chat rows mix in one file, which one Arrow schema cannot hold.
    table = datasets.Dataset.from_dict({"row": [json.dumps(row, ensure_ascii=False) for row in rows]})
    settings = [ENCODING_VERSION, _tokenizer_fingerprint(tokenizer), template, max_length, train_on]
    key = Hasher.hash([table._fingerprint, *settings])
    os.makedirs(cache_dir, exist_ok=True)
    encoded = table.map(
        _encode_json_row,
        fn_kwargs={"template": template, "tokenizer": tokenizer, "max_length": max_length, "train_on": train_on},
        remove_columns=["row"],
        cache_file_name=os.path.join(cache_dir, f"{key}.arrow"),
        new_fingerprint=key,
        desc="tokenizing",
    )
    return [example if example["input_ids"] else None for example in encoded.to_list()]


def _encode_json_row(example: dict[str, str], template: str, tokenizer: Any, max_length: int, train_on: str):
    encoded = encode(to_messages(json.loads(example["row"])), template, tokenizer, max_length, train_on)
    return encoded or {"input_ids": [], "labels": []}  # empty: dropped (no response token fits)


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    """What decides how text becomes ids: the vocabulary and rules (a fast tokenizer's JSON), special tokens and
    the chat template."""
    from datasets.fingerprint import Hasher

    backend = getattr(tokenizer, "backend_tokenizer", None)
    rules = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    specials = [tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, type(tokenizer).__name__]
    return Hasher.hash([rules, specials, getattr(tokenizer, "chat_template", None)])


@dataclass
class Collator:
    """Right-pads a batch: pad id in input_ids, 0 in attention_mask, -100 in labels."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        length = max(len(item["input_ids"]) for item in batch)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(batch), length), self.pad_token_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(batch), length), dtype=torch.long)  # (B, T)
        for i, item in enumerate(batch):
            n = len(item["input_ids"])
            input_ids[i, :n] = torch.tensor(item["input_ids"])
            labels[i, :n] = torch.tensor(item["labels"])
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def prompts_and_answers(rows: list[dict[str, Any]], tokenizer: Any, template: str) -> list[tuple[str, str]]:
    """(prompt text, reference answer) for exact-match: the last assistant turn is the answer."""
    template = resolve_template(template, tokenizer)
    pairs = []
    for row in rows:
        messages = to_messages(row)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        pairs.append((render_prompt(messages[:last], template, tokenizer), messages[last]["content"]))
    return pairs
