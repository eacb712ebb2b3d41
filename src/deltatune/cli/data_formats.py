"""Row formats and file types beyond alpaca JSON: ShareGPT rows, CSV and Parquet files, renamed columns.

- ShareGPT rows, `{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]}`, become the
  `messages` the chat path reads (`human`/`user` -> user, `gpt`/`assistant` -> assistant, `system` -> system).
- CSV and Parquet files (by extension) are read with `datasets.load_dataset("csv" | "parquet")`; each row is then
  checked like a JSON row.
- `--columns instruction=question,output=answer` maps deltatune's field names to a file's own column names.
"""

from __future__ import annotations

from typing import Any


class DataError(ValueError):
    """Bad training data: the message names the file, the row and the fix."""


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
TABLE_FORMATS = {".csv": "csv", ".parquet": "parquet"}  # file extension -> datasets' builder
FIELDS = ("instruction", "input", "output", "system", "history", "messages", "conversations")


def sharegpt_messages(conversations: Any, where: str) -> list[dict[str, str]]:
    """A ShareGPT `conversations` list as chat messages; a bad role or an empty list is refused by row."""
    if not isinstance(conversations, list) or not conversations:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of {{'from': ..., 'value': ...}}")
    messages = []
    for i, turn in enumerate(conversations):
        if (
            not isinstance(turn, dict)
            or not isinstance(turn.get("from"), str)
            or not isinstance(turn.get("value"), str)
        ):
            raise DataError(f"{where}: conversations[{i}] needs a string 'from' and a string 'value'")
        role = SHAREGPT_ROLES.get(turn["from"].lower())
        if role is None:
            raise DataError(
                f"{where}: conversations[{i}] has 'from' {turn['from']!r}; use one of: human, gpt, system "
                "(or user, assistant)"
            )
        messages.append({"role": role, "content": turn["value"]})
    return messages


def parse_columns(text: str | None) -> dict[str, str]:
    """`instruction=question,output=answer` -> {"instruction": "question", "output": "answer"}; unknown field: error."""
    if not text:
        return {}
    mapping = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        field, sep, column = (s.strip() for s in part.partition("="))
        if not sep or not field or not column:
            raise DataError(f"--columns {text!r}: {part!r} is not FIELD=COLUMN, as in instruction=question")
        if field not in FIELDS:
            raise DataError(f"--columns: unknown field {field!r}; deltatune's fields are: {', '.join(FIELDS)}")
        mapping[field] = column
    return mapping


def rename_columns(rows: list[tuple[int, Any]], mapping: dict[str, str], name: str) -> list[tuple[int, Any]]:
    """The rows with each mapped column renamed to deltatune's field; a column no row has is an error."""
    if not mapping:
        return rows
    columns = list(dict.fromkeys(key for _, row in rows if isinstance(row, dict) for key in row))
    missing = [column for column in mapping.values() if column not in columns]
    if missing:
        raise DataError(
            f"--columns: {name} has no column {' or '.join(map(repr, missing))}; its columns are: "
            f"{', '.join(map(repr, columns)) or 'none'}"
        )
    renamed = []
    for n, row in rows:
        if isinstance(row, dict):
            row = {k: v for k, v in row.items() if k not in mapping.values()} | {
                field: row[column] for field, column in mapping.items() if column in row
            }
        renamed.append((n, row))
    return renamed


def table_format(path: str) -> str | None:
    """`csv` or `parquet` for a file with that extension, else None."""
    for extension, builder in TABLE_FORMATS.items():
        if path.lower().endswith(extension):
            return builder
    return None


def read_table_rows(path: str, builder: str, flag: str = "--data") -> list[tuple[int, Any]]:
    """(row number, dict) pairs of a CSV or Parquet file, read through `datasets` (CSV rows count from 1 after the
    header line)."""
    import os

    import datasets

    if not os.path.isfile(path):
        raise DataError(f"data file {path} not found; pass {flag} with an existing .{builder} file")
    try:
        text_cells = {"features": _csv_text_features(path)} if builder == "csv" else {}
        table = datasets.load_dataset(builder, data_files=path, split="train", **text_cells)
    except Exception as err:  # pyarrow and pandas raise many types; the message matters here
        raise DataError(f"{path}: could not read it as {builder.upper()} ({type(err).__name__}: {err})") from None
    return list(enumerate(table, start=1))


def _csv_text_features(path: str) -> Any:
    """Every CSV column read as text: left to type inference, the answer "007" would become the integer 7."""
    import csv

    import datasets

    with open(path, encoding="utf-8-sig", newline="") as handle:
        header = next(csv.reader(handle), [])
    return datasets.Features({column: datasets.Value("string") for column in header})
