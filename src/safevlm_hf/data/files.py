# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""Reading data files: the one reader behind every data format (the documented JSONL/JSON rows, VLGuard, the
evaluation benchmarks' CSV and JSON files, layer-wise prompt files).

Files are UTF-8, with or without a byte-order mark (editors leave one). Whatever cannot be read gives one
:class:`~.examples.SafetyDataError` naming the file and the line: bytes that are not UTF-8, invalid JSON, and JSON
nested so deeply that Python's parser gives up (a `RecursionError`, which would otherwise escape as a traceback). In a
JSON Lines file each line stands alone, so a bad line is a bad row (skippable with ``skip_bad_rows``); in a ``.json``
file the whole file is unreadable.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator

from .examples import SafetyDataError


_BOM = b"\xef\xbb\xbf"


def _not_utf8(where: str, err: UnicodeDecodeError, whole_file: bool) -> SafetyDataError:
    """The error for bytes that are not UTF-8, at the line (of a whole file) and column where decoding failed."""
    newline = b"\n"
    line_start = err.object.rfind(newline, 0, err.start) + 1
    if whole_file:
        where = f"{where}, line {err.object.count(newline, 0, err.start) + 1}"
    return SafetyDataError(
        f"{where}: not valid UTF-8 at column {err.start - line_start + 1} ({err.reason}); save the file as UTF-8."
    )


def _deepest_line(text: str) -> tuple[int, int]:
    """`(line, depth)` of the deepest `[`/`{` nesting in JSON text (strings skipped): where a RecursionError came from."""
    depth = deepest = 0
    line = deepest_line = 1
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > deepest:
                deepest, deepest_line = depth, line
        elif char in "]}":
            depth -= 1
        if char == "\n":
            line += 1
    return deepest_line, deepest


def _too_deep(where: str, depth: int) -> SafetyDataError:
    return SafetyDataError(
        f"{where}: JSON nested too deeply to parse ({depth} levels; Python's recursion limit is "
        f"{sys.getrecursionlimit()}); a data row is a flat object."
    )


def _parse_json(text: str, where: str, whole_file: bool) -> Any:
    """`json.loads` whose every failure is a SafetyDataError naming `where` (plus the line, for a whole file)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        line = f", line {err.lineno}" if whole_file else ""
        raise SafetyDataError(f"{where}{line}: not valid JSON ({err.msg} at column {err.colno}).") from None
    except RecursionError:
        line, depth = _deepest_line(text)
        raise _too_deep(f"{where}, line {line}" if whole_file else where, depth) from None


def read_text_file(path: str | os.PathLike) -> str:
    """A whole UTF-8 text file (a leading BOM dropped); bytes that are not UTF-8 name the file, line and column."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise SafetyDataError(f"{path}: cannot be read ({err.strerror or err}).") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise _not_utf8(str(path), err, whole_file=True) from None


def parse_json_text(text: str, where: str) -> Any:
    """Parse the text of a whole JSON file (from :func:`read_text_file`); errors name ``where`` and the line."""
    return _parse_json(text, where, whole_file=True)


def read_json_file(path: str | os.PathLike) -> Any:
    """Parse a whole ``.json`` file (UTF-8, a leading BOM ignored); errors name the file and line."""
    return parse_json_text(read_text_file(path), str(path))


def read_json_list(path: str | os.PathLike, what: str) -> list[Any]:
    """A ``.json`` file that must hold a list (of ``what``, e.g. ``"rows"``); see :func:`read_json_file`."""
    data = read_json_file(path)
    if not isinstance(data, list):
        raise SafetyDataError(f"{path}: this file must hold a JSON list of {what}, got a {type(data).__name__}.")
    return data


def read_jsonl_rows(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """``(location, row)`` for each non-blank line of a JSON Lines file, ``location`` being ``"PATH, line N"``.

    A line that cannot be read gives ``(location, SafetyDataError)`` instead of a row, so that the caller can raise it
    or skip and count it like any other bad row.
    """
    path = Path(path)
    with open(path, "rb") as handle:  # bytes: a line that is not UTF-8 is one bad row, not a broken file
        for number, raw in enumerate(handle, start=1):
            location = f"{path}, line {number}"
            if number == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield location, _not_utf8(location, err, whole_file=False)
                continue
            if not line.strip():
                continue  # blank lines (e.g. a trailing one) are not rows
            try:
                yield location, _parse_json(line.rstrip(), location, whole_file=False)
            except SafetyDataError as err:
                yield location, err


__all__ = ["parse_json_text", "read_json_file", "read_json_list", "read_jsonl_rows", "read_text_file"]
