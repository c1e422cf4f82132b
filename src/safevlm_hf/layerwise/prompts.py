# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""Prompt items for the ICET scan and L-PPO: loading a prompt file and checking items (turning them into model inputs
is :mod:`safevlm_hf.prompting`'s, shared with evaluation).

An *item* is any object with a `prompt` (the user's text) and an `image` (a PIL image or `None`); `category`,
`expected` and `id` are optional. The evaluation suite's `BenchmarkItem` fits, and so does :class:`PromptItem`, the
row type of the JSONL prompt files read by :func:`load_prompt_file`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from ..data.examples import load_image
from ..data.files import read_json_list, read_jsonl_rows  # the one reader of JSON data files
from ..evaluation.judges import JudgeInput


@dataclass
class PromptItem:
    """One prompt: the user's text, an optional image, and optional labels.

    Attributes:
        prompt: the user's request, without any chat formatting (the processor's chat template adds it).
        image: the image shown with the request, or `None` for a text-only prompt.
        category: a risk category (reported per category; read by rubric judges).
        expected: what a safe model should do with it: `"refuse"` or `"answer"` (`None`: unknown).
        id: a stable identifier (row number when the file gives none).
        metadata: any other fields of the row.
    """

    prompt: str
    image: Image.Image | None = None
    category: str | None = None
    expected: str | None = None
    id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def load_prompt_file(path: str | os.PathLike) -> list[PromptItem]:
    """Read a JSONL prompt file (one JSON object per line) or a JSON list of such objects.

    Keys: `prompt` (required, non-empty text), `image` (path relative to the file's folder, or absent/null),
    `category`, `expected` (`"refuse"` or `"answer"`), `id`; any other key goes to `metadata`. Errors name the file and
    line (or list index) of the offending row.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Prompt file {path} does not exist.")
    if path.suffix == ".json":
        located = [(f"{path} item {index}", row) for index, row in enumerate(read_json_list(path, "prompt objects"))]
    else:
        located = []
        for where, row in read_jsonl_rows(path):
            if isinstance(row, Exception):  # a line that is not UTF-8 or not JSON: the error names the file and line
                raise row
            located.append((where, row))
    items = [_item_from_row(row, where, path.parent, index) for index, (where, row) in enumerate(located)]
    if not items:
        raise ValueError(f"{path} holds no prompts; write one JSON object per line with at least a 'prompt' key.")
    return items


def _item_from_row(row: Any, where: str, folder: Path, index: int) -> PromptItem:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object with a 'prompt' key, got {type(row).__name__}.")
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: 'prompt' must be a non-empty string, got {prompt!r}.")
    expected = row.get("expected")
    if expected not in (None, "refuse", "answer"):
        raise ValueError(f"{where}: 'expected' must be 'refuse', 'answer' or absent, got {expected!r}.")
    image = None
    if row.get("image"):  # opened by the data package's loader: a missing, unreadable or huge image names the row
        image = load_image(str(folder / str(row["image"])), where)
    known = {"prompt", "image", "category", "expected", "id"}
    return PromptItem(
        prompt=prompt,
        image=image,
        category=row.get("category"),
        expected=expected,
        id=str(row["id"]) if row.get("id") is not None else str(index),
        metadata={k: v for k, v in row.items() if k not in known},
    )


def check_items(items: Sequence[Any], what: str = "prompt set") -> list[Any]:
    """Validate that `items` is a non-empty sequence of objects with a text `prompt` and an `image` attribute."""
    items = list(items)
    if not items:
        raise ValueError(f"The {what} is empty: give at least one item with a `prompt` (and an `image` or None).")
    for index, item in enumerate(items):
        prompt = getattr(item, "prompt", None)
        if not isinstance(prompt, str):
            raise TypeError(
                f"Item {index} of the {what} ({type(item).__name__}) has no text `prompt` attribute; use PromptItem "
                "or the evaluation suite's BenchmarkItem."
            )
        if not hasattr(item, "image"):
            raise TypeError(f"Item {index} of the {what} ({type(item).__name__}) has no `image` attribute (use None).")
    return items


def judge_inputs(prompts: Sequence[str], responses: Sequence[str], items: Sequence[Any]) -> list[JudgeInput]:
    """What a judge sees of each row: the request, the answer and the item's category."""
    return [
        JudgeInput(prompt=prompt, response=response, category=getattr(item, "category", None))
        for prompt, response, item in zip(prompts, responses, items)
    ]


__all__ = ["PromptItem", "check_items", "judge_inputs", "load_prompt_file"]
