"""Small data files for the data-reading tests."""


def write(path, text: str) -> str:
    """Write `text` to `path` (UTF-8) and return the path as a string, as `load_rows` takes it."""
    path.write_text(text, encoding="utf-8")
    return str(path)
