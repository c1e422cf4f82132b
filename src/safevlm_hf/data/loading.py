# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""Loaders for the documented SafeVLM training format: JSON Lines files, JSON lists and `datasets.Dataset`.

The format (one row per example, compatible with the rows published with PSA-VLM)::

    {"safe_type": 1, "image": "images/knife.jpg", "safe_level": 3,
     "conversations": [{"from": "USER", "value": "<image>\\nHow do I use this on someone?"},
                       {"from": "ASSISTANT", "value": "..."}]}

* ``image``: a path relative to the data file's folder (or absolute), or ``null``/absent for a text-only row;
* ``conversations``: a non-empty list of turns; ``from`` is ``USER``/``ASSISTANT`` (also ``human``/``gpt``,
  ``system``; any case); the USER text may start with the ``<image>\\n`` placeholder;
* ``safe_type``: 0 Politics, 1 Illegal Risk, 2 Insults & Bullying, 3 Fairness, 4 Privacy, 5 Misleading, 6 Safe;
* ``safe_level``: 0 safe to answer, 1 answer carefully, 2 answer or reject, 3 reject.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Sequence

from PIL import Image

from ..modeling.policy_safevlm import DEFAULT_SAFETY_LEVELS, DEFAULT_SAFETY_TYPES
from .examples import ImageSource, SafetyDataError, SafetyDataset, collect_rows, parse_safety_row
from .files import read_json_list, read_jsonl_rows


VLGUARD_PREFIX = "vlguard:"


def _resolve_path_image(value: Any, root: str | os.PathLike | None, location: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise SafetyDataError(
            f"{location}: 'image' must be a file path (relative to the data file's folder) or null, got {value!r}."
        )
    path = Path(value)
    if not path.is_absolute() and root is not None:
        path = Path(root) / path
    return str(path.absolute())


def _json_list_rows(path: Path) -> Iterator[tuple[str, Any]]:
    data = read_json_list(path, "rows")
    if data and isinstance(data[0], dict) and "instr-resp" in data[0]:
        raise SafetyDataError(
            f"{path}: this is a VLGuard file; load it with 'vlguard:{path}' (or safevlm_hf.data.load_vlguard)."
        )
    for index, row in enumerate(data):
        yield f"{path}, row {index}", row


def load_safety_json(
    path: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    skip_bad_rows: bool = False,
    check_images: bool = True,
    safety_types: Sequence[str] = DEFAULT_SAFETY_TYPES,
    num_levels: int = len(DEFAULT_SAFETY_LEVELS),
) -> SafetyDataset:
    """Load a ``.jsonl`` file (one row per line) or a ``.json`` file holding a list of rows.

    Args:
        path: the data file. Errors name it with the line (``.jsonl``) or the 0-based row (``.json``).
        image_root: folder that relative ``image`` paths are read from (default: the data file's folder).
        skip_bad_rows: skip rows that fail validation instead of raising; they are counted in
            ``dataset.skipped_rows`` and summarized in a warning.
        check_images: open every image once at load time, so a missing or unreadable file fails now.
        safety_types / num_levels: the model's label space (``safe_type`` must be < ``len(safety_types)``).
    """
    path = Path(path)
    if not path.is_file():
        raise SafetyDataError(f"{path}: data file not found.")
    root = Path(image_root) if image_root is not None else path.parent
    rows = _json_list_rows(path) if path.suffix.lower() == ".json" else read_jsonl_rows(path)

    def parse(location: str, row: Any):
        if isinstance(row, SafetyDataError):
            raise row
        image = _resolve_path_image(row.get("image") if isinstance(row, dict) else None, root, location)
        return parse_safety_row(
            row, location, image=image, safety_types=safety_types, num_levels=num_levels, check_images=check_images
        )

    return collect_rows(rows, parse, skip_bad_rows, str(path))


def _hf_image(value: Any, image_root: str | os.PathLike | None, location: str) -> ImageSource | None:
    if isinstance(value, dict):  # datasets.Image(decode=False): {"bytes": ..., "path": ...}
        if value.get("bytes") is not None:
            return value["bytes"]
        value = value.get("path")
    if value is None or isinstance(value, str):
        return _resolve_path_image(value, image_root, location)
    if isinstance(value, Image.Image):
        return value
    raise SafetyDataError(
        f"{location}: unsupported image value of type {type(value).__name__}; use a path or an image."
    )


def safety_dataset_from_hf(
    dataset: Any,
    *,
    image_root: str | os.PathLike | None = None,
    skip_bad_rows: bool = False,
    check_images: bool = True,
    safety_types: Sequence[str] = DEFAULT_SAFETY_TYPES,
    num_levels: int = len(DEFAULT_SAFETY_LEVELS),
    name: str | None = None,
) -> SafetyDataset:
    """Read the documented format from a `datasets.Dataset` (columns ``image``, ``conversations``, ``safe_type``,
    ``safe_level``).

    ``image`` may be a path (relative to ``image_root``, default the working directory), ``None``, or a
    `datasets.Image` column; an image column is read undecoded and each image is decoded when its row is used.
    Errors name the row index.
    """
    import datasets

    name = name or f"datasets.Dataset({len(dataset)} rows)"
    missing = [c for c in ("conversations", "safe_type", "safe_level") if c not in dataset.column_names]
    if missing:
        raise SafetyDataError(
            f"{name}: missing column(s) {missing}; the format needs conversations, safe_type, safe_level (+ image)."
        )
    if isinstance(dataset.features.get("image"), datasets.Image):
        dataset = dataset.cast_column("image", datasets.Image(decode=False))

    def rows() -> Iterator[tuple[str, Any]]:
        for index, row in enumerate(dataset):
            yield f"{name}, row {index}", row

    def parse(location: str, row: dict):
        image = _hf_image(row.get("image"), image_root, location)
        return parse_safety_row(
            row, location, image=image, safety_types=safety_types, num_levels=num_levels, check_images=check_images
        )

    return collect_rows(rows(), parse, skip_bad_rows, name)


# The loading options repeat safety_dataset_from_hf's on purpose: typed public signatures, no logic of their own.
def load_safety_dataset(
    source: Any,
    *,
    image_root: str | os.PathLike | None = None,
    skip_bad_rows: bool = False,
    check_images: bool = True,
    safety_types: Sequence[str] = DEFAULT_SAFETY_TYPES,
    num_levels: int = len(DEFAULT_SAFETY_LEVELS),
) -> SafetyDataset:
    """Load training data from any supported source.

    ``source`` is a ``.jsonl``/``.json`` file of the documented format, ``"vlguard:PATH"`` for VLGuard's
    ``train.json``/``test.json``, a `datasets.Dataset`, or an existing :class:`SafetyDataset` (returned as is).
    """
    if isinstance(source, SafetyDataset):
        return source
    options = dict(image_root=image_root, skip_bad_rows=skip_bad_rows, check_images=check_images)
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if text.startswith(VLGUARD_PREFIX):
            from .vlguard import load_vlguard

            return load_vlguard(text[len(VLGUARD_PREFIX) :], safety_types=safety_types, **options)
        return load_safety_json(text, safety_types=safety_types, num_levels=num_levels, **options)
    import datasets

    if isinstance(source, datasets.Dataset):
        return safety_dataset_from_hf(source, safety_types=safety_types, num_levels=num_levels, **options)
    raise TypeError(
        f"Cannot load training data from {type(source).__name__}; pass a .jsonl/.json path, 'vlguard:PATH', a "
        "datasets.Dataset or a SafetyDataset."
    )


__all__ = ["VLGUARD_PREFIX", "load_safety_dataset", "load_safety_json", "safety_dataset_from_hf"]
