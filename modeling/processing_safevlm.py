# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""SafeVLM processors: LLaVA-family processors whose image placeholders also make room for safety tokens set 1.

Travels inside every SafeVLM checkpoint: imports only transformers.
"""

from __future__ import annotations

from typing import Any

from transformers import LlavaNextProcessor, LlavaProcessor
from transformers.processing_utils import MultiModalData


class SafeVLMProcessorMixin:
    r"""
    Each `<image>` in the text expands to the image's tokens (as the family's processor counts them: fixed for
    LLaVA-1.5, size-dependent for LLaVA-NeXT's anyres tiles) followed by `num_safety_tokens` more placeholders, where
    the model puts safety tokens set 1. Everything else (image preprocessing, tokenizer, chat template) is the base
    processor's.

    Args:
        num_safety_tokens (`int`, *optional*, defaults to 64):
            Must equal the model's `config.num_safety_tokens`.
        (other arguments as the base processor's)
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
    def from_llava_processor(cls, processor_or_path: Any, num_safety_tokens: int = 64, **kwargs: Any) -> Any:
        """Wrap a processor of the family (object, or path/Hub id loaded with `AutoProcessor`) as a SafeVLM one."""
        if isinstance(processor_or_path, str) or hasattr(processor_or_path, "__fspath__"):
            from transformers import AutoProcessor

            processor_or_path = AutoProcessor.from_pretrained(processor_or_path, **kwargs)
        source = processor_or_path
        missing = [name for name in ("image_processor", "tokenizer") if getattr(source, name, None) is None]
        if missing:
            raise ValueError(
                f"from_llava_processor needs a LLaVA-family processor with {missing}; got {type(source).__name__}."
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


class SafeVLMProcessor(SafeVLMProcessorMixin, LlavaProcessor):
    """[`LlavaProcessor`] for SafeVLM (LLaVA-1.5); see [`SafeVLMProcessorMixin`]."""


class SafeVLMNextProcessor(SafeVLMProcessorMixin, LlavaNextProcessor):
    """[`LlavaNextProcessor`] for SafeVLM-NeXT (anyres tiles); see [`SafeVLMProcessorMixin`]."""


SafeVLMProcessor.register_for_auto_class()
SafeVLMNextProcessor.register_for_auto_class()

__all__ = ["SafeVLMNextProcessor", "SafeVLMProcessor", "SafeVLMProcessorMixin"]
