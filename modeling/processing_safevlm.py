# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""SafeVLM processor: a LLaVA processor whose image placeholders also make room for safety tokens set 1.

Travels inside every SafeVLM checkpoint: imports only transformers.
"""

from __future__ import annotations

from typing import Any

from transformers import LlavaProcessor
from transformers.processing_utils import MultiModalData


class SafeVLMProcessor(LlavaProcessor):
    r"""
    [`LlavaProcessor`] for SafeVLM: each `<image>` in the text expands to the image's tokens followed by
    `num_safety_tokens` more placeholders, where the model puts safety tokens set 1. Everything else (image
    preprocessing, tokenizer, chat template) is LLaVA's.

    Args:
        num_safety_tokens (`int`, *optional*, defaults to 64):
            Must equal the model's `config.num_safety_tokens`.
        (other arguments as [`LlavaProcessor`])
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        patch_size=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token="<image>",
        num_additional_image_tokens=0,
        num_safety_tokens: int = 64,
        **kwargs,
    ):
        if not isinstance(num_safety_tokens, int) or num_safety_tokens < 1:
            raise ValueError(f"num_safety_tokens must be an integer >= 1, got {num_safety_tokens!r}.")
        self.num_safety_tokens = num_safety_tokens
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=patch_size,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            num_additional_image_tokens=num_additional_image_tokens,
            **kwargs,
        )

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return (
            super().replace_image_token(image_inputs, image_idx, **kwargs) + self.image_token * self.num_safety_tokens
        )

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs) -> MultiModalData:
        data = super()._get_num_multimodal_tokens(image_sizes=image_sizes, **kwargs)
        if image_sizes is not None:
            data.num_image_tokens = [n + self.num_safety_tokens for n in data.num_image_tokens]
        return data

    @classmethod
    def from_llava_processor(
        cls, processor_or_path: Any, num_safety_tokens: int = 64, **kwargs: Any
    ) -> "SafeVLMProcessor":
        """Wrap a [`LlavaProcessor`] (object, or path/Hub id loaded with `AutoProcessor`) as a SafeVLM processor."""
        if isinstance(processor_or_path, str) or hasattr(processor_or_path, "__fspath__"):
            from transformers import AutoProcessor

            processor_or_path = AutoProcessor.from_pretrained(processor_or_path, **kwargs)
        source = processor_or_path
        missing = [name for name in ("image_processor", "tokenizer") if getattr(source, name, None) is None]
        if missing:
            raise ValueError(
                f"from_llava_processor needs a LLaVA processor with {missing}; got {type(source).__name__}."
            )
        return cls(
            image_processor=source.image_processor,
            tokenizer=source.tokenizer,
            patch_size=source.patch_size,
            vision_feature_select_strategy=source.vision_feature_select_strategy,
            chat_template=getattr(source, "chat_template", None),
            image_token=source.image_token,
            num_additional_image_tokens=source.num_additional_image_tokens,
            num_safety_tokens=num_safety_tokens,
        )


SafeVLMProcessor.register_for_auto_class()

__all__ = ["SafeVLMProcessor"]
