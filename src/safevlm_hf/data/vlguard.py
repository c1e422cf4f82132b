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

This module owns the VLGuard format: :func:`read_vlguard_entries` and :func:`parse_vlguard_entry` are the one parser,
used here for training rows and by :func:`safevlm_hf.evaluation.load_vlguard` for the evaluation subsets.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from ..modeling.policy_safevlm import DEFAULT_SAFETY_LEVELS, DEFAULT_SAFETY_TYPES, SAFE_TYPE
from .examples import SafetyDataError, SafetyDataset, SafetyExample, check_image, collect_rows
from .files import read_json_list


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


#: The instruction keys of an entry's ``instr-resp`` objects, by whether the entry's image is safe.
VLGUARD_INSTRUCTION_KEYS: dict[bool, tuple[str, ...]] = {
    True: ("safe_instruction", "unsafe_instruction"),
    False: ("instruction",),
}


@dataclass(frozen=True)
class VLGuardInstruction:
    """One instruction of a VLGuard entry, with the entry's image and labels, as published.

    Attributes:
        key: ``"safe_instruction"`` or ``"unsafe_instruction"`` (safe image), ``"instruction"`` (unsafe image).
        instruction: the prompt text.
        response: the published answer, or ``None`` when the entry has none (an evaluation prompt needs none).
        image: ``image_root / entry["image"]``.
        entry_id: the entry's ``id``.
        safe_image: the entry's ``safe`` flag.
        harmful_category / harmful_subcategory: as written in the entry (``None`` for safe images).
        location: ``"PATH, entry N (id ID)"``, for messages.
    """

    key: str
    instruction: str
    response: str | None
    image: Path
    entry_id: str
    safe_image: bool
    harmful_category: str | None
    harmful_subcategory: str | None
    location: str


def read_vlguard_entries(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """``(location, entry)`` for each entry of a VLGuard ``train.json``/``test.json`` (a JSON list, as published)."""
    path = Path(path)
    if not path.is_file():
        raise SafetyDataError(f"{path}: VLGuard file not found.")
    for index, entry in enumerate(read_json_list(path, "VLGuard entries")):
        entry_id = entry.get("id") if isinstance(entry, dict) else None
        yield f"{path}, entry {index}" + (f" (id {entry_id})" if entry_id is not None else ""), entry


def _instruction_objects(entry: Mapping[str, Any], location: str) -> list[tuple[str, Mapping[str, Any]]]:
    """``[(key, instr-resp object)]`` in the order of :data:`VLGUARD_INSTRUCTION_KEYS`, each key exactly once."""
    pairs, keys = entry["instr-resp"], VLGUARD_INSTRUCTION_KEYS[entry["safe"]]
    if not isinstance(pairs, list) or not all(isinstance(p, dict) for p in pairs):
        raise SafetyDataError(f"{location}: 'instr-resp' must be a list of objects.")
    found = [[p for p in pairs if key in p] for key in keys]
    if len(pairs) != len(keys) or any(len(matches) != 1 for matches in found):
        expected = " and ".join(f"one {{{key!r}, 'response'}}" for key in keys)
        kind = "a safe" if entry["safe"] else "an unsafe"
        raise SafetyDataError(
            f"{location}: {kind} image's 'instr-resp' must hold {expected} object, got objects with keys "
            f"{[sorted(p) for p in pairs]}."
        )
    return [(key, matches[0]) for key, matches in zip(keys, found)]


def parse_vlguard_entry(entry: Any, location: str, image_root: str | os.PathLike) -> list[VLGuardInstruction]:
    """Validate one VLGuard entry; its instructions (two for a safe image, one for an unsafe one), in file order.

    Raises:
        SafetyDataError: naming ``location`` and what is wrong.
    """
    if not isinstance(entry, dict):
        raise SafetyDataError(f"{location}: an entry must be a JSON object, got {type(entry).__name__}.")
    missing = [key for key in ("id", "image", "safe", "instr-resp") if key not in entry]
    if missing:
        raise SafetyDataError(f"{location}: missing key(s) {missing}.")
    if not isinstance(entry["image"], str) or not entry["image"]:
        raise SafetyDataError(f"{location}: 'image' must be a path such as 'bad_ads/x.png', got {entry['image']!r}.")
    if not isinstance(entry["safe"], bool):
        raise SafetyDataError(f"{location}: 'safe' must be true or false, got {entry['safe']!r}.")
    instructions = []
    for key, pair in _instruction_objects(entry, location):
        text, response = pair[key], pair.get("response")
        if not isinstance(text, str) or not text.strip():
            raise SafetyDataError(f"{location}: '{key}' must be a non-empty string, got {text!r}.")
        instructions.append(
            VLGuardInstruction(
                key=key,
                instruction=text,
                response=response if isinstance(response, str) and response.strip() else None,
                image=Path(image_root) / entry["image"],
                entry_id=str(entry["id"]),
                safe_image=entry["safe"],
                harmful_category=None if entry["safe"] else entry.get("harmful_category"),
                harmful_subcategory=None if entry["safe"] else entry.get("harmful_subcategory"),
                location=location,
            )
        )
    return instructions


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
    root = Path(image_root) if image_root is not None else path.parent
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

    def labels(item: VLGuardInstruction) -> tuple[int | None, int]:
        if item.key == "safe_instruction":
            return safe_index, 0
        if item.key == "unsafe_instruction":
            return unsafe_text_type, unsafe_instruction_level
        category = str(item.harmful_category or "").strip().lower()
        subcategory = str(item.harmful_subcategory or "").strip().lower()
        mapped = subcategories.get(subcategory) or VLGUARD_CATEGORY_FALLBACK.get(category)
        if mapped is None:
            raise SafetyDataError(
                f"{item.location}: unknown harmful category {category!r} / subcategory {subcategory!r}; known "
                f"subcategories: {sorted(subcategories)}, categories: {sorted(VLGUARD_CATEGORY_FALLBACK)} "
                "(pass category_map= to extend the table)."
            )
        name, level = mapped
        return type_index(name, item.location), level

    def parse(location: str, entry: Any) -> list[SafetyExample]:
        examples = []
        for item in parse_vlguard_entry(entry, location, root):
            if item.response is None:
                raise SafetyDataError(f"{location}: '{item.key}' has no non-empty 'response' to train on.")
            safe_type, level = labels(item)
            examples.append(
                SafetyExample(
                    messages=(
                        {"role": "user", "content": item.instruction},
                        {"role": "assistant", "content": item.response},
                    ),
                    safe_type=safe_type,
                    safe_level=level,
                    image=str(item.image.absolute()),
                    image_turn=0,
                    location=f"{location} [{item.key}]",
                )
            )
        if check_images:
            check_image(examples[0].image, location)
        return examples

    return collect_rows(read_vlguard_entries(path), parse, skip_bad_rows, str(path))


__all__ = [
    "VLGUARD_CATEGORY_FALLBACK",
    "VLGUARD_CATEGORY_MAP",
    "VLGUARD_INSTRUCTION_KEYS",
    "VLGuardInstruction",
    "load_vlguard",
    "parse_vlguard_entry",
    "read_vlguard_entries",
]
