# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""Validated safety training examples and the dataset that holds them.

Every loader (JSONL, JSON list, `datasets.Dataset`, VLGuard) turns its rows into :class:`SafetyExample` objects
through :func:`parse_safety_row` or builds them directly, so the checks and error messages are the same everywhere:
a bad row raises one :class:`SafetyDataError` that names the file and line (or row), or, with
``skip_bad_rows=True``, is counted in :attr:`SafetyDataset.skipped_rows` and reported in a warning.
"""

from __future__ import annotations

import io
import os
import random
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Iterable, Iterator, Mapping, Sequence, Union

from PIL import Image
from torch.utils.data import Dataset
from transformers.utils import logging

from ..modeling.policy_safevlm import DEFAULT_SAFETY_LEVELS, DEFAULT_SAFETY_TYPES, SAFE_TYPE


logger = logging.get_logger(__name__)

# An image as a row may hold it: a file path, encoded bytes (a `datasets.Image(decode=False)` column) or a PIL image.
ImageSource = Union[str, bytes, Image.Image]

IMAGE_PLACEHOLDER = "<image>"

# Speaker names accepted in `conversations[*].from` (case-insensitive): the PSA-VLM/LLaVA names, the ShareGPT names
# and the chat-template roles.
ROLE_ALIASES: dict[str, str] = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "system": "system",
}

_SKIP_HINT = "Fix the row, or pass skip_bad_rows=True (CLI: --skip-bad-rows) to skip and count bad rows."


class SafetyDataError(ValueError):
    """A training row (or whole data file) that cannot be used; the message names the file and line or row."""


@dataclass(frozen=True)
class BadRow:
    """A row skipped under ``skip_bad_rows=True``: where it is and why it was rejected."""

    location: str
    reason: str

    def __str__(self) -> str:
        return f"{self.location}: {self.reason}"


@dataclass(frozen=True)
class SafetyExample:
    """One validated training example.

    Attributes:
        messages: the conversation as ``({"role": "user"|"assistant"|"system", "content": str}, ...)``, with the
            ``<image>`` placeholder removed from the text.
        safe_type: index into the model's ``config.safety_types`` (0-5 risk types, 6 safe by default), or ``None``
            when the source does not say (the type loss then ignores the row).
        safe_level: risk level, 0 (safe to answer) ... 3 (reject).
        image: the image (absolute path, encoded bytes or PIL image), or ``None`` for a text-only example.
        image_turn: index into ``messages`` of the user turn that shows the image (``None`` without an image).
        location: where the row came from, e.g. ``"data/train.jsonl, line 12"``; used in every error message.
        safe_subcategory: the row's sub-category as ``"Type/Sub-category"`` (e.g. ``"Illegal Risk/Sexual
            content"``), ``"none"`` when the row says it has none, or ``None`` when the row does not say (its
            sub-category loss is then ignored, as for PSA-VLM rows).
    """

    messages: tuple[Mapping[str, str], ...]
    safe_type: int | None
    safe_level: int
    image: ImageSource | None = None
    image_turn: int | None = None
    location: str = ""
    safe_subcategory: str | None = None

    def with_messages(self, messages: Sequence[Mapping[str, str]]) -> "SafetyExample":
        """A copy with another conversation (labels, image and location kept)."""
        return replace(self, messages=tuple(dict(m) for m in messages))


@contextmanager
def _open_untrusted_image(image: str | bytes) -> Iterator[Image.Image]:
    """`Image.open`, with Pillow's decompression-bomb *warning* (an image over `Image.MAX_IMAGE_PIXELS`) raised as an
    error like its bomb *error* (over twice the limit): data files come from others, so a huge image is refused, not
    decoded. (`catch_warnings` changes process-wide filters; data is loaded in one thread per process.)"""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as opened:
            yield opened


def _unreadable_image(image: ImageSource, location: str, err: BaseException, hint: str) -> SafetyDataError:
    what = f"image file {image!r}" if isinstance(image, str) else "the image"
    if isinstance(err, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        reason = (
            f"is too large to decode safely, a possible decompression bomb ({err}); if you trust it, raise "
            "PIL.Image.MAX_IMAGE_PIXELS"
        )
    else:
        reason = f"cannot be read as an image ({err or type(err).__name__})"
    return SafetyDataError(f"{location}: {what} {reason}." + (f" {hint}" if hint else ""))


def load_image(image: ImageSource, location: str) -> Image.Image:
    """Open an example's image as RGB, or raise a :class:`SafetyDataError` naming the row."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with _open_untrusted_image(image) as opened:
            return opened.convert("RGB")
    except FileNotFoundError:
        raise SafetyDataError(f"{location}: image file {image!r} does not exist.") from None
    except Exception as err:  # decoding bytes from others: any failure means "unreadable image"
        raise _unreadable_image(image, location, err, hint="") from None


def check_image(image: ImageSource, location: str, hint: str = _SKIP_HINT) -> None:
    """Fail early (at load time, not hours into training) on a missing, unreadable or decompression-bomb image.

    ``hint`` ends the message (default: how to skip bad rows).
    """
    if isinstance(image, Image.Image):
        return
    if isinstance(image, str) and not os.path.isfile(image):
        raise SafetyDataError(f"{location}: image file {image!r} does not exist." + (f" {hint}" if hint else ""))
    try:
        with _open_untrusted_image(image) as opened:
            opened.verify()  # reads the whole file for most formats: catches truncated and non-image files
    except Exception as err:  # decoding bytes from others: any failure means "unreadable image"
        raise _unreadable_image(image, location, err, hint) from None


def _check_label(row: Mapping[str, Any], key: str, size: int, location: str, meaning: str) -> int:
    if key not in row:
        raise SafetyDataError(f"{location}: missing key {key!r} ({meaning}). {_SKIP_HINT}")
    value = row[key]
    # bool is an int subclass, and a float such as 2.0 hides a formatting bug upstream: accept plain ints only.
    if not isinstance(value, int) or isinstance(value, bool):
        raise SafetyDataError(f"{location}: {key} must be an integer ({meaning}), got {value!r}. {_SKIP_HINT}")
    if not 0 <= value < size:
        raise SafetyDataError(
            f"{location}: {key} {value} is out of range; use 0..{size - 1} ({meaning}). {_SKIP_HINT}"
        )
    return value


def _type_meaning(safety_types: Sequence[str]) -> str:
    return ", ".join(f"{i} {name}" for i, name in enumerate(safety_types))


NO_SUBCATEGORY = "none"


def _check_subcategory(row: Mapping[str, Any], safe_type: int | None, safety_types: Sequence[str], location: str):
    """The optional ``safe_subcategory`` as ``"Type/Sub"`` (a bare ``"Sub"`` belongs to the row's type), ``"none"``
    for ``null``/``"none"``, or ``None`` when the key is absent (the row carries no sub-category label)."""
    if "safe_subcategory" not in row:
        return None
    value = row["safe_subcategory"]
    if value is None or value == NO_SUBCATEGORY:
        return NO_SUBCATEGORY
    if not isinstance(value, str) or not value.strip():
        raise SafetyDataError(
            f"{location}: safe_subcategory must be a sub-category name such as 'Sexual content', 'none' or null, "
            f"got {value!r}. {_SKIP_HINT}"
        )
    parent, _, name = value.rpartition("/")
    if not parent:
        if safe_type is None:
            raise SafetyDataError(f"{location}: safe_subcategory {value!r} needs the row's safe_type. {_SKIP_HINT}")
        parent = safety_types[safe_type]
    elif safe_type is not None and parent != safety_types[safe_type]:
        raise SafetyDataError(
            f"{location}: safe_subcategory {value!r} belongs to {parent!r} but the row's safe_type is "
            f"{safe_type} ({safety_types[safe_type]}). {_SKIP_HINT}"
        )
    return f"{parent}/{name.strip()}"


def normalize_conversation(
    turns: Any, location: str, has_image: bool
) -> tuple[tuple[dict[str, str], ...], int | None]:
    """Check a ``conversations`` list and return ``(messages, image_turn)``.

    Accepts ``{"from", "value"}`` turns (PSA-VLM/LLaVA/ShareGPT) and ``{"role", "content"}`` turns. The ``<image>``
    placeholder (with the newline after it) is removed from the text; the image is placed in the user turn that
    held it, or in the first user turn when no turn does (LLaVA convention).
    """
    if not isinstance(turns, list) or not turns:
        raise SafetyDataError(
            f"{location}: the conversation is empty; 'conversations' must be a non-empty list of "
            f'{{"from": "USER"|"ASSISTANT", "value": str}} turns. {_SKIP_HINT}'
        )
    messages: list[dict[str, str]] = []
    image_turn = None
    for index, turn in enumerate(turns):
        where = f"{location}: conversations[{index}]"
        if not isinstance(turn, Mapping):
            raise SafetyDataError(f"{where} must be an object with 'from' and 'value', got {turn!r}. {_SKIP_HINT}")
        speaker = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        role = ROLE_ALIASES.get(speaker.strip().lower()) if isinstance(speaker, str) else None
        if role is None:
            raise SafetyDataError(
                f"{where}: unknown speaker {speaker!r}; use USER/ASSISTANT (or human/gpt, system). {_SKIP_HINT}"
            )
        if not isinstance(text, str):
            raise SafetyDataError(f"{where}: 'value' must be a string, got {text!r}. {_SKIP_HINT}")
        placeholders = text.count(IMAGE_PLACEHOLDER)
        if placeholders:
            if role != "user" or placeholders > 1 or image_turn is not None:
                raise SafetyDataError(f"{where}: '<image>' may appear once per row, in a USER turn. {_SKIP_HINT}")
            if not has_image:
                raise SafetyDataError(
                    f"{where}: the text has an '<image>' placeholder but the row has no image. {_SKIP_HINT}"
                )
            image_turn = len(messages)
            text = text.replace(IMAGE_PLACEHOLDER + "\n", "", 1).replace(IMAGE_PLACEHOLDER, "", 1).strip()
        messages.append({"role": role, "content": text})
    roles = [m["role"] for m in messages]
    dialogue = [r for r in roles if r != "system"]
    if not dialogue or dialogue[0] != "user":
        raise SafetyDataError(f"{location}: the conversation must start with a USER turn, got {roles}. {_SKIP_HINT}")
    if "assistant" not in dialogue:
        raise SafetyDataError(
            f"{location}: the conversation has no ASSISTANT turn, so there is nothing to learn. {_SKIP_HINT}"
        )
    if has_image and image_turn is None:
        image_turn = roles.index("user")
    return tuple(messages), image_turn


def parse_safety_row(
    row: Any,
    location: str,
    *,
    image: ImageSource | None,
    safety_types: Sequence[str] = DEFAULT_SAFETY_TYPES,
    num_levels: int = len(DEFAULT_SAFETY_LEVELS),
    check_images: bool = True,
) -> SafetyExample:
    """Validate one row of the documented format and return it as a :class:`SafetyExample`.

    ``image`` is the row's image already resolved by the caller (path made absolute, bytes, PIL image or ``None``).
    """
    if not isinstance(row, Mapping):
        raise SafetyDataError(f"{location}: a row must be a JSON object, got {type(row).__name__}. {_SKIP_HINT}")
    safe_type = _check_label(row, "safe_type", len(safety_types), location, _type_meaning(safety_types))
    safe_level = _check_label(
        row, "safe_level", num_levels, location, f"0 = safe to answer ... {num_levels - 1} = reject"
    )
    subcategory = _check_subcategory(row, safe_type, safety_types, location)
    messages, image_turn = normalize_conversation(row.get("conversations"), location, has_image=image is not None)
    if image is not None and check_images:
        check_image(image, location)
    return SafetyExample(
        messages=messages,
        safe_type=safe_type,
        safe_level=safe_level,
        image=image,
        image_turn=image_turn,
        location=location,
        safe_subcategory=subcategory,
    )


class SafetyDataset(Dataset):
    """A list of :class:`SafetyExample` usable as a `torch` dataset by `Trainer` and :class:`SafeVLMDataCollator`.

    Items are dicts ``{"messages", "image" (PIL RGB or None), "image_turn", "safe_type", "safe_level",
    "safe_subcategory", "location"}``;
    images are opened lazily, one item at a time.

    Attributes:
        skipped_rows: the rows rejected under ``skip_bad_rows=True`` (empty otherwise).
        name: where the data came from (for messages).
    """

    def __init__(self, examples: Iterable[SafetyExample], skipped_rows: Sequence[BadRow] = (), name: str = ""):
        self.examples: list[SafetyExample] = list(examples)
        self.skipped_rows: list[BadRow] = list(skipped_rows)
        self.name = name

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.examples[index]
        return {
            "messages": [dict(m) for m in example.messages],
            "image": load_image(example.image, example.location) if example.image is not None else None,
            "image_turn": example.image_turn,
            "safe_type": example.safe_type,
            "safe_level": example.safe_level,
            "safe_subcategory": example.safe_subcategory,
            "location": example.location,
        }

    def __repr__(self) -> str:
        return f"SafetyDataset(name={self.name!r}, num_rows={len(self)}, skipped_rows={len(self.skipped_rows)})"

    def select(self, indices: Iterable[int]) -> "SafetyDataset":
        """A new dataset with the examples at ``indices`` (skipped-row records are kept)."""
        return SafetyDataset([self.examples[i] for i in indices], self.skipped_rows, self.name)

    def map_examples(self, function) -> "SafetyDataset":
        """A new dataset with ``function(example)`` applied to every example."""
        return SafetyDataset([function(e) for e in self.examples], self.skipped_rows, self.name)

    def label_counts(self) -> dict[tuple[int | None, int], int]:
        """How many examples have each ``(safe_type, safe_level)`` pair."""
        counts: dict[tuple[int | None, int], int] = {}
        for example in self.examples:
            key = (example.safe_type, example.safe_level)
            counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (kv[0][0] is None, kv[0])))


def collect_rows(rows: Iterable[tuple[str, Any]], parse, skip_bad_rows: bool, name: str) -> SafetyDataset:
    """Parse ``(location, raw)`` pairs with ``parse``; raise on the first bad one, or skip, count and report them.

    ``parse`` returns one example or a list of examples (one source entry may give several rows, as in VLGuard).
    """
    examples: list[SafetyExample] = []
    skipped: list[BadRow] = []
    for location, raw in rows:
        try:
            parsed = parse(location, raw)
        except SafetyDataError as err:
            if not skip_bad_rows:
                raise
            reason = str(err)
            prefix = f"{location}: "
            reason = reason[len(prefix) :] if reason.startswith(prefix) else reason
            skipped.append(BadRow(location, reason.replace(" " + _SKIP_HINT, "")))
            continue
        examples.extend(parsed if isinstance(parsed, list) else [parsed])
    if skipped:
        shown = "; ".join(str(row) for row in skipped[:5])
        more = f" (and {len(skipped) - 5} more)" if len(skipped) > 5 else ""
        logger.warning(f"Skipped {len(skipped)} bad row(s) of {name}: {shown}{more}")
    if not examples:
        raise SafetyDataError(
            f"{name}: no usable rows"
            + (f" ({len(skipped)} bad row(s) skipped: {skipped[0]})" if skipped else "")
            + "."
        )
    return SafetyDataset(examples, skipped, name)


def safe_type_index(safety_types: Sequence[str] = DEFAULT_SAFETY_TYPES) -> int:
    """Index of the safe label (``"Safe"``) in a label list."""
    if SAFE_TYPE not in safety_types:
        raise ValueError(
            f"The label list {list(safety_types)} has no {SAFE_TYPE!r} type; cannot tell safe rows apart."
        )
    return list(safety_types).index(SAFE_TYPE)


def balance_for_stage1(
    dataset: SafetyDataset,
    num_safe_samples: int | None,
    seed: int = 42,
    safety_types: Sequence[str] = DEFAULT_SAFETY_TYPES,
) -> SafetyDataset:
    """Stage I balancing as published for SafeVLM: every risky row plus ``num_safe_samples`` safe rows drawn at random.

    Safe rows are those whose ``safe_type`` is the ``"Safe"`` label; rows of unknown type count as risky. The draw is
    seeded (same seed, same rows) and the kept rows stay in file order. ``None`` keeps every row.
    """
    if num_safe_samples is None:
        return dataset
    if num_safe_samples < 0:
        raise ValueError(f"num_safe_samples must be >= 0, got {num_safe_samples}.")
    safe = safe_type_index(safety_types)
    safe_rows = [i for i, e in enumerate(dataset.examples) if e.safe_type == safe]
    risky_rows = [i for i, e in enumerate(dataset.examples) if e.safe_type != safe]
    if num_safe_samples > len(safe_rows):
        raise ValueError(
            f"num_safe_samples={num_safe_samples} but {dataset.name or 'the dataset'} has only {len(safe_rows)} safe "
            f"rows (and {len(risky_rows)} risky ones); lower num_safe_samples (or leave it unset to keep every row)."
        )
    sampled = random.Random(seed).sample(safe_rows, num_safe_samples)
    return dataset.select(sorted(risky_rows + sampled))


__all__ = [
    "BadRow",
    "IMAGE_PLACEHOLDER",
    "ImageSource",
    "SafetyDataError",
    "SafetyDataset",
    "SafetyExample",
    "balance_for_stage1",
    "check_image",
    "load_image",
    "normalize_conversation",
    "parse_safety_row",
    "safe_type_index",
]
