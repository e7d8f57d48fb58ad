"""File reading shared by the readers: text with an encoding fallback, CSV rows and JSONL records that
carry their line numbers, so that every error can name the file and line."""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

from llama_erc.data.schema import DataError, where


def read_text(path: Path) -> str:
    """The file's text. UTF-8 (with or without BOM) first; older MELD/IEMOCAP copies are cp1252, so fall
    back to it rather than fail. A missing file is a DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def read_csv_rows(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield (line, row) for each data row; the header must hold every `required` column.
    `line` is the physical line where the row starts (a quoted field may span lines)."""
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise DataError(f"{path}: empty file, expected a header with {required}") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"{where(path, 1)}: missing column(s) {missing}; header is {header}")
    line = reader.line_num + 1
    for fields in reader:
        if fields and any(f.strip() for f in fields):   # blank lines are not rows
            if len(fields) != len(header):
                raise DataError(f"{where(path, line)}: {len(fields)} fields, header has {len(header)}")
            yield line, dict(zip(header, fields, strict=True))
        line = reader.line_num + 1


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (line, object) for each non-blank line; each must be a JSON object. Split on line feeds only:
    str.splitlines would also split inside strings at U+2028 and friends, which JSON allows raw."""
    for line, text in enumerate(read_text(path).split("\n"), start=1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{where(path, line)}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where(path, line)}: expected a JSON object, got {type(obj).__name__}")
        yield line, obj


def read_json(path: Path):
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{where(path, e.lineno)}: invalid JSON ({e.msg})") from None


def parse_int(value: str, column: str, at: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise DataError(f"{at}: column {column} must be an integer, got {value!r}") from None
