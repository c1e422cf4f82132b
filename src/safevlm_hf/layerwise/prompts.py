# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""Prompt items for the ICET scan and L-PPO: loading a prompt file and turning items into model inputs.

An *item* is any object with a `prompt` (the user's text) and an `image` (a PIL image or `None`); `category`,
`expected` and `id` are optional. The evaluation suite's `BenchmarkItem` fits, and so does :class:`PromptItem`, the
row type of the JSONL prompt files read by :func:`load_prompt_file`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

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
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err}).") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path}: a .json prompt file must hold a list of objects, got {type(rows).__name__}.")
        located = [(f"{path} item {index}", row) for index, row in enumerate(rows)]
    else:
        located = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                located.append((f"{path}:{number}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err}).") from None
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
    if row.get("image"):
        image_path = folder / str(row["image"])
        try:
            with Image.open(image_path) as opened:
                image = opened.convert("RGB")
        except (OSError, ValueError) as err:
            raise ValueError(f"{where}: cannot read image {image_path} ({err}).") from None
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


def item_image(item: Any) -> Image.Image | None:
    """The item's image as an RGB PIL image (opened from disk when the item holds a path), or `None`."""
    loader = getattr(item, "load_image", None)
    if callable(loader):  # the evaluation suite's BenchmarkItem opens (and checks) its own image paths
        return loader()
    image = getattr(item, "image", None)
    if image is None:
        return None
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as opened:
                return opened.convert("RGB")
        except (OSError, ValueError) as err:
            raise ValueError(f"Item {getattr(item, 'id', '?')!r}: cannot read image {image} ({err}).") from None
    return image.convert("RGB") if image.mode != "RGB" else image


def chat_text(processor: Any, prompt: str, has_image: bool) -> str:
    """The prompt as the model's chat template writes a user turn, ending with the assistant's cue."""
    content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": prompt}]
    if not getattr(processor, "chat_template", None):
        raise ValueError(
            f"{type(processor).__name__} has no chat template, so prompts cannot be formatted for the model; set "
            "processor.chat_template (e.g. the LLaVA-1.5 template in safevlm_hf.tiny.LLAVA_CHAT_TEMPLATE)."
        )
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def encode_items(processor: Any, items: Sequence[Any], device: torch.device | str | None = None) -> dict[str, Any]:
    """Processor inputs for a batch of items, left-padded for generation (rows with and without images may mix)."""
    images = [item_image(item) for item in items]
    texts = [chat_text(processor, item.prompt, image is not None) for item, image in zip(items, images)]
    # One image list per prompt row (empty for a text-only row): every processor accepts this layout, and Llama 3.2
    # Vision's needs it to know which row an image belongs to (a flat list would be read as one row's images).
    per_row = [[image] if image is not None else [] for image in images]
    inputs = processor(
        images=per_row if any(per_row) else None, text=texts, return_tensors="pt", padding=True, padding_side="left"
    )
    if device is None:
        return dict(inputs)
    return {key: value.to(device) if hasattr(value, "to") else value for key, value in inputs.items()}


def judge_inputs(prompts: Sequence[str], responses: Sequence[str], items: Sequence[Any]) -> list[JudgeInput]:
    """What a judge sees of each row: the request, the answer and the item's category."""
    return [
        JudgeInput(prompt=prompt, response=response, category=getattr(item, "category", None))
        for prompt, response, item in zip(prompts, responses, items)
    ]


__all__ = ["PromptItem", "chat_text", "check_items", "encode_items", "item_image", "judge_inputs", "load_prompt_file"]
