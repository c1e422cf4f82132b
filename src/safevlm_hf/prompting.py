# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""Prompt building and input encoding: the one place that turns (prompt, image) rows into model inputs and generated
tokens back into answers.

Evaluation (:mod:`safevlm_hf.evaluation.runner`: generation and the safety-head scores) and layer-wise alignment
(:mod:`safevlm_hf.layerwise`: ICET, L-PPO, rewards) both use it, so a prompt is written for the model the same way
wherever it is scored or trained on. Training data goes through :class:`~safevlm_hf.data.SafeVLMDataCollator`
instead: it also writes the assistant's answer and its label mask.

An *item* is any object with a ``prompt`` (the user's text) and an ``image`` (a PIL image, a path or ``None``), such as
the evaluation suite's ``BenchmarkItem`` or layer-wise's ``PromptItem``.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from PIL import Image

from .modeling.configuration_safevlm import SafeVLMConfig, SafeVLMNextConfig


SAFEVLM_MODEL_TYPES: frozenset[str] = frozenset({SafeVLMConfig.model_type, SafeVLMNextConfig.model_type})
"""``config.model_type`` of every SafeVLM family (LLaVA-1.5 and LLaVA-NeXT)."""


def is_safevlm_config(config: Any) -> bool:
    """True for the config of a SafeVLM of any family (also one loaded as remote code)."""
    return getattr(config, "model_type", None) in SAFEVLM_MODEL_TYPES


def is_safevlm(model: Any) -> bool:
    """True for a SafeVLM of any family (a safety head, ``assess``/``predict_safety`` and gating in ``generate``),
    also when wrapped by PEFT or loaded as remote code: its config says so."""
    return is_safevlm_config(getattr(model, "config", None))


def chat_text(processor: Any, prompt: str, has_image: bool) -> str:
    """The prompt as the processor's chat template writes one user turn (one image placeholder first when
    ``has_image``), ending with the assistant's cue, ready to generate."""
    content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": prompt}]
    if not getattr(processor, "chat_template", None):
        raise ValueError(
            f"{type(processor).__name__} has no chat template, so prompts cannot be formatted for the model; set "
            "processor.chat_template (e.g. the LLaVA-1.5 template in safevlm_hf.tiny.LLAVA_CHAT_TEMPLATE)."
        )
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def item_image(item: Any) -> Image.Image | None:
    """The item's image as an RGB PIL image (opened from disk when the item holds a path), or ``None``."""
    loader = getattr(item, "load_image", None)
    if callable(loader):  # the evaluation suite's BenchmarkItem opens (and checks) its own image paths
        return loader()
    image = getattr(item, "image", None)
    if image is None:
        return None
    if isinstance(image, (str, os.PathLike)):
        from .data.examples import load_image

        return load_image(image, f"item {getattr(item, 'id', '?')!r}")
    return image.convert("RGB") if image.mode != "RGB" else image


def encode_prompts(
    processor: Any,
    prompts: Sequence[str],
    images: Sequence[Image.Image | None],
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Processor inputs for a batch of user prompts (one image or ``None`` per row; rows with and without images may
    mix), left-padded for generation, moved to ``device`` with floating inputs (pixel values) cast to ``dtype``."""
    texts = [chat_text(processor, prompt, image is not None) for prompt, image in zip(prompts, images)]
    # One image list per prompt row (empty for a text-only row): every processor accepts this layout, and Llama 3.2
    # Vision's needs it to know which row an image belongs to (a flat list would be read as one row's images).
    per_row = [[image] if image is not None else [] for image in images]
    inputs = processor(
        images=per_row if any(per_row) else None, text=texts, return_tensors="pt", padding=True, padding_side="left"
    )
    batch = dict(inputs)
    if device is not None:
        batch = {key: value.to(device) if hasattr(value, "to") else value for key, value in batch.items()}
    if dtype is not None:
        batch = {
            key: value.to(dtype) if torch.is_tensor(value) and value.is_floating_point() else value
            for key, value in batch.items()
        }
    return batch


def encode_items(
    processor: Any, items: Sequence[Any], device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> dict[str, Any]:
    """:func:`encode_prompts` for a batch of items (their ``prompt`` and :func:`item_image`)."""
    return encode_prompts(
        processor, [item.prompt for item in items], [item_image(item) for item in items], device, dtype
    )


def decode_responses(processor: Any, tokens: torch.Tensor) -> list[str]:
    """Decoded answers (special tokens and surrounding whitespace removed) of generated tokens (prompt cut off)."""
    return [text.strip() for text in processor.batch_decode(tokens, skip_special_tokens=True)]


__all__ = [
    "SAFEVLM_MODEL_TYPES",
    "chat_text",
    "decode_responses",
    "encode_items",
    "encode_prompts",
    "is_safevlm",
    "is_safevlm_config",
    "item_image",
]
