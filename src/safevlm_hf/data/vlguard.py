# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""Adapter for VLGuard's published ``train.json`` / ``test.json`` (GitHub ``ys-zong/VLGuard``, images from the
Hugging Face dataset ``ys-zong/VLGuard``).

Each entry is ``{"id", "image": "{source}/{file}", "safe": bool, ["harmful_category", "harmful_subcategory"],
"instr-resp": [...]}`` and gives these rows:

* **safe image**: its ``safe_instruction`` (type Safe, level 0, answered with the given response) and its
  ``unsafe_instruction`` (the risk is in the text; VLGuard names no category for it, so its type is unknown and
  ignored by the type loss, and its level is ``unsafe_instruction_level``, 3 = reject by default; pass
  ``unsafe_instruction_type`` to give those rows a type);
* **unsafe image**: its ``instruction``, typed from the harmful (sub)category by :data:`VLGUARD_CATEGORY_MAP`.

VLGuard category -> SafeVLM type and level (levels follow the published PSA-VLM rows: Politics and Illegal Risk 3,
Fairness and Privacy 2, Misleading 1):

===================  =====================  ==================  =====  ==============================================
harmful_category     harmful_subcategory    SafeVLM type        level  why
===================  =====================  ==================  =====  ==============================================
risky behavior       violence               Illegal Risk        3      violent content is "illegal risk"
risky behavior       sexually explicit      Illegal Risk        3      the taxonomy files sexual content here
risky behavior       political              Politics            3      politically sensitive content
risky behavior       professional advice    Misleading          1      unqualified advice misleads; answer carefully
discrimination       race / sex / other     Fairness            2      prejudice and discrimination
privacy              personal data          Privacy             2      someone's personal information
deception            disinformation         Misleading          2      producing disinformation is refused
===================  =====================  ==================  =====  ==============================================

The subcategory decides; an unknown subcategory falls back to its category's row (:data:`VLGUARD_CATEGORY_FALLBACK`);
an unknown category too is a bad row.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from ..modeling.policy_safevlm import DEFAULT_SAFETY_LEVELS, DEFAULT_SAFETY_TYPES, SAFE_TYPE
from .examples import SafetyDataError, SafetyDataset, SafetyExample, check_image, collect_rows


VLGUARD_CATEGORY_MAP: dict[str, tuple[str, int]] = {
    "violence": ("Illegal Risk", 3),
    "sexually explicit": ("Illegal Risk", 3),
    "political": ("Politics", 3),
    "professional advice": ("Misleading", 1),
    "race": ("Fairness", 2),
    "sex": ("Fairness", 2),
    "other": ("Fairness", 2),
    "personal data": ("Privacy", 2),
    "disinformation": ("Misleading", 2),
}
"""VLGuard ``harmful_subcategory`` -> (SafeVLM type name, level)."""

VLGUARD_CATEGORY_FALLBACK: dict[str, tuple[str, int]] = {
    "risky behavior": ("Illegal Risk", 3),
    "discrimination": ("Fairness", 2),
    "privacy": ("Privacy", 2),
    "deception": ("Misleading", 2),
}
"""VLGuard ``harmful_category`` -> (SafeVLM type name, level), used when the subcategory is not in the map."""


def _text(pair: Mapping[str, Any], key: str, where: str) -> str:
    value = pair.get(key)
    if not isinstance(value, str) or not value.strip():
        raise SafetyDataError(f"{where}: '{key}' must be a non-empty string, got {value!r}.")
    return value


def load_vlguard(
    path: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    skip_bad_rows: bool = False,
    check_images: bool = True,
    safety_types: Sequence[str] = DEFAULT_SAFETY_TYPES,
    category_map: Mapping[str, tuple[str, int]] | None = None,
    unsafe_instruction_type: str | None = None,
    unsafe_instruction_level: int = 3,
) -> SafetyDataset:
    """Read VLGuard's ``train.json`` or ``test.json`` as SafeVLM training rows (see the module docstring).

    Args:
        path: the VLGuard JSON file (a JSON list, as published).
        image_root: folder holding the ``{source}/{file}`` images (default: the JSON file's folder).
        skip_bad_rows: skip (and count) entries that fail validation instead of raising.
        check_images: open every image once at load time.
        safety_types: the model's type labels; the mapped type names must be among them.
        category_map: replaces :data:`VLGUARD_CATEGORY_MAP` (subcategory -> (type name, level)).
        unsafe_instruction_type: type name for the unsafe instructions on safe images (default: unknown).
        unsafe_instruction_level: level for those rows (default 3, reject).
    """
    path = Path(path)
    if not path.is_file():
        raise SafetyDataError(f"{path}: VLGuard file not found.")
    root = Path(image_root) if image_root is not None else path.parent
    try:
        with open(path, encoding="utf-8") as handle:
            entries = json.load(handle)
    except json.JSONDecodeError as err:
        raise SafetyDataError(
            f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})."
        ) from None
    if not isinstance(entries, list):
        raise SafetyDataError(f"{path}: a VLGuard file holds a JSON list of entries, got {type(entries).__name__}.")

    types = list(safety_types)
    subcategories = dict(VLGUARD_CATEGORY_MAP if category_map is None else category_map)

    def type_index(name: str, where: str) -> int:
        if name not in types:
            raise SafetyDataError(f"{where}: type {name!r} is not one of the model's safety_types {types}.")
        return types.index(name)

    if not 0 <= unsafe_instruction_level < len(DEFAULT_SAFETY_LEVELS):
        raise ValueError(
            f"unsafe_instruction_level must be 0..{len(DEFAULT_SAFETY_LEVELS) - 1}, got {unsafe_instruction_level}."
        )
    safe_index = type_index(SAFE_TYPE, str(path))
    unsafe_text_type = None if unsafe_instruction_type is None else type_index(unsafe_instruction_type, str(path))

    def rows() -> Iterator[tuple[str, Any]]:
        for index, entry in enumerate(entries):
            entry_id = entry.get("id") if isinstance(entry, dict) else None
            yield f"{path}, entry {index}" + (f" (id {entry_id})" if entry_id is not None else ""), entry

    def parse(location: str, entry: Any) -> list[SafetyExample]:
        if not isinstance(entry, dict):
            raise SafetyDataError(f"{location}: an entry must be a JSON object, got {type(entry).__name__}.")
        missing = [key for key in ("image", "safe", "instr-resp") if key not in entry]
        if missing:
            raise SafetyDataError(f"{location}: missing key(s) {missing}.")
        if not isinstance(entry["image"], str) or not entry["image"]:
            raise SafetyDataError(
                f"{location}: 'image' must be a path such as 'bad_ads/x.png', got {entry['image']!r}."
            )
        image = str((root / entry["image"]).absolute())
        pairs = entry["instr-resp"]
        if not isinstance(entry["safe"], bool) or not isinstance(pairs, list):
            raise SafetyDataError(f"{location}: 'safe' must be true/false and 'instr-resp' a list.")
        rows_out: list[tuple[str, str, int | None, int]] = []
        if entry["safe"]:
            keys = [next((k for k in p if k != "response"), None) if isinstance(p, dict) else None for p in pairs]
            if keys != ["safe_instruction", "unsafe_instruction"]:
                raise SafetyDataError(
                    f"{location}: a safe image's 'instr-resp' must be [{{safe_instruction, response}}, "
                    f"{{unsafe_instruction, response}}], got keys {keys}."
                )
            rows_out.append(
                (_text(pairs[0], "safe_instruction", location), _text(pairs[0], "response", location), safe_index, 0)
            )
            rows_out.append(
                (
                    _text(pairs[1], "unsafe_instruction", location),
                    _text(pairs[1], "response", location),
                    unsafe_text_type,
                    unsafe_instruction_level,
                )
            )
        else:
            if len(pairs) != 1 or not isinstance(pairs[0], dict):
                raise SafetyDataError(
                    f"{location}: an unsafe image's 'instr-resp' must be [{{instruction, response}}], got {pairs!r}."
                )
            category = str(entry.get("harmful_category", "")).strip().lower()
            subcategory = str(entry.get("harmful_subcategory", "")).strip().lower()
            mapped = subcategories.get(subcategory) or VLGUARD_CATEGORY_FALLBACK.get(category)
            if mapped is None:
                raise SafetyDataError(
                    f"{location}: unknown harmful category {category!r} / subcategory {subcategory!r}; known "
                    f"subcategories: {sorted(subcategories)}, categories: {sorted(VLGUARD_CATEGORY_FALLBACK)} "
                    "(pass category_map= to extend the table)."
                )
            name, level = mapped
            rows_out.append(
                (
                    _text(pairs[0], "instruction", location),
                    _text(pairs[0], "response", location),
                    type_index(name, location),
                    level,
                )
            )
        if check_images:
            check_image(image, location)
        return [
            SafetyExample(
                messages=({"role": "user", "content": instruction}, {"role": "assistant", "content": response}),
                safe_type=safe_type,
                safe_level=level,
                image=image,
                image_turn=0,
                location=f"{location} [{key}]",
            )
            for (instruction, response, safe_type, level), key in zip(
                rows_out, ("safe_instruction", "unsafe_instruction") if entry["safe"] else ("instruction",)
            )
        ]

    return collect_rows(rows(), parse, skip_bad_rows, str(path))


__all__ = ["VLGUARD_CATEGORY_FALLBACK", "VLGUARD_CATEGORY_MAP", "load_vlguard"]
