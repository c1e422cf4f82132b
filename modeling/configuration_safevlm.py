# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""SafeVLM model configurations: the safety fields on top of a LLaVA (1.5) or a LLaVA-NeXT configuration.

Travels inside every SafeVLM checkpoint: imports only torch/transformers and its sibling files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import LlavaConfig, LlavaNextConfig

from .policy_safevlm import (
    DEFAULT_SAFETY_LEVELS,
    DEFAULT_SAFETY_SUBCATEGORIES,
    DEFAULT_SAFETY_TYPES,
    SUBCATEGORY_SEPARATOR,
    SafetyPolicy,
    default_safety_policy,
)


@dataclass(kw_only=True, repr=False, eq=False)
class SafeVLMConfigMixin:
    r"""
    The safety fields every SafeVLM configuration adds to its LLaVA-family configuration (one definition for
    [`SafeVLMConfig`] and [`SafeVLMNextConfig`]).

    All the base configuration's fields keep their meaning (`vision_config`, `text_config`, `image_token_index`,
    `vision_feature_layer`, ...). Added fields:

    Args:
        num_safety_tokens (`int`, *optional*, defaults to 64):
            Size of each of the two learnable safety-token sets (each `num_safety_tokens x text hidden size`). Set 1
            enters the LLM right after each image's tokens; set 2 is joined to the safety projector's output.
        safety_types (`list[str]`, *optional*):
            Risk-type labels of the type classifier. Defaults to Politics, Illegal Risk, Insults & Bullying, Fairness,
            Privacy, Misleading, Safe.
        safety_levels (`list[str]`, *optional*):
            Names of the risk levels, lowest first. Defaults to 0 safe to answer, 1 answer carefully, 2 answer or
            reject, 3 reject.
        safety_subcategories (`list[str]`, *optional*):
            Sub-categories the head predicts besides the type, each `"Type/Sub-category"` of a type in
            `safety_types` (policies can address them). Defaults to none, so configs saved before sub-categories
            existed load unchanged; `from_llava_config` (a new conversion) defaults to
            `["Illegal Risk/Sexual content"]`.
        safety_feature_layer (`int | list[int]`, *optional*):
            Vision-encoder layer(s) the safety projector reads. Fixed at construction: a per-call
            `vision_feature_layer` changes only the LLM's image path, never the safety branch. Defaults to
            `vision_feature_layer`.
        safety_feature_select_strategy (`str`, *optional*):
            `"default"` drops the CLS token before the safety projector, `"full"` keeps it. Defaults to
            `vision_feature_select_strategy`.
        safety_projector_hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation of the safety projector (a two-layer MLP like LLaVA's projector).
        safety_head_hidden_size (`int`, *optional*):
            Width of the safety head. Defaults to `min(1024, text hidden size)`.
        safety_head_num_layers (`int`, *optional*, defaults to 2):
            Number of (self-attention over text, cross-attention to safety features, MLP) blocks in the head.
        safety_head_num_attention_heads (`int`, *optional*, defaults to 8):
            Attention heads of the safety head (reduced to a divisor of `safety_head_hidden_size` if needed).
        safety_head_intermediate_size (`int`, *optional*):
            MLP width of the head. Defaults to `4 * safety_head_hidden_size`.
        safety_head_dropout (`float`, *optional*, defaults to 0.0):
            Dropout inside the head (training only).
        safety_loss_weight (`float`, *optional*, defaults to 10.0):
            Weight `w` in `loss = lm_loss + w * (CE(type) + CE(level))`; the published recipe uses 10.
        safety_initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation used to initialize the safety tokens and the head's query.
        safety_policy (`dict`, *optional*):
            The graded refusal policy applied by `generate()` (see [`SafetyPolicy`]). Defaults to the built-in policy.
        safety_base_model (`str`, *optional*):
            The LLaVA checkpoint this model was converted from (recorded by `from_llava`, shown in the model card).
        safety_training_stages (`list[dict]`, *optional*):
            Stages that produced the checkpoint, each `{stage, data, steps, metrics}`; filled by the trainers and shown
            in the model card.

    Example:

    ```python
    >>> from transformers import LlavaConfig
    >>> from safevlm_hf import SafeVLMConfig
    >>> config = SafeVLMConfig.from_llava_config(LlavaConfig(), num_safety_tokens=64)
    ```
    """

    num_safety_tokens: int = 64
    safety_types: list[str] | None = None
    safety_levels: list[str] | None = None
    safety_subcategories: list[str] | None = None
    safety_feature_layer: int | list[int] | None = None
    safety_feature_select_strategy: str | None = None
    safety_projector_hidden_act: str = "gelu"
    safety_head_hidden_size: int | None = None
    safety_head_num_layers: int = 2
    safety_head_num_attention_heads: int = 8
    safety_head_intermediate_size: int | None = None
    safety_head_dropout: float = 0.0
    safety_loss_weight: float = 10.0
    safety_initializer_range: float = 0.02
    safety_policy: dict | None = None
    safety_base_model: str | None = None
    safety_training_stages: list[dict] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)  # the LLaVA-family configuration's own setup (sub-configs, ...)
        if self.safety_types is None:
            self.safety_types = list(DEFAULT_SAFETY_TYPES)
        if self.safety_levels is None:
            self.safety_levels = list(DEFAULT_SAFETY_LEVELS)
        if self.safety_subcategories is None:
            self.safety_subcategories = []
        if self.safety_feature_layer is None:
            self.safety_feature_layer = self.vision_feature_layer
        if self.safety_feature_select_strategy is None:
            self.safety_feature_select_strategy = self.vision_feature_select_strategy
        if self.safety_head_hidden_size is None:
            self.safety_head_hidden_size = min(1024, self.text_config.hidden_size)
        if self.safety_head_intermediate_size is None:
            self.safety_head_intermediate_size = 4 * self.safety_head_hidden_size
        heads = max(1, min(self.safety_head_num_attention_heads, self.safety_head_hidden_size))
        while self.safety_head_hidden_size % heads:
            heads -= 1
        self.safety_head_num_attention_heads = heads
        if self.safety_policy is None:
            self.safety_policy = default_safety_policy(
                self.safety_types, len(self.safety_levels), self.safety_subcategories
            )
        self._validate_safety()

    def _validate_safety(self) -> None:
        """Raise one clear error for each inconsistent safety setting (called on construction and load)."""
        if not isinstance(self.num_safety_tokens, int) or self.num_safety_tokens < 1:
            raise ValueError(
                f"num_safety_tokens must be an integer >= 1, got {self.num_safety_tokens!r}; "
                "the published SafeVLM uses 64."
            )
        for name in ("safety_types", "safety_levels"):
            labels = getattr(self, name)
            if not isinstance(labels, (list, tuple)) or len(labels) < 2 or not all(isinstance(x, str) for x in labels):
                raise ValueError(f"{name} must be a list of at least two label strings, got {labels!r}.")
            duplicates = sorted({x for x in labels if list(labels).count(x) > 1})
            if duplicates:
                raise ValueError(f"{name} has duplicate labels {duplicates}; each label must be unique.")
        vision_layers = self.vision_config.num_hidden_layers
        layers = (
            [self.safety_feature_layer] if isinstance(self.safety_feature_layer, int) else self.safety_feature_layer
        )
        for layer in layers:
            if not -(vision_layers + 1) <= layer <= vision_layers:
                raise ValueError(
                    f"safety_feature_layer {layer} is outside the vision encoder, which has hidden states "
                    f"{-(vision_layers + 1)}..{vision_layers}."
                )
        if self.safety_feature_select_strategy not in ("default", "full"):
            raise ValueError(
                f"safety_feature_select_strategy must be 'default' or 'full', got {self.safety_feature_select_strategy!r}."
            )
        if self.safety_head_hidden_size < 1 or self.safety_head_num_layers < 1:
            raise ValueError(
                f"safety head needs hidden size >= 1 and >= 1 layer, got hidden size {self.safety_head_hidden_size} "
                f"and {self.safety_head_num_layers} layers."
            )
        subcategories = self.safety_subcategories
        if not isinstance(subcategories, (list, tuple)) or len(set(subcategories)) != len(subcategories):
            raise ValueError(f"safety_subcategories must be a list of distinct strings, got {subcategories!r}.")
        for entry in subcategories:
            parent = entry.split(SUBCATEGORY_SEPARATOR, 1)[0] if isinstance(entry, str) else None
            if parent not in self.safety_types or SUBCATEGORY_SEPARATOR not in entry:
                raise ValueError(
                    f"safety_subcategories entry {entry!r} must be 'Type/Sub-category' with Type one of "
                    f"safety_types {list(self.safety_types)}."
                )
        # The policy may come from an untrusted config.json: validate it against this label space before use.
        self.safety_policy = self.bound_safety_policy().to_dict()

    def bound_safety_policy(self, policy: SafetyPolicy | dict | str | None = None) -> SafetyPolicy:
        """`policy` (default: this config's `safety_policy`) validated and bound to this config's labels."""
        return SafetyPolicy.coerce(
            self.safety_policy if policy is None else policy,
            self.safety_types,
            len(self.safety_levels),
            self.safety_levels,
            self.safety_subcategories,
        )

    @classmethod
    def from_llava_config(cls, llava_config: Any, **safety_overrides: Any) -> Any:
        """Build a SafeVLM configuration from a base configuration of its family, with optional safety overrides.

        Every base field (vision/text sub-configs, image token, feature layer, anyres grid, ...) is carried over.
        """
        data = llava_config.to_dict() if hasattr(llava_config, "to_dict") else dict(llava_config)
        for key in ("model_type", "architectures", "auto_map", "transformers_version"):
            data.pop(key, None)
        base_name = getattr(llava_config, "_name_or_path", None) or data.pop("_name_or_path", None)
        if base_name and "safety_base_model" not in safety_overrides:
            data["safety_base_model"] = str(base_name)  # for the model card's `base_model`; never loaded from
        data.update(safety_overrides)
        if data.get("safety_subcategories") is None:  # a new conversion predicts the default sub-categories
            types = data.get("safety_types") or DEFAULT_SAFETY_TYPES
            data["safety_subcategories"] = [
                name for name in DEFAULT_SAFETY_SUBCATEGORIES if name.split(SUBCATEGORY_SEPARATOR, 1)[0] in types
            ]
        return cls(**data)


class SafeVLMConfig(SafeVLMConfigMixin, LlavaConfig):
    """Configuration of a [`SafeVLMForConditionalGeneration`]: a [`LlavaConfig`] (LLaVA-1.5) plus the safety fields
    of [`SafeVLMConfigMixin`]."""

    model_type = "safevlm"


class SafeVLMNextConfig(SafeVLMConfigMixin, LlavaNextConfig):
    """Configuration of a [`SafeVLMNextForConditionalGeneration`]: a [`LlavaNextConfig`] (LLaVA-NeXT, anyres tiles)
    plus the safety fields of [`SafeVLMConfigMixin`]."""

    model_type = "safevlm_next"


__all__ = ["SafeVLMConfig", "SafeVLMConfigMixin", "SafeVLMNextConfig"]
