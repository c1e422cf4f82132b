# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""PyTorch SafeVLM: LLaVA with a safety projector, two safety-token sets, a safety head and refusal gating.

Travels inside every SafeVLM checkpoint (``trust_remote_code=True``): imports only torch/transformers and its
sibling files. Architecture, on top of an untouched LLaVA:

* **safety projector** - a second MLP projector over the vision features of ``config.safety_feature_layer``;
* **safety tokens** - set 1 (``num_safety_tokens x text hidden``) is placed in the LLM input right after each
  image's tokens; set 2 is joined to the safety projector's output to form the *safety-enhanced features*;
* **safety head** - a learned query plus the prompt's text tokens, refined by self-attention over the text and
  cross-attention to the safety-enhanced features; the query (first token) feeds two linear classifiers
  (risk type, risk level).

The head reads token embeddings, not LLM states, so a verdict costs one vision pass plus the small head: ``generate``
computes it once before the first token and gates decoding with :class:`SafetyGateLogitsProcessor`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from transformers import LlavaForConditionalGeneration, LlavaModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)
from transformers.generation import LogitsProcessorList
from transformers.modeling_outputs import BaseModelOutputWithPooling, ModelOutput
from transformers.models.auto import AutoModel
from transformers.models.llava.modeling_llava import (
    LlavaCausalLMOutputWithPast,
    LlavaModelOutputWithPast,
    LlavaMultiModalProjector,
    LlavaPreTrainedModel,
)
from transformers.utils import logging

from .configuration_safevlm import SafeVLMConfig
from .gating_safevlm import SafetyGateLogitsProcessor
from .modelcard_safevlm import write_model_card
from .policy_safevlm import SafetyPolicy, SafetyVerdict
from .processing_safevlm import SafeVLMProcessor  # noqa: F401  (a relative import, so save_pretrained copies the file)


logger = logging.get_logger(__name__)

# llava-hf checkpoints store legacy keys (`language_model.model.*`, `language_model.lm_head`); transformers converts
# them only for registered model types, so a SafeVLM built from such a checkpoint would otherwise get a random lm_head.
register_checkpoint_conversion_mapping("safevlm", get_checkpoint_conversion_mapping("llava"), overwrite=True)


# ------------------------------------------------------------------------------------------------------ outputs
@dataclass
class SafeVLMImageFeaturesOutput(BaseModelOutputWithPooling):
    r"""
    pooler_output (`list[torch.Tensor]`, *optional*):
        Per image, the LLM-side features: projected image tokens followed by safety tokens set 1,
        `(num_image_tokens + num_safety_tokens, text_hidden)`. `None` on the classify-only path.
    safety_features (`list[torch.Tensor]`, *optional*):
        Per image, the safety projector's output over `config.safety_feature_layer`, `(num_patches, text_hidden)`.
    num_placeholder_tokens (`list[int]`):
        Per image, how many placeholder tokens it fills in the prompt (image tokens + safety tokens set 1).
    """

    safety_features: list[torch.Tensor] | None = None
    num_placeholder_tokens: list[int] | None = None


@dataclass
class SafeVLMModelOutputWithPast(LlavaModelOutputWithPast):
    r"""
    safety_type_logits (`torch.Tensor` of shape `(batch_size, num_safety_types)`, *optional*):
        Risk-type logits of the safety head (computed on the prompt pass only).
    safety_level_logits (`torch.Tensor` of shape `(batch_size, num_safety_levels)`, *optional*):
        Risk-level logits of the safety head.
    """

    safety_type_logits: torch.Tensor | None = None
    safety_level_logits: torch.Tensor | None = None


@dataclass
class SafeVLMCausalLMOutputWithPast(LlavaCausalLMOutputWithPast):
    r"""
    loss (`torch.Tensor`, *optional*):
        `lm_loss + safety_loss_weight * (CE(type) + CE(level))` for the labels given.
    lm_loss (`torch.Tensor`, *optional*):
        Next-token loss alone.
    safety_loss (`torch.Tensor`, *optional*):
        `CE(type) + CE(level)` alone (unweighted).
    safety_type_logits (`torch.Tensor` of shape `(batch_size, num_safety_types)`, *optional*):
        Risk-type logits of the safety head.
    safety_level_logits (`torch.Tensor` of shape `(batch_size, num_safety_levels)`, *optional*):
        Risk-level logits of the safety head.
    """

    lm_loss: torch.Tensor | None = None
    safety_loss: torch.Tensor | None = None
    safety_type_logits: torch.Tensor | None = None
    safety_level_logits: torch.Tensor | None = None


@dataclass
class SafeVLMSafetyPrediction(ModelOutput):
    r"""
    Output of [`SafeVLMForConditionalGeneration.predict_safety`].

    type_logits / level_logits: raw head outputs `(batch_size, num_types)` / `(batch_size, num_levels)`.
    type_probs / level_probs: their softmax.
    """

    type_logits: torch.Tensor | None = None
    level_logits: torch.Tensor | None = None
    type_probs: torch.Tensor | None = None
    level_probs: torch.Tensor | None = None


# ------------------------------------------------------------------------------------------------ safety modules
class SafeVLMSafetyProjector(nn.Module):
    """Second projector over the vision features (same MLP shape as LLaVA's; the original projector is untouched)."""

    def __init__(self, config: SafeVLMConfig):
        super().__init__()
        layers = config.safety_feature_layer
        num_feature_layers = 1 if isinstance(layers, int) else len(layers)
        hidden = config.text_config.hidden_size
        self.linear_1 = nn.Linear(config.vision_config.hidden_size * num_feature_layers, hidden)
        self.act = ACT2FN[config.safety_projector_hidden_act]
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(image_features)))


class SafeVLMSafetyTokens(nn.Module):
    """The two learnable safety-token sets, each `(num_safety_tokens, text_hidden)`.

    Kept in their own module so `_init_weights` initializes them both on `Model(config)` and when missing from a
    LLaVA checkpoint.
    """

    def __init__(self, config: SafeVLMConfig):
        super().__init__()
        shape = (config.num_safety_tokens, config.text_config.hidden_size)
        self.llm_tokens = nn.Parameter(torch.empty(shape))  # set 1: into the LLM beside each image's tokens
        self.head_tokens = nn.Parameter(torch.empty(shape))  # set 2: joined to the safety projector's output


class SafeVLMHeadAttention(nn.Module):
    """Multi-head attention of `x` over `context` with a boolean key mask (True = attend)."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.o_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        batch, q_len, hidden = x.shape
        head_dim = hidden // self.num_heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, -1, self.num_heads, head_dim).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(context)), split(self.v_proj(context))
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=context_mask[:, None, None, :], dropout_p=self.dropout if self.training else 0.0
        )
        return self.o_proj(y.transpose(1, 2).reshape(batch, q_len, hidden))


class SafeVLMSafetyHeadLayer(nn.Module):
    """Pre-norm block: self-attention over the text stream, cross-attention to the safety features, MLP."""

    def __init__(self, config: SafeVLMConfig):
        super().__init__()
        d, heads, p = (
            config.safety_head_hidden_size,
            config.safety_head_num_attention_heads,
            config.safety_head_dropout,
        )
        self.self_attn_norm = nn.LayerNorm(d)
        self.self_attn = SafeVLMHeadAttention(d, heads, p)
        self.cross_attn_norm = nn.LayerNorm(d)
        self.cross_attn = SafeVLMHeadAttention(d, heads, p)
        self.mlp_norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(
            nn.Linear(d, config.safety_head_intermediate_size),
            nn.GELU(),
            nn.Linear(config.safety_head_intermediate_size, d),
            nn.Dropout(p),
        )

    def forward(self, text, text_mask, features, feature_mask):
        h = self.self_attn_norm(text)
        text = text + self.self_attn(h, h, text_mask)
        text = text + self.cross_attn(self.cross_attn_norm(text), features, feature_mask)
        return text + self.mlp(self.mlp_norm(text))


def _sinusoidal_positions(length: int, dim: int, device, dtype) -> torch.Tensor:
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, device=device, dtype=torch.float32)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: dim // 2])
    return table.to(dtype)


def _pack_left(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the masked-in positions of each row to the front, in order, and trim to the longest row.

    Left- and right-padded versions of a row become the same tensor, so the head's verdict cannot depend on the
    padding side or on the other rows' lengths.
    """
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
    length = max(int(mask.sum(dim=1).max().item()), 1) if mask.numel() else 1
    order = order[:, :length]
    packed = torch.gather(values, 1, order[..., None].expand(-1, -1, values.shape[-1]))
    packed_mask = torch.gather(mask, 1, order)
    return packed, packed_mask


class SafeVLMSafetyHead(nn.Module):
    """Cross-attention safety classifier.

    The first position is a learned query (not the prompt's first token, which is usually a constant BOS); the prompt
    tokens follow it with positions counted over real tokens only. Each block lets the text attend to itself (padding
    masked) and to the safety-enhanced features; the query's final state feeds the type and level classifiers.
    """

    def __init__(self, config: SafeVLMConfig):
        super().__init__()
        d = config.safety_head_hidden_size
        text_hidden = config.text_config.hidden_size
        self.query = nn.Parameter(torch.empty(d))
        # LLM token embeddings are small (std ~0.02) and projected vision features are not: normalize both streams so
        # neither the positional signal nor the other stream drowns them.
        self.text_proj = nn.Linear(text_hidden, d)
        self.text_norm = nn.LayerNorm(d)
        self.feature_proj = nn.Linear(text_hidden, d)
        self.feature_norm = nn.LayerNorm(d)
        self.layers = nn.ModuleList([SafeVLMSafetyHeadLayer(config) for _ in range(config.safety_head_num_layers)])
        self.norm = nn.LayerNorm(d)
        self.type_classifier = nn.Linear(d, len(config.safety_types))
        self.level_classifier = nn.Linear(d, len(config.safety_levels))

    def forward(
        self,
        text_embeds: torch.Tensor,
        text_mask: torch.Tensor,
        features: torch.Tensor,
        feature_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        text, text_mask = _pack_left(text_embeds, text_mask)
        text = self.text_norm(self.text_proj(text))
        batch, length, d = text.shape
        query = self.query.to(text.dtype).expand(batch, 1, d)
        x = torch.cat([query, text], dim=1) + _sinusoidal_positions(length + 1, d, text.device, text.dtype)
        mask = torch.cat([text_mask.new_ones(batch, 1), text_mask], dim=1)
        features = self.feature_norm(self.feature_proj(features))
        for layer in self.layers:
            x = layer(x, mask, features, feature_mask)
        pooled = self.norm(x[:, 0])
        return self.type_classifier(pooled), self.level_classifier(pooled)


# ----------------------------------------------------------------------------------------------------- models
def _as_layer_list(layer: int | Sequence[int]) -> list[int]:
    return [layer] if isinstance(layer, int) else list(layer)


def _select_vision_features(hidden_states, layer: int | Sequence[int], strategy: str) -> torch.Tensor:
    pool = [hidden_states[i] for i in _as_layer_list(layer)]
    if strategy == "default":
        pool = [h[:, 1:] for h in pool]
    return torch.cat(pool, dim=-1)


class SafeVLMPreTrainedModel(LlavaPreTrainedModel):
    config: SafeVLMConfig
    config_class = SafeVLMConfig

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Linear/LayerNorm layers of the safety modules use the generic initialization; only the raw parameters
        # (token sets, head query) need their own.
        if isinstance(module, SafeVLMSafetyTokens):
            init.normal_(module.llm_tokens, mean=0.0, std=self.config.safety_initializer_range)
            init.normal_(module.head_tokens, mean=0.0, std=self.config.safety_initializer_range)
        elif isinstance(module, SafeVLMSafetyHead):
            init.normal_(module.query, mean=0.0, std=self.config.safety_initializer_range)
        else:
            super()._init_weights(module)


class SafeVLMModel(SafeVLMPreTrainedModel, LlavaModel):
    """LLaVA's base model plus the safety branch (projector, token sets, head)."""

    def __init__(self, config: SafeVLMConfig):
        # LlavaModel.__init__ ends with post_init(); the safety modules must exist before it runs so that they are
        # initialized like every other weight, so the (three-line) body is written out here instead of calling it.
        SafeVLMPreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.safety_projector = SafeVLMSafetyProjector(config)
        self.safety_tokens = SafeVLMSafetyTokens(config)
        self.safety_head = SafeVLMSafetyHead(config)
        self.post_init()

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        return_safety_features: bool = True,
        return_llm_features: bool = True,
        **kwargs,
    ) -> SafeVLMImageFeaturesOutput:
        """Run the vision tower once and return both paths' features.

        `vision_feature_layer` (per call, e.g. an ICET early exit) selects the LLM path's layer only; the safety
        projector always reads `config.safety_feature_layer`. `return_llm_features=False` (the classify-only path)
        skips LLaVA's projector, which a verdict never reads.
        """
        config = self.config
        llm_layer = vision_feature_layer if vision_feature_layer is not None else config.vision_feature_layer
        llm_strategy = vision_feature_select_strategy or config.vision_feature_select_strategy
        num_layers = config.vision_config.num_hidden_layers
        for layer in _as_layer_list(llm_layer):
            if not -(num_layers + 1) <= layer <= num_layers:
                raise ValueError(
                    f"vision_feature_layer {layer} is outside the vision encoder, which has hidden states "
                    f"{-(num_layers + 1)}..{num_layers} (0 = embeddings)."
                )
        wanted = _as_layer_list(llm_layer)
        if return_safety_features:
            wanted += _as_layer_list(config.safety_feature_layer)
        # Normalise to non-negative indices so that e.g. -2 and 22 are captured once.
        capture = sorted({layer % (num_layers + 1) for layer in wanted})
        if image_sizes is not None:
            kwargs["image_sizes"] = image_sizes
        kwargs.pop("output_hidden_states", None)
        vision_outputs = self.vision_tower(pixel_values, output_hidden_states=capture, return_dict=True, **kwargs)
        hidden_states = vision_outputs.hidden_states

        selected_llm = _select_vision_features(hidden_states, llm_layer, llm_strategy)
        num_placeholders = [selected_llm.shape[1] + config.num_safety_tokens] * selected_llm.shape[0]
        llm_features = None
        if return_llm_features:
            image_features = self.multi_modal_projector(selected_llm)
            llm_tokens = self.safety_tokens.llm_tokens.to(image_features.dtype)
            llm_features = [torch.cat([features, llm_tokens], dim=0) for features in image_features]

        safety_features = None
        if return_safety_features:
            selected = _select_vision_features(
                hidden_states, config.safety_feature_layer, config.safety_feature_select_strategy
            )
            safety_features = list(self.safety_projector(selected.to(self.safety_projector.linear_1.weight.dtype)))
        return SafeVLMImageFeaturesOutput(
            last_hidden_state=vision_outputs.last_hidden_state,
            pooler_output=llm_features,
            hidden_states=None,
            attentions=vision_outputs.attentions,
            safety_features=safety_features,
            num_placeholder_tokens=num_placeholders,
        )

    def _image_placeholder_mask(self, input_ids, inputs_embeds) -> torch.Tensor:
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        image_embed = self.get_input_embeddings()(
            torch.tensor(self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
        )
        return (inputs_embeds == image_embed).all(-1)

    @staticmethod
    def _placeholder_counts(image_outputs: BaseModelOutputWithPooling) -> list[int]:
        # `generate` hands the LLM path a plain output (pooler_output only), possibly expanded for beams.
        counts = getattr(image_outputs, "num_placeholder_tokens", None)
        return counts if counts is not None else [len(features) for features in image_outputs.pooler_output]

    def _check_placeholders(self, placeholder_mask: torch.Tensor, image_outputs: BaseModelOutputWithPooling) -> None:
        counts = self._placeholder_counts(image_outputs)
        expected = sum(counts)
        found = int(placeholder_mask.sum().item())
        if found != expected:
            per_image = counts[0] if counts else 0
            raise ValueError(
                f"The prompt has {found} image placeholder tokens but the {len(counts)} image(s) "
                f"need {expected} ({per_image} per image = image tokens + num_safety_tokens="
                f"{self.config.num_safety_tokens}). Prepare inputs with SafeVLMProcessor (its num_safety_tokens must "
                "equal config.num_safety_tokens) and keep one '<image>' per image in the text."
            )

    def build_safety_features(
        self,
        placeholder_mask: torch.Tensor,
        image_outputs: SafeVLMImageFeaturesOutput | None,
        batch_size: int,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: safety tokens set 2 followed by the safety projector's output for each of the row's images.

        Returns `(features, mask)` padded to the longest row; a text-only row gets set 2 alone.
        """
        head_tokens = self.safety_tokens.head_tokens.to(dtype)
        device = head_tokens.device
        rows: list[list[torch.Tensor]] = [[head_tokens] for _ in range(batch_size)]
        if image_outputs is not None and image_outputs.safety_features is not None:
            self._check_placeholders(placeholder_mask, image_outputs)
            # Assign images to rows in order, using each image's placeholder count.
            image_index = 0
            for row, count in enumerate(placeholder_mask.sum(dim=1).tolist()):
                while count > 0:
                    count -= image_outputs.num_placeholder_tokens[image_index]
                    rows[row].append(image_outputs.safety_features[image_index].to(device, dtype))
                    image_index += 1
        lengths = [sum(part.shape[0] for part in parts) for parts in rows]
        features = head_tokens.new_zeros(batch_size, max(lengths), head_tokens.shape[-1])
        mask = torch.zeros(batch_size, max(lengths), dtype=torch.bool, device=device)
        for row, parts in enumerate(rows):
            joined = torch.cat(parts, dim=0)
            features[row, : joined.shape[0]] = joined
            mask[row, : joined.shape[0]] = True
        return features, mask

    def classify_safety(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_outputs: SafeVLMImageFeaturesOutput | None = None,
        safety_text_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Safety head logits `(type_logits, level_logits)` for a prompt batch.

        The head reads the prompt's token embeddings (padding and image placeholders excluded; `safety_text_mask`
        narrows it further, e.g. to exclude assistant turns during training) and the safety-enhanced features.
        """
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        placeholder_mask = self._image_placeholder_mask(input_ids, inputs_embeds)
        text_mask = ~placeholder_mask
        if attention_mask is not None:
            text_mask &= attention_mask.to(torch.bool)
        if safety_text_mask is not None:
            text_mask &= safety_text_mask.to(torch.bool)
        head_device = self.safety_head.query.device
        head_dtype = self.safety_head.query.dtype
        features, feature_mask = self.build_safety_features(
            placeholder_mask, image_outputs, inputs_embeds.shape[0], head_dtype
        )
        return self.safety_head(
            inputs_embeds.to(head_device, head_dtype), text_mask.to(head_device), features, feature_mask
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        safety_text_mask: torch.Tensor | None = None,
        compute_safety: bool | None = None,
        **kwargs,
    ) -> SafeVLMModelOutputWithPast:
        r"""
        safety_text_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
            1 for the tokens the safety head may read (e.g. the prompt without assistant turns); defaults to every
            non-padding text token.
        compute_safety (`bool`, *optional*):
            Run the safety head. Defaults to `True` on a prompt pass (no cache yet) and `False` when decoding.
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if pixel_values is not None and mm_encoder_outputs:
            raise ValueError("You cannot specify both pixel_values and mm_encoder_outputs at the same time")
        mm_encoder_outputs = dict(mm_encoder_outputs or {})
        image_outputs = mm_encoder_outputs.get("image")
        if image_outputs is None and pixel_values is not None:
            image_outputs = self.get_image_features(
                pixel_values=pixel_values,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                image_sizes=image_sizes,
            )
            mm_encoder_outputs["image"] = image_outputs
        if compute_safety is None:
            compute_safety = past_key_values is None or past_key_values.get_seq_length() == 0

        if image_outputs is not None:
            self._check_placeholders(self._image_placeholder_mask(input_ids, inputs_embeds), image_outputs)

        outputs = super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            mm_encoder_outputs=mm_encoder_outputs,
            **kwargs,
        )
        type_logits = level_logits = None
        if compute_safety:
            type_logits, level_logits = self.classify_safety(
                input_ids=input_ids,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                image_outputs=image_outputs,
                safety_text_mask=safety_text_mask,
            )
        return SafeVLMModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
            safety_type_logits=type_logits,
            safety_level_logits=level_logits,
        )


class SafeVLMForConditionalGeneration(SafeVLMPreTrainedModel, LlavaForConditionalGeneration):
    """LLaVA for generation with the SafeVLM safety branch and level-based refusal gating in `generate()`."""

    def __init__(self, config: SafeVLMConfig):
        # Same reason as SafeVLMModel: build the SafeVLM base model directly rather than a LlavaModel first.
        SafeVLMPreTrainedModel.__init__(self, config)
        self.model = SafeVLMModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self._safety_tokenizer = None
        self._safety_message_cache: dict[tuple[int, str], list[int]] = {}
        self.post_init()

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """`PreTrainedModel.save_pretrained`, plus what a `trust_remote_code` load needs from every Auto class.

        `register_for_auto_class` records one model class; the config's `auto_map` here names all four (AutoConfig,
        AutoModel, AutoModelForImageTextToText, AutoProcessor). The processing file is copied by transformers itself,
        as a relative import of this file. A model card (README.md) is generated from the config unless the folder
        holds one written by a person (`overwrite_model_card=True` replaces it).
        """
        overwrite_model_card = kwargs.pop("overwrite_model_card", False)
        module = type(self).__module__.rsplit(".", 1)[-1]
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map["AutoModelForImageTextToText"] = f"{module}.{type(self).__name__}"
        auto_map["AutoProcessor"] = "processing_safevlm.SafeVLMProcessor"
        self.config.auto_map = auto_map
        super().save_pretrained(save_directory, *args, **kwargs)
        is_main_process = args[0] if args else kwargs.get("is_main_process", True)
        if is_main_process:
            write_model_card(save_directory, self.config, overwrite=overwrite_model_card)

    def _upload_modified_files(self, working_dir, repo_id, *args, **kwargs):
        # transformers' push_to_hub (and save_pretrained(push_to_hub=True)) replace README.md with the Hub's card or
        # their stub just before uploading: put the generated card back (a card written by a person is kept).
        write_model_card(working_dir, self.config, repo_id=repo_id)
        return super()._upload_modified_files(working_dir, repo_id, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        try:
            return super().from_pretrained(*args, **kwargs)
        except RuntimeError as err:
            if "ignore_mismatched_sizes" not in str(err):
                raise
            config = kwargs.get("config")
            if config is None and args:
                try:
                    config = cls.config_class.from_pretrained(args[0])
                except (OSError, ValueError):
                    config = None
            types = getattr(config, "safety_types", None)
            levels = getattr(config, "safety_levels", None)
            raise ValueError(
                "Checkpoint weights do not fit this config (see the load report above). A safety head trained for "
                "another label space is the usual cause: the config lists "
                f"{len(types) if types else '?'} safety_types and {len(levels) if levels else '?'} safety_levels, and "
                "the type_classifier/level_classifier must have as many outputs. Keep the checkpoint's label lists, "
                "or pass ignore_mismatched_sizes=True to re-initialize the mismatched weights and retrain them."
            ) from err

    # ------------------------------------------------------------------------------------------------ conversion
    @classmethod
    def from_llava(cls, model_or_path: Any, **safety_overrides: Any) -> "SafeVLMForConditionalGeneration":
        """Turn a LLaVA model (object or checkpoint path/Hub id) into a SafeVLM.

        Every base weight (vision tower, projector, LLM, lm_head) is carried over unchanged; only the safety modules
        are newly initialized. Keyword arguments that are `SafeVLMConfig` fields (e.g. `num_safety_tokens`) override
        the safety settings; the others (e.g. `dtype`, `attn_implementation`, `revision`) go to `from_pretrained`.
        """
        config_fields = set(SafeVLMConfig.__dataclass_fields__)
        overrides = {k: v for k, v in safety_overrides.items() if k in config_fields}
        load_kwargs = {k: v for k, v in safety_overrides.items() if k not in config_fields}
        if isinstance(model_or_path, (str, os.PathLike)):
            from transformers import AutoConfig

            config_kwargs = {
                k: load_kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in load_kwargs
            }
            base_config = AutoConfig.from_pretrained(model_or_path, **config_kwargs)
            config = SafeVLMConfig.from_llava_config(base_config, **overrides)  # records safety_base_model
            return cls.from_pretrained(model_or_path, config=config, **load_kwargs)
        if load_kwargs:
            raise TypeError(
                f"from_llava got unknown keyword(s) {sorted(load_kwargs)} for an in-memory model; pass SafeVLMConfig "
                "fields only (loading options apply to paths)."
            )
        source = model_or_path
        config = SafeVLMConfig.from_llava_config(source.config, **overrides)
        config._attn_implementation = getattr(source.config, "_attn_implementation", None)
        reference = next(source.parameters())
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device=reference.device)
        state = source.state_dict()
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if ".safety_" not in k]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"from_llava: the LLaVA weights do not fit (missing {missing[:5]}, unexpected "
                f"{result.unexpected_keys[:5]}); is this a LlavaForConditionalGeneration?"
            )
        for name, buffer in source.named_buffers():  # non-persistent buffers (e.g. rotary inv_freq) are not in state
            model.get_buffer(name).copy_(buffer)
        model.to(reference.dtype)
        model.init_safety_modules()
        model.generation_config = source.generation_config
        return model.train(source.training)

    def init_safety_modules(self) -> None:
        """(Re)initialize the safety projector, both token sets and the head; base weights are not touched."""
        for module in self.safety_modules().values():
            for submodule in module.modules():
                self._init_weights(submodule)

    def safety_modules(self) -> dict[str, nn.Module]:
        """The modules that make up the safety branch, by attribute name."""
        return {
            "safety_projector": self.model.safety_projector,
            "safety_tokens": self.model.safety_tokens,
            "safety_head": self.model.safety_head,
        }

    # ------------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_sizes: torch.Tensor | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        safety_type_labels: torch.LongTensor | None = None,
        safety_level_labels: torch.LongTensor | None = None,
        safety_text_mask: torch.Tensor | None = None,
        compute_safety: bool | None = None,
        **kwargs,
    ) -> SafeVLMCausalLMOutputWithPast:
        r"""
        safety_type_labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Risk-type targets (index into `config.safety_types`; -100 to ignore a row).
        safety_level_labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Risk-level targets (0..len(config.safety_levels)-1; -100 to ignore a row).
        safety_text_mask (`torch.Tensor`, *optional*):
            Tokens the safety head may read; see [`SafeVLMModel.forward`].
        compute_safety (`bool`, *optional*):
            Force the safety head on or off (default: on for prompt passes).
        """
        wants_safety_loss = safety_type_labels is not None or safety_level_labels is not None
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            image_sizes=image_sizes,
            mm_encoder_outputs=mm_encoder_outputs,
            safety_text_mask=safety_text_mask,
            compute_safety=True if wants_safety_loss else compute_safety,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        lm_loss = safety_loss = loss = None
        if labels is not None:
            lm_loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        if wants_safety_loss:
            safety_loss = self._safety_loss(
                outputs.safety_type_logits, outputs.safety_level_logits, safety_type_labels, safety_level_labels
            )
        if lm_loss is not None or safety_loss is not None:
            loss = lm_loss if lm_loss is not None else 0.0
            if safety_loss is not None:
                loss = loss + self.config.safety_loss_weight * safety_loss

        return SafeVLMCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
            lm_loss=lm_loss,
            safety_loss=safety_loss,
            safety_type_logits=outputs.safety_type_logits,
            safety_level_logits=outputs.safety_level_logits,
        )

    def _safety_loss(self, type_logits, level_logits, type_labels, level_labels) -> torch.Tensor:
        loss = type_logits.new_zeros(())
        for name, logits, labels, names in (
            ("safety_type_labels", type_logits, type_labels, self.config.safety_types),
            ("safety_level_labels", level_logits, level_labels, self.config.safety_levels),
        ):
            if labels is None:
                continue
            labels = labels.to(logits.device).view(-1)
            bad = (labels != -100) & ((labels < 0) | (labels >= len(names)))
            if bool(bad.any()):
                row = int(bad.nonzero()[0, 0])
                raise ValueError(
                    f"{name}[{row}] = {int(labels[row])} is not a valid label: use 0..{len(names) - 1} "
                    f"({list(names)}) or -100 to ignore the row."
                )
            if bool((labels != -100).any()):
                loss = loss + F.cross_entropy(logits.float(), labels, ignore_index=-100)
        return loss

    # ------------------------------------------------------------------------------------------------ safety API
    @torch.no_grad()
    def predict_safety(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        safety_text_mask: torch.Tensor | None = None,
        **unused: Any,
    ) -> SafeVLMSafetyPrediction:
        """Classify-only path: vision tower + safety branch + head, no LLM forward.

        Accepts a processor's outputs (`**processor(images=..., text=...)`); returns logits and probabilities.
        """
        image_outputs = None
        if pixel_values is not None:
            image_outputs = self.model.get_image_features(
                pixel_values=pixel_values, image_sizes=image_sizes, return_llm_features=False
            )
        return self._predict_from_image_outputs(
            input_ids, inputs_embeds, attention_mask, image_outputs, safety_text_mask
        )

    def _predict_from_image_outputs(
        self, input_ids, inputs_embeds, attention_mask, image_outputs, safety_text_mask=None
    ):
        type_logits, level_logits = self.model.classify_safety(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            image_outputs=image_outputs,
            safety_text_mask=safety_text_mask,
        )
        return SafeVLMSafetyPrediction(
            type_logits=type_logits,
            level_logits=level_logits,
            type_probs=type_logits.float().softmax(-1),
            level_probs=level_logits.float().softmax(-1),
        )

    def safety_policy(self, safety_policy: SafetyPolicy | dict | str | None = None) -> SafetyPolicy:
        """The policy in force: `safety_policy` if given (validated), else the checkpoint's `config.safety_policy`."""
        return SafetyPolicy.coerce(
            safety_policy if safety_policy is not None else self.config.safety_policy,
            self.config.safety_types,
            len(self.config.safety_levels),
        )

    def verdicts_from_prediction(
        self, prediction: SafeVLMSafetyPrediction, policy: SafetyPolicy, safety_profile: str | None = None
    ) -> list[SafetyVerdict]:
        type_probs = prediction.type_probs.tolist()
        level_probs = prediction.level_probs.tolist()
        return [
            policy.decide(t, l, self.config.safety_types, self.config.safety_levels, safety_profile)
            for t, l in zip(type_probs, level_probs)
        ]

    @torch.no_grad()
    def assess(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        safety_profile: str | None = None,
        safety_policy: SafetyPolicy | dict | str | None = None,
        **unused: Any,
    ) -> list[SafetyVerdict]:
        """One :class:`SafetyVerdict` per row (category, level, action, forced message, probabilities).

        `safety_profile` picks the audience/region profile (default: the policy's `default_profile`);
        `safety_policy` replaces the checkpoint's policy for this call only.
        """
        policy = self.safety_policy(safety_policy)
        prediction = self.predict_safety(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            image_sizes=image_sizes,
        )
        return self.verdicts_from_prediction(prediction, policy, safety_profile)

    # ------------------------------------------------------------------------------------------------ generation
    def set_safety_tokenizer(self, tokenizer: Any) -> None:
        """Tokenizer used to encode refusal/caution messages (loaded from the checkpoint folder when not set)."""
        self._safety_tokenizer = tokenizer
        self._safety_message_cache = {}

    def _resolve_safety_tokenizer(self, tokenizer: Any = None) -> Any:
        if tokenizer is not None:
            return tokenizer
        if self._safety_tokenizer is None:
            source = getattr(self, "name_or_path", None) or self.config._name_or_path
            if source:
                from transformers import AutoTokenizer

                try:
                    # Local files only: the checkpoint folder or the Hub cache filled when the processor was loaded.
                    self._safety_tokenizer = AutoTokenizer.from_pretrained(
                        source, config=self.config, local_files_only=True, trust_remote_code=False
                    )
                except (OSError, ValueError) as err:
                    logger.info(f"No tokenizer found at {source!r}: {err}")
        if self._safety_tokenizer is None:
            raise ValueError(
                "Safety gating needs a tokenizer to encode refusal/caution messages, and none was found next to the "
                "checkpoint. Pass `tokenizer=processor.tokenizer` to generate(), or call "
                "`model.set_safety_tokenizer(processor.tokenizer)` once."
            )
        return self._safety_tokenizer

    def _encode_message(self, tokenizer: Any, text: str) -> list[int]:
        key = (id(tokenizer), text)
        if key not in self._safety_message_cache:
            self._safety_message_cache[key] = list(tokenizer.encode(text, add_special_tokens=False))
        return self._safety_message_cache[key]

    def _get_logits_processor(self, *args, **kwargs) -> LogitsProcessorList:
        # The gate must see the final scores: move it behind every processor and warper transformers adds.
        processors = super()._get_logits_processor(*args, **kwargs)
        gates = [p for p in processors if isinstance(p, SafetyGateLogitsProcessor)]
        ordered = LogitsProcessorList([p for p in processors if not isinstance(p, SafetyGateLogitsProcessor)])
        ordered.extend(gates)
        return ordered

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config=None,
        logits_processor: LogitsProcessorList | list | None = None,
        *,
        safety_profile: str | None = None,
        safety_policy: SafetyPolicy | dict | str | None = None,
        safety_gating: bool = True,
        **kwargs,
    ):
        r"""
        [`~GenerationMixin.generate`] with level-based refusal gating.

        The prompt is assessed once, before the first token (the vision tower runs once and its output is reused by
        the LLM), and each row's verdict is enforced by a [`SafetyGateLogitsProcessor`] that runs after every other
        logits processor: `"refuse"` rows produce exactly the refusal message then EOS, `"caution"` rows start with
        the caution prefix, `"answer"` rows are untouched.

        Args:
            safety_profile (`str`, *optional*): audience/region profile of the policy (e.g. `"minor"`).
            safety_policy (`SafetyPolicy | dict | str`, *optional*): replaces the checkpoint's policy for this call.
            safety_gating (`bool`, defaults to `True`): `False` is the one explicit opt-out.
            tokenizer (*optional*): tokenizer for the messages (see [`set_safety_tokenizer`]).

        With `return_dict_in_generate=True` the output carries `safety_verdicts` (one per input row).
        """
        if safety_gating is not True and safety_gating is not False:
            raise TypeError(f"safety_gating must be True or False, got {safety_gating!r}.")
        kwargs["compute_safety"] = False  # the head runs here, once; never again inside the decoding loop
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        pixel_values = kwargs.pop("pixel_values", None)
        image_outputs = None
        if pixel_values is not None:
            # Encode once; the LLM path reuses it through mm_encoder_outputs, the safety branch through image_outputs.
            image_outputs = self.model.get_image_features(
                pixel_values=pixel_values,
                vision_feature_layer=kwargs.get("vision_feature_layer"),
                vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"),
                image_sizes=kwargs.get("image_sizes"),
                return_safety_features=safety_gating,
            )
            kwargs["mm_encoder_outputs"] = {
                "image": BaseModelOutputWithPooling(pooler_output=image_outputs.pooler_output)
            }

        if not safety_gating:
            return super().generate(inputs, generation_config, logits_processor, **kwargs)

        if kwargs.get("custom_generate") is not None:
            raise ValueError(
                "custom_generate cannot be combined with safety gating (its decoding loop may skip the gate). "
                "Pass safety_gating=False explicitly if you accept ungated output."
            )
        policy = self.safety_policy(safety_policy)
        profile = safety_profile if safety_profile is not None else policy.default_profile
        policy.profile_info(profile)  # unknown profile -> clear error listing the known ones
        prediction = self._predict_from_image_outputs(
            input_ids, kwargs.get("inputs_embeds"), kwargs.get("attention_mask"), image_outputs
        )
        verdicts = self.verdicts_from_prediction(prediction, policy, profile)

        gen_config = generation_config if generation_config is not None else self.generation_config
        eos = kwargs.get("eos_token_id", gen_config.eos_token_id)
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        if eos is None and any(v.action == "refuse" for v in verdicts):
            raise ValueError("Refusal gating needs an eos_token_id (generation_config.eos_token_id is None).")
        forced: list[list[int] | None] = []
        needs_tokenizer = any(v.action != "answer" for v in verdicts)
        tokenizer = self._resolve_safety_tokenizer(kwargs.get("tokenizer")) if needs_tokenizer else None
        for verdict in verdicts:
            forced.append(None if verdict.action == "answer" else self._encode_message(tokenizer, verdict.message))
        gate = SafetyGateLogitsProcessor(
            forced_token_ids=forced,
            end_with_eos=[v.action == "refuse" for v in verdicts],
            eos_token_id=eos,
            prompt_length=input_ids.shape[1] if input_ids is not None else 0,
        )
        processors = LogitsProcessorList(list(logits_processor) if logits_processor is not None else [])
        processors.append(gate)
        output = super().generate(inputs, generation_config, processors, **kwargs)
        if isinstance(output, ModelOutput):
            output["sequences"] = gate.enforce(output["sequences"])
            output["safety_verdicts"] = verdicts
            return output
        return gate.enforce(output)


SafeVLMConfig.register_for_auto_class()
SafeVLMForConditionalGeneration.register_for_auto_class("AutoModel")

__all__ = [
    "SafeVLMForConditionalGeneration",
    "SafeVLMModel",
    "SafeVLMPreTrainedModel",
    "SafeVLMSafetyHead",
    "SafeVLMSafetyProjector",
    "SafeVLMSafetyTokens",
]
