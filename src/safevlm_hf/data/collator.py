# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""Batch collation for SafeVLM training on top of the model's processor."""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from .examples import NO_SUBCATEGORY, SafetyDataError


def chat_messages(messages: Sequence[Mapping[str, str]], image_turn: int | None) -> list[dict[str, Any]]:
    """Turn ``[{"role", "content": str}]`` into chat-template messages with content parts.

    Content is always a list of ``{"type": "text"|"image"}`` parts (the form every LLaVA chat template accepts); the
    image part opens the turn ``image_turn``, as in LLaVA-1.5 prompts (``"USER: <image>\\n..."``). An assistant
    message's optional ``"context"`` (a guided-mode safety hint) is put in front of its content, where generation
    puts it; the collator does not train on it.
    """
    return _conversation_and_contexts(messages, image_turn)[0]


def _conversation_and_contexts(
    messages: Sequence[Mapping[str, str]], image_turn: int | None
) -> tuple[list[dict[str, Any]], list[str]]:
    """:func:`chat_messages` and each message's context (``""`` if none), read once: the collator then leaves out of
    the targets exactly the text the template was given."""
    conversation, contexts = [], []
    for index, message in enumerate(messages):
        context = message.get("context", "")
        parts: list[dict[str, Any]] = [{"type": "image"}] if index == image_turn else []
        parts.append({"type": "text", "text": context + message["content"]})
        conversation.append({"role": message["role"], "content": parts})
        contexts.append(context)
    return conversation, contexts


@dataclass
class SafeVLMDataCollator:
    """Collate :class:`~safevlm_hf.data.SafetyDataset` items into SafeVLM training batches.

    Each conversation is rendered with the processor's chat template and encoded by the processor, which expands
    every ``<image>`` into the image tokens plus the safety-token placeholders and produces ``pixel_values`` for the
    rows that have an image (in row order; text-only rows add none). The batch holds:

    * ``input_ids``, ``attention_mask`` (right padding), ``pixel_values`` (only if some row has an image);
    * ``labels``: the token ids of the assistant turns (their text and end-of-turn token), ``-100`` elsewhere
      (prompt, image and safety placeholders, padding);
    * ``safety_text_mask``: 1 on the prompt's text tokens (every non-assistant, non-placeholder, non-padding
      token), which is all the safety head may read: at inference it sees the prompt only;
    * ``safety_type_labels`` / ``safety_level_labels``: one per row (``-100`` for a row of unknown type);
    * ``safety_subcategory_labels`` (when ``subcategories`` is given): 0 for a row without a sub-category, i + 1
      for ``subcategories[i]``, ``-100`` for a row that does not say.

    Assistant turns are located by rendering the conversation up to each turn (with and without the generation
    prompt), so any chat template works, with or without ``{% generation %}`` markers. Rows are never truncated:
    one longer than ``max_length`` tokens raises an error naming it.

    Args:
        processor: a :class:`SafeVLMProcessor` (a plain `LlavaProcessor` works for LLaVA).
        max_length: longest allowed row in tokens (``None``: no limit).
        subcategories: the model's ``config.safety_subcategories`` (``None``: no sub-category labels).
    """

    processor: Any
    max_length: int | None = None
    ignore_index: int = -100
    subcategories: Sequence[str] | None = None

    def __post_init__(self) -> None:
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is None or getattr(self.processor, "chat_template", None) is None:
            raise ValueError(
                "SafeVLMDataCollator needs a processor with a tokenizer and a chat template (SafeVLMProcessor)."
            )
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.processor.image_token)

    def _render(self, conversation: list[dict[str, Any]], **kwargs: Any) -> str:
        return self.processor.apply_chat_template(conversation, tokenize=False, **kwargs)

    def assistant_spans(
        self, conversation: list[dict[str, Any]], location: str = "", contexts: Sequence[str] = ()
    ) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character spans ``[start, end)`` of its assistant turns.

        ``contexts[i]`` (the guided-mode hint rendered at the start of message i) is left out of the span.
        """
        text = self._render(conversation)
        spans = []
        for index, message in enumerate(conversation):
            if message["role"] != "assistant":
                continue
            prompt = self._render(conversation[:index], add_generation_prompt=True) if index else ""
            through = self._render(conversation[: index + 1])
            if not text.startswith(through):
                raise SafetyDataError(
                    f"{location}: the chat template does not render conversations prefix-consistently (turn {index} "
                    "renders differently inside the whole conversation), so assistant turns cannot be located. "
                    "Use a template whose rendering of the first k turns is a prefix of the full rendering."
                )
            # The span starts where the rendering with the generation prompt and the one with the answer part ways:
            # everything the model is shown at inference (role header included) stays in the prompt.
            start = len(os.path.commonprefix([prompt, through]))
            context = contexts[index] if index < len(contexts) else ""
            if context:
                found = text.find(context, start)
                if found < 0 or text[start:found].strip():  # only the role header's whitespace may come first
                    raise SafetyDataError(
                        f"{location}: the chat template does not put assistant turn {index}'s text right after its "
                        "role header, so its safety hint cannot be left out of the training targets."
                    )
                start = found + len(context)
            spans.append((start, len(through)))
        return text, spans

    @staticmethod
    def _span_token_mask(
        offsets: torch.Tensor, replacements: Sequence[Mapping[str, Any]], spans: Sequence[tuple[int, int]]
    ) -> torch.Tensor:
        # Offsets refer to the text after image expansion; shift each span past the placeholders expanded before it.
        ends = [r["span"][1] for r in replacements]
        gained = [0] + [r["new_span"][1] - r["span"][1] for r in replacements]
        mask = torch.zeros(offsets.shape[0], dtype=torch.bool)
        for start, end in spans:
            start += gained[bisect.bisect_right(ends, start)]
            end += gained[bisect.bisect_right(ends, end)]
            # Every token overlapping the span; zero-width tokens (BOS, padding) never do.
            mask |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
        return mask

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        texts, images, all_spans = [], [], []
        for row, feature in enumerate(features):
            image = feature.get("image")
            location = feature.get("location") or f"batch row {row}"
            conversation, contexts = _conversation_and_contexts(
                feature["messages"], feature.get("image_turn", 0) if image is not None else None
            )
            text, spans = self.assistant_spans(conversation, location, contexts)
            texts.append(text)
            all_spans.append(spans)
            if image is not None:
                images.append(image)
        encoded = self.processor(
            text=texts,
            images=images or None,
            padding=True,
            padding_side="right",  # positions 0..n-1 for every row, as in generation
            return_offsets_mapping=True,
            return_text_replacement_offsets=True,
            return_tensors="pt",
        )
        offsets = encoded.pop("offset_mapping")
        replacements = encoded.pop("text_replacement_offsets", None) or [[] for _ in texts]
        input_ids, attention = encoded["input_ids"], encoded["attention_mask"].bool()
        if self.max_length is not None:
            for row, length in enumerate(attention.sum(dim=1).tolist()):
                if length > self.max_length:
                    location = features[row].get("location") or f"batch row {row}"
                    raise SafetyDataError(
                        f"{location}: {length} tokens (image and safety tokens included) exceed max_length="
                        f"{self.max_length}; shorten the row or raise max_length."
                    )
        assistant = torch.stack(
            [self._span_token_mask(offsets[row], replacements[row], spans) for row, spans in enumerate(all_spans)]
        )
        assistant &= attention
        text_tokens = attention & (input_ids != self.image_token_id)
        batch = dict(encoded)
        batch["labels"] = input_ids.masked_fill(~(assistant & text_tokens), self.ignore_index)
        batch["safety_text_mask"] = (text_tokens & ~assistant).long()
        batch["safety_type_labels"] = torch.tensor(
            [self.ignore_index if f.get("safe_type") is None else int(f["safe_type"]) for f in features]
        )
        batch["safety_level_labels"] = torch.tensor(
            [self.ignore_index if f.get("safe_level") is None else int(f["safe_level"]) for f in features]
        )
        if self.subcategories is not None:
            batch["safety_subcategory_labels"] = torch.tensor([self._subcategory_label(f) for f in features])
        return batch

    def _subcategory_label(self, feature: Mapping[str, Any]) -> int:
        name = feature.get("safe_subcategory")
        if name is None:
            return self.ignore_index
        if name == NO_SUBCATEGORY:
            return 0
        if name not in self.subcategories:
            raise SafetyDataError(
                f"{feature.get('location') or 'a row'}: safe_subcategory {name!r} is not one the model predicts "
                f"({list(self.subcategories)}); add it to config.safety_subcategories or drop the label."
            )
        return list(self.subcategories).index(name) + 1


__all__ = ["SafeVLMDataCollator", "chat_messages"]
