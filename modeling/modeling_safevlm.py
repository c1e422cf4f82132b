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

This file subclasses LLaVA and overrides only what SafeVLM changes: the image features (set 1 appended, safety
features beside them), ``forward`` (safety logits and loss added to LLaVA's outputs) and ``generate`` (the gate).
Everything it uses from transformers beyond the public API is listed in ``TRANSFORMERS_INTERNALS`` with the reason,
and a test fails when the code starts using a name that is not listed there.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import transformers
from transformers import (
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaNextForConditionalGeneration,
    LlavaNextModel,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.generation import GenerateDecoderOnlyOutput, GenerationMode, LogitsProcessorList
from transformers.modeling_outputs import BaseModelOutputWithPooling, ModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llava.modeling_llava import (
    LlavaCausalLMOutputWithPast,
    LlavaModelOutputWithPast,
    LlavaPreTrainedModel,
)
from transformers.models.llava_next.modeling_llava_next import LlavaNextPreTrainedModel, image_size_to_num_patches
from transformers.utils import can_return_tuple, logging

from .configuration_safevlm import SafeVLMConfig, SafeVLMNextConfig
from .gating_safevlm import GatePlan, SafetyGateLogitsProcessor
from .generation_safevlm import OutputLayout, RowPlan, assemble, images_by_row, run_rows
from .policy_safevlm import SafetyPolicy, SafetyVerdict
from .processing_safevlm import SafeVLMProcessor  # noqa: F401  (a relative import, so save_pretrained copies the file)


logger = logging.get_logger(__name__)

# What this file takes from transformers beyond the names exported at the top level, and why. A checkpoint's code is
# frozen at save time and runs under whatever transformers its user has, so every entry here is a place where a
# future release can break old checkpoints: keep the list short. `tests/test_transformers_range.py` fails when the
# code imports from a transformers submodule, or reaches a private (`_name`) attribute, that is not listed here.
TRANSFORMERS_INTERNALS: dict[str, str] = {
    "transformers.initialization": "the init functions `_init_weights` must use so loading skips loaded weights",
    "transformers.activations.ACT2FN": "the safety projector's activation, by the same names LLaVA's projector uses",
    "transformers.conversion_mapping.get_checkpoint_conversion_mapping": "llava-hf checkpoints use legacy keys",
    "transformers.conversion_mapping.register_checkpoint_conversion_mapping": "... converted for registered types",
    "transformers.generation.LogitsProcessorList": "the gate joins the caller's logits processors",
    "transformers.generation.GenerationMode": "gating allows only the decoding modes whose loop runs the gate",
    "transformers.generation.GenerateDecoderOnlyOutput": "the output of a call whose every row was refused",
    "transformers.modeling_outputs.BaseModelOutputWithPooling": "image features travel in LLaVA's own output type",
    "transformers.modeling_outputs.ModelOutput": "SafeVLMSafetyPrediction is a ModelOutput",
    "transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS": "the head's attention follows `attn_implementation`",
    "transformers.models.llava.modeling_llava.LlavaCausalLMOutputWithPast": "our outputs extend the installed ones",
    "transformers.models.llava.modeling_llava.LlavaModelOutputWithPast": "our outputs extend the installed ones",
    "transformers.models.llava.modeling_llava.LlavaPreTrainedModel": "the base of the SafeVLM classes",
    "transformers.models.llava_next.modeling_llava_next.LlavaNextPreTrainedModel": "the base of the NeXT classes",
    "transformers.models.llava_next.modeling_llava_next.image_size_to_num_patches": "anyres tiles per image",
    "transformers.utils.can_return_tuple": "`return_dict=False` support, as on LLaVA's own methods",
    "transformers.utils.logging": "transformers' logger",
    "transformers.processing_utils.MultiModalData": "the processor reports its per-image token count in it",
    "_init_weights": "the documented hook for initializing the safety modules' raw parameters",
    "_attn_implementation": "the config's attention implementation (read, as every transformers model does)",
    "_name_or_path": "where the checkpoint came from: the folder whose tokenizer encodes refusal messages",
}

# Oldest and newest transformers releases this code was tested with (see pyproject's range and `.ci/run`).
TESTED_TRANSFORMERS = ("5.23.0", "5.24.0")


def _release(version: str) -> tuple[int, int]:
    major, minor = (version.split(".") + ["0", "0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


if _release(transformers.__version__) > _release(TESTED_TRANSFORMERS[1]):
    logger.warning(
        f"This SafeVLM code was tested with transformers {TESTED_TRANSFORMERS[0]} to {TESTED_TRANSFORMERS[1]}; you "
        f"have {transformers.__version__}. If loading or generation fails, update the checkpoint's code files "
        "(see the safevlm-hf README, 'Updating an old checkpoint')."
    )

# transformers renamed the cache argument `past_key_values` to `cache` in 5.24 (the old name is accepted with a
# warning until 5.40). SafeVLM accepts both names from callers and hands LLaVA the one the installed release uses.
CACHE_ARG = "cache" if "cache" in LlavaModelOutputWithPast.__dataclass_fields__ else "past_key_values"
_CACHE_NAMES = ("cache", "past_key_values")

# llava-hf checkpoints store legacy keys (`language_model.model.*`, `language_model.lm_head`); transformers converts
# them only for registered model types, so a SafeVLM built from such a checkpoint would otherwise get a random lm_head.
register_checkpoint_conversion_mapping("safevlm", get_checkpoint_conversion_mapping("llava"), overwrite=True)
register_checkpoint_conversion_mapping("safevlm_next", get_checkpoint_conversion_mapping("llava_next"), overwrite=True)

# Decoding modes whose loop is transformers' own and runs every logits processor (the gate included). The others run
# Hub code (contrastive search, DoLa, group / constrained beam search) or a draft model (assisted generation).
GATED_GENERATION_MODES = frozenset(
    {GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE, GenerationMode.BEAM_SEARCH, GenerationMode.BEAM_SAMPLE}
)

# Called as `hook(save_directory, config, overwrite_model_card)` after each `save_pretrained` on the main process.
# The safevlm_hf package registers its model-card writer here: the card generator ships with the package, not in the
# code every checkpoint carries.
POST_SAVE_HOOKS: list[Callable[[str | os.PathLike, SafeVLMConfig, bool], None]] = []


def _pop_cache(kwargs: dict[str, Any]) -> Any:
    """Remove the cache from `kwargs` under either of its names and return it (None if absent)."""
    given = {name: kwargs.pop(name) for name in _CACHE_NAMES if kwargs.get(name) is not None}
    for name in _CACHE_NAMES:
        kwargs.pop(name, None)
    if len(given) > 1:
        raise ValueError("Pass the cache as `cache` or as `past_key_values`, not both.")
    return list(given.values())[0] if given else None


def _cache_length(cache: Any) -> int:
    return int(cache.get_seq_length()) if cache is not None else 0


@dataclass
class CachedSafetyContext:
    """Per row of a cached prefix: the safety features of its images (in prompt order) and the placeholders they fill.

    A cache built by `SafeVLMModel.forward` or a gated `generate` carries one as `cache.safevlm_safety_context`. A gated
    `generate` that continues from a cache reads it to assess the whole conversation; a cache without it (built
    elsewhere, or with images the safety branch never saw) cannot be assessed, and gating refuses it.
    """

    features: list[list[torch.Tensor]]
    placeholders: list[int]

    @classmethod
    def empty(cls, rows: int) -> "CachedSafetyContext":
        return cls(features=[[] for _ in range(rows)], placeholders=[0] * rows)


# ------------------------------------------------------------------------------------------------------ outputs
@dataclass
class SafeVLMImageOutputs(BaseModelOutputWithPooling):
    r"""
    Output of [`SafeVLMModel.get_image_features`]: LLaVA's image output with the safety branch beside it.

    pooler_output (`list[torch.Tensor]`, *optional*):
        Per image, the features the LLM reads: LLaVA's projected image tokens followed by safety tokens set 1,
        `(num_image_tokens + num_safety_tokens, text_hidden)`. `None` on the classify-only path.
    safety_features (`list[torch.Tensor]`, *optional*):
        Per image, the safety projector's output over `config.safety_feature_layer`, `(num_patches, text_hidden)`.
    num_placeholder_tokens (`list[int]`, *optional*):
        Per image, how many placeholder tokens it fills in the prompt (image tokens + safety tokens set 1).
    """

    safety_features: list[torch.Tensor] | None = None
    num_placeholder_tokens: list[int] | None = None


# The model and causal-LM outputs repeat the three safety fields: each extends its own installed LLaVA output class,
# and ModelOutput's tuple order follows the dataclass fields, which a shared mixin would make depend on the MRO.
@dataclass
class SafeVLMModelOutputWithPast(LlavaModelOutputWithPast):
    r"""
    LLaVA's model output (whatever fields the installed transformers gives it) plus the safety head's logits.

    safety_type_logits (`torch.Tensor` of shape `(batch_size, num_safety_types)`, *optional*):
        Risk-type logits of the safety head (computed on the prompt pass only).
    safety_level_logits (`torch.Tensor` of shape `(batch_size, num_safety_levels)`, *optional*):
        Risk-level logits of the safety head.
    safety_subcategory_logits (`torch.Tensor` of shape `(batch_size, 1 + num_safety_subcategories)`, *optional*):
        Sub-category logits ("none" first), when the config lists sub-categories.
    """

    safety_type_logits: torch.Tensor | None = None
    safety_level_logits: torch.Tensor | None = None
    safety_subcategory_logits: torch.Tensor | None = None


@dataclass
class SafeVLMCausalLMOutputWithPast(LlavaCausalLMOutputWithPast):
    r"""
    LLaVA's causal-LM output plus the safety head's logits and the two loss terms.

    loss (`torch.Tensor`, *optional*):
        `lm_loss + safety_loss_weight * safety_loss` for the labels given.
    lm_loss (`torch.Tensor`, *optional*):
        Next-token loss alone.
    safety_loss (`torch.Tensor`, *optional*):
        `CE(type) + CE(level) [+ CE(sub-category)]` alone (unweighted).
    safety_type_logits (`torch.Tensor` of shape `(batch_size, num_safety_types)`, *optional*):
        Risk-type logits of the safety head.
    safety_level_logits (`torch.Tensor` of shape `(batch_size, num_safety_levels)`, *optional*):
        Risk-level logits of the safety head.
    safety_subcategory_logits (`torch.Tensor` of shape `(batch_size, 1 + num_safety_subcategories)`, *optional*):
        Sub-category logits ("none" first), when the config lists sub-categories.
    """

    lm_loss: torch.Tensor | None = None
    safety_loss: torch.Tensor | None = None
    safety_type_logits: torch.Tensor | None = None
    safety_level_logits: torch.Tensor | None = None
    safety_subcategory_logits: torch.Tensor | None = None


@dataclass
class SafeVLMSafetyPrediction(ModelOutput):
    r"""
    Output of [`SafeVLMForConditionalGeneration.predict_safety`].

    type_logits / level_logits: raw head outputs `(batch_size, num_types)` / `(batch_size, num_levels)`.
    type_probs / level_probs: their softmax.
    subcategory_logits / subcategory_probs: `(batch_size, 1 + num_subcategories)`, "none" first; `None` when the
        config lists no sub-categories.
    """

    type_logits: torch.Tensor | None = None
    level_logits: torch.Tensor | None = None
    type_probs: torch.Tensor | None = None
    level_probs: torch.Tensor | None = None
    subcategory_logits: torch.Tensor | None = None
    subcategory_probs: torch.Tensor | None = None


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

    def forward(self, which: str) -> torch.Tensor:
        """Set ``"llm"`` (1) or ``"head"`` (2). Read through a call, not as attributes, so that module hooks see the
        read (accelerate's offloading loads a module's weights only when it is called)."""
        if which not in ("llm", "head"):
            raise ValueError(f"SafeVLMSafetyTokens: `which` must be 'llm' or 'head', got {which!r}.")
        tokens = self.llm_tokens if which == "llm" else self.head_tokens
        # Detached when grad is off: there a Parameter (or a view of it) still says requires_grad yet has no autograd
        # node, which crashes forward hooks that hook gradients (torch's ModuleTracker, so FlopCounterMode).
        return tokens if torch.is_grad_enabled() else tokens.detach()


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention with an additive mask; `(batch, heads, len, dim)` in, `(batch, len, heads, dim)` out."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling + attention_mask
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class SafeVLMHeadAttention(nn.Module):
    """Multi-head attention of `x` over `context` with a boolean key mask (True = attend).

    It dispatches through transformers' attention interface, so `attn_implementation` and `set_attn_implementation`
    reach it like every other attention layer. Kernels that need their own mask layout (flash, flex) are not used for
    this small, non-causal, cross-attending head: it runs SDPA then.
    """

    is_causal = False

    def __init__(self, config: SafeVLMConfig):
        super().__init__()
        hidden = config.safety_head_hidden_size
        self.config = config
        self.num_heads = config.safety_head_num_attention_heads
        self.head_dim = hidden // self.num_heads
        self.dropout = config.safety_head_dropout
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.o_proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        batch, q_len, hidden = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)

        query, key, value = split(self.q_proj(x)), split(self.k_proj(context)), split(self.v_proj(context))
        implementation = self.config._attn_implementation
        attention = eager_attention_forward
        if implementation != "eager":
            attention = ALL_ATTENTION_FUNCTIONS.get_interface("sdpa", eager_attention_forward)
        additive_mask = torch.zeros(context_mask.shape, dtype=query.dtype, device=query.device)
        additive_mask = additive_mask.masked_fill(~context_mask, torch.finfo(query.dtype).min)[:, None, None, :]
        output, _ = attention(
            self, query, key, value, additive_mask, dropout=self.dropout if self.training else 0.0, is_causal=False
        )
        return self.o_proj(output.reshape(batch, q_len, hidden))


class SafeVLMSafetyHeadLayer(nn.Module):
    """Pre-norm block: self-attention over the text stream, cross-attention to the safety features, MLP."""

    def __init__(self, config: SafeVLMConfig):
        super().__init__()
        d = config.safety_head_hidden_size
        self.self_attn_norm = nn.LayerNorm(d)
        self.self_attn = SafeVLMHeadAttention(config)
        self.cross_attn_norm = nn.LayerNorm(d)
        self.cross_attn = SafeVLMHeadAttention(config)
        self.mlp_norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(
            nn.Linear(d, config.safety_head_intermediate_size),
            nn.GELU(),
            nn.Linear(config.safety_head_intermediate_size, d),
            nn.Dropout(config.safety_head_dropout),
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
        # Only for configs that list sub-categories ("none" + one per sub-category), so older checkpoints load as they are.
        self.subcategory_classifier = (
            nn.Linear(d, len(config.safety_subcategories) + 1) if config.safety_subcategories else None
        )

    def forward(
        self,
        text_embeds: torch.Tensor,
        text_mask: torch.Tensor,
        features: torch.Tensor,
        feature_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
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
        subcategory = self.subcategory_classifier(pooled) if self.subcategory_classifier is not None else None
        return self.type_classifier(pooled), self.level_classifier(pooled), subcategory


# ----------------------------------------------------------------------------------------------------- helpers
def _as_layer_list(layer: int | Sequence[int]) -> list[int]:
    return [layer] if isinstance(layer, int) else list(layer)


def _select_vision_features(hidden_states, layer: int | Sequence[int], strategy: str) -> torch.Tensor:
    pool = [hidden_states[i] for i in _as_layer_list(layer)]
    if strategy == "default":
        pool = [h[:, 1:] for h in pool]
    return torch.cat(pool, dim=-1)


def _token_mask(attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """`(batch, length)` True for tokens that are not padding, from a 2-D padding mask or a 4-D attention mask.

    In a 4-D mask (`(batch, heads, query, key)` for packed or shared-prefix batches; boolean True = attend, or
    additive 0 = attend) a key that no query attends to is padding. Trainers often let padded queries attend to
    themselves (to avoid empty softmax rows), so `_safety_logits` also drops `pad_token_id` positions.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 4:
        if attention_mask.dtype == torch.bool:
            allowed = attention_mask
        else:
            allowed = attention_mask > torch.finfo(attention_mask.dtype).min / 2
        return allowed.any(dim=1).any(dim=1)[:, -length:]
    return attention_mask[:, -length:].to(torch.bool)


# ----------------------------------------------------------------------------------------------------- models
class SafeVLMPreTrainedMixin:
    """Initialization of the safety modules' raw parameters (token sets, head query), for every SafeVLM family."""

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


class SafeVLMPreTrainedModel(SafeVLMPreTrainedMixin, LlavaPreTrainedModel):
    config: SafeVLMConfig
    config_class = SafeVLMConfig


class SafeVLMNextPreTrainedModel(SafeVLMPreTrainedMixin, LlavaNextPreTrainedModel):
    config: SafeVLMNextConfig
    config_class = SafeVLMNextConfig


class SafeVLMModelMixin:
    """The safety branch on a LLaVA-family base model: the modules, their features, the head and `forward`.

    A family's model class adds `get_image_features` (the family's own, with safety tokens set 1 appended and the
    safety features beside them) and builds the safety modules in `__init__` with `_add_safety_modules`.
    """

    def _add_safety_modules(self) -> None:
        config = self.config
        self.safety_projector = SafeVLMSafetyProjector(config)
        self.safety_tokens = SafeVLMSafetyTokens(config)
        self.safety_head = SafeVLMSafetyHead(config)
        self.post_init()  # initializes the safety modules; the base model's own are already marked initialized

    # ---------------------------------------------------------------------------------------------- image path
    def _check_vision_layers(self, layers: int | Sequence[int], name: str) -> None:
        num_layers = self.config.vision_config.num_hidden_layers
        for layer in _as_layer_list(layers):
            if not -(num_layers + 1) <= layer <= num_layers:
                raise ValueError(
                    f"{name} {layer} is outside the vision encoder, which has hidden states "
                    f"{-(num_layers + 1)}..{num_layers} (0 = embeddings)."
                )

    def _project_safety_features(self, hidden_states) -> torch.Tensor:
        """The safety projector over `config.safety_feature_layer` of a vision pass (every image or tile)."""
        selected = _select_vision_features(
            hidden_states, self.config.safety_feature_layer, self.config.safety_feature_select_strategy
        )
        return self.safety_projector(selected.to(self.safety_projector.linear_1.weight.dtype))

    def _image_call(self, layer: Any, strategy: str | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Arguments of the family's own `get_image_features` for one vision pass serving the LLM path (at `layer`)
        and the safety branch (at `config.safety_feature_layer`); `output_hidden_states=True` still returns all."""
        layer = layer if layer is not None else self.config.vision_feature_layer
        self._check_vision_layers(layer, "vision_feature_layer")
        requested = kwargs.pop("output_hidden_states", None)
        kwargs.pop("return_dict", None)
        if requested is True:
            capture: bool | list[int] = True
        else:
            num_states = self.config.vision_config.num_hidden_layers + 1
            wanted = _as_layer_list(layer) + _as_layer_list(self.config.safety_feature_layer)
            wanted += _as_layer_list(requested) if requested not in (None, False) else []
            capture = sorted({index % num_states for index in wanted})
        return dict(
            kwargs,
            vision_feature_layer=layer,
            vision_feature_select_strategy=strategy or self.config.vision_feature_select_strategy,
            output_hidden_states=capture,
            return_dict=True,
        )

    def _with_safety(self, outputs: BaseModelOutputWithPooling, safety_features: list[torch.Tensor]):
        """The base model's image output with set 1 after each image's LLM features and the safety features beside."""
        set_1 = self.safety_tokens("llm")
        llm_features = [torch.cat([features, set_1.to(features.dtype)], dim=0) for features in outputs.pooler_output]
        return SafeVLMImageOutputs(
            **{**outputs, "pooler_output": llm_features},
            safety_features=safety_features,
            num_placeholder_tokens=[len(features) for features in llm_features],
        )

    def _image_safety_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None):
        """The classify-only image path (a family may skip work the safety branch does not need)."""
        return self.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes)

    # ---------------------------------------------------------------------------------------------- safety path
    def _placeholder_mask(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        image_embed = self.get_input_embeddings()(
            torch.tensor(self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
        )
        return (inputs_embeds == image_embed).all(-1)

    def _check_placeholders(self, found: int, counts: Sequence[int]) -> None:
        expected = sum(counts)
        if found != expected:
            per_image = counts[0] if counts else 0
            raise ValueError(
                f"Image features and image tokens do not match, tokens: {found}, features: {expected} "
                f"({len(counts)} image(s), {per_image} per image = image tokens + num_safety_tokens="
                f"{self.config.num_safety_tokens}). Prepare inputs with SafeVLMProcessor (its num_safety_tokens must "
                "equal config.num_safety_tokens) and keep one '<image>' per image in the text."
            )

    def _images_per_row(
        self, placeholders_per_row: Sequence[int], image_outputs: SafeVLMImageOutputs | None
    ) -> list[list[torch.Tensor]]:
        """Each row's images' safety features, assigning images to rows in order by the placeholders each fills."""
        rows: list[list[torch.Tensor]] = [[] for _ in placeholders_per_row]
        if not any(placeholders_per_row):
            return rows
        counts = getattr(image_outputs, "num_placeholder_tokens", None)
        if getattr(image_outputs, "safety_features", None) is None or counts is None:
            raise ValueError(
                "The prompt holds image placeholders but the safety branch was given no safety features for them "
                "(image features passed in mm_encoder_outputs without this model's safety features, or none at all), "
                "so the safety head cannot see the images. Pass pixel_values, or features from this model's "
                "get_image_features(); to run without the safety head pass compute_safety=False (forward) or "
                "safety_gating=False (generate)."
            )
        self._check_placeholders(int(sum(placeholders_per_row)), counts)
        image_index = 0
        for row, remaining in enumerate(placeholders_per_row):
            while remaining > 0:
                remaining -= counts[image_index]
                rows[row].append(image_outputs.safety_features[image_index])
                image_index += 1
        return rows

    def _safety_context(
        self,
        placeholder_mask: torch.Tensor,
        image_outputs: SafeVLMImageOutputs | None,
        dtype: torch.dtype,
        cached: CachedSafetyContext | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: safety tokens set 2, then the safety features of each of the row's images, padded and masked.

        `cached` holds the images of a cached prefix (their placeholders come first in the row); the remaining
        placeholders are filled, in order, by `image_outputs`.
        """
        head_tokens = self.safety_tokens("head").to(dtype)
        device = head_tokens.device
        remaining = placeholder_mask.sum(dim=1).tolist()
        rows: list[list[torch.Tensor]] = [[head_tokens] for _ in remaining]
        if cached is not None:
            for row in range(len(rows)):
                rows[row] += cached.features[row]
                remaining[row] -= cached.placeholders[row]
        for row, images in enumerate(self._images_per_row(remaining, image_outputs)):
            rows[row] += images
        rows = [[part.to(device, dtype) for part in parts] for parts in rows]
        lengths = [sum(part.shape[0] for part in parts) for parts in rows]
        features = head_tokens.new_zeros(len(rows), max(lengths), head_tokens.shape[-1])
        mask = torch.zeros(len(rows), max(lengths), dtype=torch.bool, device=device)
        for row, parts in enumerate(rows):
            joined = torch.cat(parts, dim=0)
            features[row, : joined.shape[0]] = joined
            mask[row, : joined.shape[0]] = True
        return features, mask

    def _safety_logits(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        image_outputs: SafeVLMImageOutputs | None,
        safety_text_mask: torch.Tensor | None = None,
        cached: CachedSafetyContext | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The head's `(type_logits, level_logits, subcategory_logits)` for a prompt batch.

        The head reads the prompt's token embeddings (padding and image placeholders excluded; `safety_text_mask`
        narrows it further, e.g. to exclude assistant turns in training) and the safety-enhanced features.
        """
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        placeholder_mask = self._placeholder_mask(input_ids, inputs_embeds)
        text_mask = ~placeholder_mask
        pad_token_id = getattr(self.config.get_text_config(), "pad_token_id", None)
        if (
            attention_mask is not None
            and attention_mask.dim() == 4
            and input_ids is not None
            and pad_token_id is not None
        ):
            text_mask = text_mask & (input_ids != pad_token_id)
        for extra in (_token_mask(attention_mask, text_mask.shape[1]), safety_text_mask):
            if extra is not None:
                text_mask = text_mask & extra.to(text_mask.device, torch.bool)
        head = self.safety_head
        features, feature_mask = self._safety_context(placeholder_mask, image_outputs, head.query.dtype, cached)
        return head(
            inputs_embeds.to(head.query.device, head.query.dtype),
            text_mask.to(head.query.device),
            features,
            feature_mask,
        )

    def _record_cache_context(
        self,
        cache: Any,
        before: CachedSafetyContext | None,
        placeholder_mask: torch.Tensor,
        image_outputs: Any,
    ) -> None:
        """Remember on `cache` what the safety branch saw of the images it now holds (see `CachedSafetyContext`).

        When that cannot be known (a prefix recorded by nobody, or images given without safety features), the
        record is removed, and a gated `generate` refuses to continue from the cache.
        """
        new = placeholder_mask.sum(dim=1).tolist()
        counts = getattr(image_outputs, "num_placeholder_tokens", None)
        # Images the safety branch saw, one per placeholder run (generate expands LLM features for beams, not these).
        seen = getattr(image_outputs, "safety_features", None) is not None and sum(counts or []) == sum(new)
        if before is None or len(before.placeholders) != len(new) or (any(new) and not seen):
            cache.safevlm_safety_context = None
            return
        images = self._images_per_row(new, image_outputs)
        cache.safevlm_safety_context = CachedSafetyContext(
            features=[[*old, *(t.detach() for t in added)] for old, added in zip(before.features, images)],
            placeholders=[old + count for old, count in zip(before.placeholders, new)],
        )

    # -------------------------------------------------------------------------------------------------- forward
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        safety_text_mask: torch.Tensor | None = None,
        compute_safety: bool | None = None,
        **kwargs: Any,
    ) -> tuple | SafeVLMModelOutputWithPast:
        r"""
        LLaVA's forward (the cache may be passed as `cache` or `past_key_values`), plus the safety head's logits.

        safety_text_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
            1 for the tokens the safety head may read (e.g. the prompt without assistant turns); defaults to every
            non-padding text token.
        compute_safety (`bool`, *optional*):
            Run the safety head. Defaults to `True` on a prompt pass (no cache yet) and `False` when decoding.

        The returned cache remembers what the safety branch saw of its images, so a gated `generate` can continue
        the conversation from it (see `CachedSafetyContext`).
        """
        cache = _pop_cache(kwargs)
        mm_encoder_outputs = dict(mm_encoder_outputs or {})
        if pixel_values is not None:
            if mm_encoder_outputs.get("image") is not None:
                raise ValueError("You cannot specify both pixel_values and mm_encoder_outputs at the same time")
            mm_encoder_outputs["image"] = self.get_image_features(
                pixel_values=pixel_values,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                image_sizes=image_sizes,
            )
        image_outputs = mm_encoder_outputs.get("image")
        well_formed = (input_ids is None) != (inputs_embeds is None)
        placeholder_mask = self._placeholder_mask(input_ids, inputs_embeds) if well_formed else None
        if image_outputs is not None and well_formed:
            # LLaVA checks the count too; this message also names the safety tokens each image needs. Count from the
            # LLM features themselves: generate expands them in place for beams / return sequences.
            self._check_placeholders(
                int(placeholder_mask.sum()), [len(features) for features in image_outputs.pooler_output]
            )
        past_length = _cache_length(cache)
        before = getattr(cache, "safevlm_safety_context", None) if past_length else None
        if past_length == 0 and placeholder_mask is not None:
            before = CachedSafetyContext.empty(placeholder_mask.shape[0])
        if compute_safety is None:
            compute_safety = past_length == 0

        outputs = super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            mm_encoder_outputs=mm_encoder_outputs or None,
            **{CACHE_ARG: cache},
            **kwargs,
        )
        new_cache = outputs.get(CACHE_ARG)
        if new_cache is not None and placeholder_mask is not None:
            self._record_cache_context(new_cache, before, placeholder_mask, image_outputs)
        logits = (None, None, None)
        if compute_safety:
            logits = self._safety_logits(input_ids, inputs_embeds, attention_mask, image_outputs, safety_text_mask)
        return SafeVLMModelOutputWithPast(
            **outputs,
            safety_type_logits=logits[0],
            safety_level_logits=logits[1],
            safety_subcategory_logits=logits[2],
        )


class SafeVLMModel(SafeVLMModelMixin, SafeVLMPreTrainedModel, LlavaModel):
    """LLaVA's base model plus the safety branch (projector, token sets, head)."""

    def __init__(self, config: SafeVLMConfig):
        super().__init__(config)
        self._add_safety_modules()

    def _per_image(self, features: torch.Tensor, image_sizes: torch.Tensor | None) -> list[torch.Tensor]:
        # Same split as LLaVA's `get_image_features`: images of different sizes (e.g. Pixtral) arrive concatenated.
        if image_sizes is None:
            return list(features)
        split_sizes = (
            (torch.as_tensor(image_sizes, device=features.device) // self.vision_tower.patch_size).prod(-1).tolist()
        )
        return list(torch.split(features.squeeze(0), split_sizes))

    def _safety_features(self, hidden_states, image_sizes: torch.Tensor | None) -> list[torch.Tensor]:
        return self._per_image(self._project_safety_features(hidden_states), image_sizes)

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple | SafeVLMImageOutputs:
        """LLaVA's image features with safety tokens set 1 appended to each image, and the safety features beside them.

        One vision pass serves both paths. `vision_feature_layer` (per call, e.g. an ICET early exit) selects the LLM
        path's layer only; the safety projector always reads `config.safety_feature_layer`. Follows LLaVA's contract:
        `return_dict=False` gives a tuple, `output_hidden_states=True` returns every vision hidden state.
        """
        call = self._image_call(vision_feature_layer, vision_feature_select_strategy, kwargs)
        outputs = super().get_image_features(pixel_values, image_sizes=image_sizes, **call)
        return self._with_safety(outputs, self._safety_features(outputs.hidden_states, image_sizes))

    def _image_safety_features(
        self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None
    ) -> SafeVLMImageOutputs:
        """The classify-only image path: the vision tower and the safety projector, not LLaVA's projector."""
        num_states = self.config.vision_config.num_hidden_layers + 1
        llm_layer = self.config.vision_feature_layer
        wanted = _as_layer_list(llm_layer) + _as_layer_list(self.config.safety_feature_layer)
        vision_kwargs = {"image_sizes": image_sizes} if image_sizes is not None else {}
        vision = self.vision_tower(
            pixel_values,
            output_hidden_states=sorted({index % num_states for index in wanted}),
            return_dict=True,
            **vision_kwargs,
        )
        # How many prompt placeholders each image fills: LLaVA's image tokens for its configured layer, then set 1.
        llm_tokens = self._per_image(
            _select_vision_features(vision.hidden_states, llm_layer, self.config.vision_feature_select_strategy),
            image_sizes,
        )
        return SafeVLMImageOutputs(
            last_hidden_state=vision.last_hidden_state,
            safety_features=self._safety_features(vision.hidden_states, image_sizes),
            num_placeholder_tokens=[len(tokens) + self.config.num_safety_tokens for tokens in llm_tokens],
        )


class SafeVLMNextModel(SafeVLMModelMixin, SafeVLMNextPreTrainedModel, LlavaNextModel):
    """LLaVA-NeXT's base model plus the safety branch: the safety projector reads every anyres tile of an image
    (base image and crops), and safety tokens set 1 follow each image's packed tokens, whatever its size."""

    def __init__(self, config: SafeVLMNextConfig):
        super().__init__(config)
        self._add_safety_modules()

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs: Any,
    ) -> tuple | SafeVLMImageOutputs:
        """LLaVA-NeXT's image features (tiles packed, `image_newline` rows) with safety tokens set 1 appended to each
        image, and the safety features of all its tiles beside them. One vision pass; `vision_feature_layer` moves
        the LLM path only. Follows LLaVA-NeXT's contract (`return_dict`, tuples, `output_hidden_states`)."""
        call = self._image_call(vision_feature_layer, vision_feature_select_strategy, kwargs)
        outputs = super().get_image_features(pixel_values, image_sizes, **call)
        tiles = [
            image_size_to_num_patches(
                image_size=size,
                grid_pinpoints=self.config.image_grid_pinpoints,
                patch_size=self.config.vision_config.image_size,
            )
            for size in image_sizes
        ]
        projected = self._project_safety_features(outputs.hidden_states)  # (all tiles, patches, hidden)
        safety = [image.flatten(0, 1) for image in torch.split(projected, tiles, dim=0)]
        return self._with_safety(outputs, safety)


class SafeVLMGenerationMixin:
    """Everything a SafeVLM generating model adds to its LLaVA-family base, whatever the family: conversion and
    loading that refuse an untrained safety branch, the forward with the safety loss, the safety API (`predict_safety`
    to classify, `assess` for verdicts) and the gated, row-wise `generate`."""

    base_model_type = "llava"  # the model type `from_llava` converts
    processor_class_name = "SafeVLMProcessor"  # named in the checkpoint's auto_map

    def _init_generation_model(self, config: Any, model_class: type) -> None:
        # The base __init__ would build the family's plain base model first; build the SafeVLM one instead.
        PreTrainedModel.__init__(self, config)
        self.model = model_class(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self._safety_tokenizer = None
        self._safety_message_cache: dict[tuple[int, str], list[int]] = {}
        self.post_init()

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """`PreTrainedModel.save_pretrained`, with an `auto_map` that names every Auto class a checkpoint serves.

        `register_for_auto_class` records one model class; the config's `auto_map` here names all four (AutoConfig,
        AutoModel, AutoModelForImageTextToText, AutoProcessor). The processing file is copied by transformers itself,
        as a relative import of this file. Then every hook in `POST_SAVE_HOOKS` runs (with safevlm_hf installed: the
        model card, unless the folder holds one written by a person; `overwrite_model_card=True` replaces it).
        """
        overwrite_model_card = bool(kwargs.pop("overwrite_model_card", False))
        module = type(self).__module__.rsplit(".", 1)[-1]
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map["AutoModelForImageTextToText"] = f"{module}.{type(self).__name__}"
        auto_map["AutoProcessor"] = f"processing_safevlm.{self.processor_class_name}"
        self.config.auto_map = auto_map
        super().save_pretrained(save_directory, *args, **kwargs)
        if args[0] if args else kwargs.get("is_main_process", True):
            for hook in POST_SAVE_HOOKS:
                hook(save_directory, self.config, overwrite_model_card)

    @classmethod
    def from_pretrained(cls, *args: Any, allow_untrained_safety: bool = False, **kwargs: Any):
        """`PreTrainedModel.from_pretrained`, refusing a checkpoint whose safety weights are missing or do not fit.

        transformers would initialize such weights randomly and go on: a SafeVLM with a random safety head gives
        random verdicts, silently. Pass `allow_untrained_safety=True` to load it anyway (e.g. to train the safety
        modules); to turn a LLaVA checkpoint into a SafeVLM use :meth:`from_llava`.
        """
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        absent = set(info["missing_keys"]) | {entry[0] for entry in info["mismatched_keys"]}
        untrained = sorted(key for key in absent if ".safety_" in key)
        if untrained and not allow_untrained_safety:
            raise ValueError(
                f"The checkpoint lacks {len(untrained)} safety weight(s) or they do not fit this config (e.g. "
                f"{untrained[:3]}), so the safety branch would be random. Load a trained SafeVLM checkpoint, convert a "
                "LLaVA checkpoint with SafeVLMForConditionalGeneration.from_llava(...), or pass "
                "allow_untrained_safety=True to load it for training."
            )
        broken = [
            f"{module_name}.{name}"
            for module_name, module in model.safety_modules().items()
            for name, parameter in module.named_parameters()
            if parameter.device.type != "meta" and not bool(torch.isfinite(parameter).all())
        ]
        if broken and not allow_untrained_safety:
            raise ValueError(
                f"The checkpoint's safety weights hold NaN or infinite values ({broken[:3]}): the file is corrupted or "
                "training diverged, and every verdict would be unusable. Pass allow_untrained_safety=True to load it "
                "anyway (e.g. to re-initialize and retrain the safety modules)."
            )
        try:
            # transformers installs a checkpoint's `custom_generate/generate.py` over `generate` (an instance
            # attribute) on a trust_remote_code load; that loop would run without the gate. Keep the gated one.
            del model.generate
        except AttributeError:
            pass  # no replacement was installed
        else:
            logger.warning(
                "Ignored the checkpoint's custom_generate/generate.py: it would replace SafeVLM's gated generate(). "
                "To run it anyway, pass custom_generate=... and safety_gating=False to generate()."
            )
        return (model, info) if wants_info else model

    # ------------------------------------------------------------------------------------------------ conversion
    @classmethod
    def from_llava(cls, model_or_path: Any, seed: int | None = None, **safety_overrides: Any) -> Any:
        """Turn a model of the class's family (LLaVA-1.5 for `SafeVLMForConditionalGeneration`, LLaVA-NeXT for
        `SafeVLMNextForConditionalGeneration`; object or checkpoint path/Hub id) into a SafeVLM.

        Every base weight (vision tower, projector, LLM, lm_head) is carried over unchanged; only the safety modules
        are newly initialized (from `seed` when given, so a conversion is reproducible). Keyword arguments that are
        `SafeVLMConfig` fields (e.g. `num_safety_tokens`) override the safety settings; the others (e.g. `dtype`,
        `attn_implementation`, `revision`) go to `from_pretrained`.
        """
        config_class = cls.config_class
        config_fields = set(config_class.__dataclass_fields__)
        overrides = {k: v for k, v in safety_overrides.items() if k in config_fields}
        load_kwargs = {k: v for k, v in safety_overrides.items() if k not in config_fields}
        if isinstance(model_or_path, (str, os.PathLike)):
            from transformers import AutoConfig

            config_kwargs = {
                k: load_kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in load_kwargs
            }
            base_config = AutoConfig.from_pretrained(model_or_path, **config_kwargs)
            cls._check_base_type(base_config, model_or_path)
            config = config_class.from_llava_config(base_config, **overrides)  # records safety_base_model
            wants_info = load_kwargs.pop("output_loading_info", False)
            model, info = cls.from_pretrained(
                model_or_path, config=config, allow_untrained_safety=True, output_loading_info=True, **load_kwargs
            )
            model.init_safety_modules(seed)
            return (model, info) if wants_info else model
        else:
            if load_kwargs:
                raise TypeError(
                    f"from_llava got unknown keyword(s) {sorted(load_kwargs)} for an in-memory model; pass "
                    "SafeVLMConfig fields only (loading options apply to paths)."
                )
            cls._check_base_type(model_or_path.config, type(model_or_path).__name__)
            model = cls._from_llava_model(
                model_or_path, config_class.from_llava_config(model_or_path.config, **overrides)
            )
        model.init_safety_modules(seed)
        return model

    @classmethod
    def _check_base_type(cls, base_config: Any, source: Any) -> None:
        if getattr(base_config, "model_type", None) != cls.base_model_type:
            hint = {"llava": "SafeVLMForConditionalGeneration", "llava_next": "SafeVLMNextForConditionalGeneration"}
            raise ValueError(
                f"{cls.__name__}.from_llava converts {cls.base_model_type!r} models, but {source} is "
                f"{getattr(base_config, 'model_type', None)!r}"
                + (f": use {hint[base_config.model_type]}.from_llava." if base_config.model_type in hint else ".")
            )

    @classmethod
    def _from_llava_model(cls, source: nn.Module, config: Any) -> Any:
        config._attn_implementation = getattr(source.config, "_attn_implementation", None)
        reference = next(source.parameters())
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device=reference.device)
        result = model.load_state_dict(source.state_dict(), strict=False)
        missing = [k for k in result.missing_keys if ".safety_" not in k]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"from_llava: the LLaVA weights do not fit (missing {missing[:5]}, unexpected "
                f"{result.unexpected_keys[:5]}); is this a LlavaForConditionalGeneration?"
            )
        for name, buffer in source.named_buffers():  # non-persistent buffers (e.g. rotary inv_freq) are not in state
            model.get_buffer(name).copy_(buffer)
        model.to(reference.dtype)
        model.generation_config = source.generation_config
        return model.train(source.training)

    def init_safety_modules(self, seed: int | None = None) -> None:
        """(Re)initialize the safety projector, both token sets and the head; base weights are not touched.

        With `seed`, the draw is reproducible and leaves the global random state as it was.
        """
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
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
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_sizes: torch.Tensor | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        safety_type_labels: torch.LongTensor | None = None,
        safety_level_labels: torch.LongTensor | None = None,
        safety_subcategory_labels: torch.LongTensor | None = None,
        safety_num_items_in_batch: torch.Tensor | None = None,
        safety_text_mask: torch.Tensor | None = None,
        compute_safety: bool | None = None,
        **kwargs: Any,
    ) -> tuple | SafeVLMCausalLMOutputWithPast:
        r"""
        LLaVA's forward (the cache may be passed as `cache` or `past_key_values`), plus the safety head and its loss.

        safety_type_labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Risk-type targets (index into `config.safety_types`; -100 to ignore a row).
        safety_level_labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Risk-level targets (0..len(config.safety_levels)-1; -100 to ignore a row).
        safety_subcategory_labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Sub-category targets: 0 for "none", i + 1 for `config.safety_subcategories[i]`, -100 to ignore a row
            (rows without sub-labels, e.g. PSA-VLM's).
        safety_num_items_in_batch (`torch.Tensor` of shape `(3,)`, *optional*):
            Labelled rows (type, level, sub-category) in the whole optimizer step, so the safety terms are sums over
            this micro-batch divided by the step's counts, as `num_items_in_batch` does for the LM loss. Without it,
            each term is this batch's mean.
        safety_text_mask (`torch.Tensor`, *optional*):
            Tokens the safety head may read; see [`SafeVLMModel.forward`].
        compute_safety (`bool`, *optional*):
            Force the safety head on or off (default: on for prompt passes).
        """
        safety_labels = (safety_type_labels, safety_level_labels, safety_subcategory_labels)
        wants_safety_loss = any(labels_ is not None for labels_ in safety_labels)
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
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
                (outputs.safety_type_logits, outputs.safety_level_logits, outputs.safety_subcategory_logits),
                safety_labels,
                safety_num_items_in_batch,
            )
        if lm_loss is not None or safety_loss is not None:
            loss = lm_loss if lm_loss is not None else 0.0
            if safety_loss is not None:
                loss = loss + self.config.safety_loss_weight * safety_loss

        fields = {name: value for name, value in outputs.items() if name != "last_hidden_state"}
        return SafeVLMCausalLMOutputWithPast(
            loss=loss, logits=logits, lm_loss=lm_loss, safety_loss=safety_loss, **fields
        )

    def _safety_loss(
        self,
        logits: Sequence[torch.Tensor | None],
        labels: Sequence[torch.Tensor | None],
        num_items: torch.Tensor | None,
    ) -> torch.Tensor:
        """`CE(type) + CE(level) [+ CE(sub-category)]`: each a mean over its labelled rows, or a sum over this batch
        divided by the step's count when `num_items` (one count per term) is given."""
        loss = logits[0].new_zeros((), dtype=torch.float32)
        names = (
            ("safety_type_labels", self.config.safety_types),
            ("safety_level_labels", self.config.safety_levels),
            ("safety_subcategory_labels", ["none", *self.config.safety_subcategories]),
        )
        for index, ((name, label_names), term_logits, term_labels) in enumerate(zip(names, logits, labels)):
            if term_labels is None:
                continue
            if term_logits is None:
                raise ValueError(f"{name} were given but the config lists no safety_subcategories to predict.")
            term_labels = term_labels.to(term_logits.device).view(-1)
            bad = (term_labels != -100) & ((term_labels < 0) | (term_labels >= len(label_names)))
            if bool(bad.any()):
                row = int(bad.nonzero()[0, 0])
                raise ValueError(
                    f"{name}[{row}] = {int(term_labels[row])} is not a valid label: use 0..{len(label_names) - 1} "
                    f"({list(label_names)}) or -100 to ignore the row."
                )
            if not bool((term_labels != -100).any()):
                continue
            if num_items is None:
                loss = loss + F.cross_entropy(term_logits.float(), term_labels, ignore_index=-100)
            else:
                total = F.cross_entropy(term_logits.float(), term_labels, ignore_index=-100, reduction="sum")
                loss = loss + total / num_items[index].to(total.device).clamp(min=1)
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
        """Classify: the safety head's logits and probabilities for a prompt batch, with no LLM forward.

        Runs the vision tower, the safety projector and the head (LLaVA's projector is skipped too). Accepts a
        processor's outputs (`**processor(images=..., text=...)`). :meth:`assess` turns the result into verdicts.
        """
        self._warn_if_untrained()
        image_outputs = None
        if pixel_values is not None:
            image_outputs = self.model._image_safety_features(pixel_values, image_sizes)
        return self._prediction(input_ids, inputs_embeds, attention_mask, image_outputs, safety_text_mask)

    def _prediction(
        self, input_ids, inputs_embeds, attention_mask, image_outputs, safety_text_mask=None, cached=None
    ) -> SafeVLMSafetyPrediction:
        type_logits, level_logits, subcategory_logits = self.model._safety_logits(
            input_ids, inputs_embeds, attention_mask, image_outputs, safety_text_mask, cached
        )
        return SafeVLMSafetyPrediction(
            type_logits=type_logits,
            level_logits=level_logits,
            type_probs=type_logits.float().softmax(-1),
            level_probs=level_logits.float().softmax(-1),
            subcategory_logits=subcategory_logits,
            subcategory_probs=subcategory_logits.float().softmax(-1) if subcategory_logits is not None else None,
        )

    def safety_policy(self, safety_policy: SafetyPolicy | dict | str | None = None) -> SafetyPolicy:
        """The policy in force, validated and bound to this model's labels: `safety_policy` if given, else the
        checkpoint's `config.safety_policy`. A `SafetyPolicy` already bound to these labels is used as it is."""
        return self.config.bound_safety_policy(safety_policy)

    def _verdicts(
        self,
        prediction: SafeVLMSafetyPrediction,
        policy: SafetyPolicy,
        safety_profile: str | None = None,
        safety_response: str | None = None,
    ) -> list[SafetyVerdict]:
        type_probs = prediction.type_probs.tolist()
        level_probs = prediction.level_probs.tolist()
        sub_probs = prediction.subcategory_probs.tolist() if prediction.subcategory_probs is not None else None
        verdicts = [
            policy.decide(t, l, safety_profile, sub_probs[row] if sub_probs else None, safety_response)
            for row, (t, l) in enumerate(zip(type_probs, level_probs))
        ]
        unassessed = [row for row, verdict in enumerate(verdicts) if not verdict.assessed]
        if unassessed:
            logger.warning(
                f"The safety head gave non-finite outputs for row(s) {unassessed} (NaN or infinite input values or "
                "weights): those rows are refused with the policy's 'unassessed' message."
            )
        return verdicts

    def _warn_if_untrained(self) -> None:
        if not self.config.safety_training_stages and not getattr(self, "_warned_untrained", False):
            self._warned_untrained = True
            logger.warning(
                "This SafeVLM's safety branch has no recorded training (config.safety_training_stages is empty, as "
                "after a fresh conversion from LLaVA): its verdicts are random until Stage I training has run."
            )

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
        safety_response: str | None = None,
        **unused: Any,
    ) -> list[SafetyVerdict]:
        """Verdicts: one :class:`SafetyVerdict` per row (category, level, action, forced message, probabilities).

        `safety_profile` picks the audience/region profile (default: the policy's `default_profile`);
        `safety_policy` replaces the checkpoint's policy for this call only. A verdict that cannot be computed
        (non-finite head outputs) is a refusal, never an answer.
        """
        policy = self.safety_policy(safety_policy)
        prediction = self.predict_safety(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            image_sizes=image_sizes,
        )
        return self._verdicts(prediction, policy, safety_profile, safety_response)

    # ------------------------------------------------------------------------------------------------ generation
    def set_safety_tokenizer(self, tokenizer: Any) -> None:
        """Tokenizer used to encode refusal/caution messages (loaded from the checkpoint folder when not set)."""
        self._safety_tokenizer = tokenizer
        self._safety_message_cache = {}

    def _resolve_safety_tokenizer(self, tokenizer: Any = None) -> Any:
        if tokenizer is not None:
            return tokenizer
        # Kept on purpose: a drop-in `model.generate(**inputs)` and transformers' pipelines pass no tokenizer, and
        # gating must still encode its messages; callers holding a processor can pass or set it instead.
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

    def _start_tokens(self, generation_config: Any, kwargs: dict[str, Any]) -> torch.LongTensor:
        """A prompt of one start token per row, as `generate` builds when it is given no prompt."""
        bos = generation_config.bos_token_id
        if bos is None:
            bos = getattr(self.config.get_text_config(), "bos_token_id", None)
        if bos is None:
            raise ValueError("generate() was given no prompt and the model has no bos_token_id to start from.")
        mask = kwargs.get("attention_mask")
        batch = mask.shape[0] if mask is not None else 1
        return torch.full((batch, 1), int(bos), dtype=torch.long, device=self.device)

    def _check_gated_decoding(self, generation_config: Any, kwargs: dict[str, Any]) -> None:
        """Refuse, under gating, every decoding route that would run code other than ours around the gate."""
        if kwargs.get("custom_generate") is not None:
            raise ValueError(
                "custom_generate cannot be combined with safety gating (its decoding loop may skip the gate). "
                "Pass safety_gating=False explicitly if you accept ungated output."
            )
        probe = copy.deepcopy(generation_config)
        probe.update(**kwargs)  # applies the decoding settings among kwargs; model inputs are returned unused
        mode = probe.get_generation_mode(kwargs.get("assistant_model"))
        if mode not in GATED_GENERATION_MODES:
            raise ValueError(
                f"{mode.value} decoding is not available under safety gating: transformers runs it from Hub code "
                "(or a draft model) that the gate does not control. Use greedy search, sampling or beam search, or "
                "pass safety_gating=False explicitly if you accept ungated output."
            )

    def _gated_images(self, kwargs: dict[str, Any]) -> SafeVLMImageOutputs | None:
        """The images of a gated call, encoded once: the safety branch keeps them, the LLM gets its own copy.

        Images arrive as `pixel_values` or as this model's `get_image_features` output in `mm_encoder_outputs`;
        features without safety features are refused (the safety branch could not see those images).
        """
        pixel_values = kwargs.pop("pixel_values", None)
        given = dict(kwargs.get("mm_encoder_outputs") or {})
        if pixel_values is not None:
            if given.get("image") is not None:
                raise ValueError("You cannot pass both: raw pixels and pre-computed embeddings for input image")
            image_outputs = self.model.get_image_features(
                pixel_values=pixel_values,
                vision_feature_layer=kwargs.get("vision_feature_layer"),
                vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"),
                image_sizes=kwargs.get("image_sizes"),
            )
        else:
            image_outputs = given.get("image")
            if image_outputs is None:
                return None
            if getattr(image_outputs, "safety_features", None) is None:
                raise ValueError(
                    "generate() got image features in mm_encoder_outputs without this model's safety features, so "
                    "the safety branch cannot see those images. Pass pixel_values (or this model's "
                    "get_image_features() output), or safety_gating=False explicitly if you accept ungated output."
                )
        # generate expands the LLM features in place for beams / return sequences: hand it its own object.
        given["image"] = BaseModelOutputWithPooling(pooler_output=list(image_outputs.pooler_output))
        kwargs["mm_encoder_outputs"] = given
        return image_outputs

    def _gated_text(self, input_ids: torch.LongTensor | None, kwargs: dict[str, Any]) -> None:
        """Refuse prompt embeddings the safety branch cannot read as text (e.g. with image features merged in)."""
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            return
        if input_ids is None:
            raise ValueError(
                "generate(inputs_embeds=...) without input_ids cannot be gated: the safety branch cannot tell text "
                "from image features merged into the embeddings. Pass input_ids (and pixel_values for the images), "
                "or safety_gating=False explicitly if you accept ungated output."
            )
        expected = self.get_input_embeddings()(input_ids.to(self.get_input_embeddings().weight.device))
        if embeds.shape != expected.shape or not torch.equal(embeds, expected.to(embeds.device, embeds.dtype)):
            raise ValueError(
                "generate(inputs_embeds=...) holds embeddings that are not the token embeddings of input_ids (e.g. image "
                "features merged in), which the safety branch cannot read. Pass input_ids and pixel_values instead, "
                "or safety_gating=False explicitly if you accept ungated output."
            )

    def _gated_cache(self, input_ids: torch.LongTensor | None, kwargs: dict[str, Any]) -> CachedSafetyContext | None:
        """What the safety branch saw of a cached prefix; refuses a cache whose content it cannot know."""
        cache = kwargs.get(CACHE_ARG)
        cached_length = _cache_length(cache)
        if cached_length == 0:
            return None
        context = getattr(cache, "safevlm_safety_context", None)
        prefix = input_ids[:, :cached_length] if input_ids is not None else None
        seen = (prefix == self.config.image_token_id).sum(dim=1).tolist() if prefix is not None else None
        if context is None or seen is None or context.placeholders != seen:
            raise ValueError(
                "generate() under safety gating was given a cache whose content the safety branch has not seen (it was "
                "not built by this model's forward()/generate(), or its images reached the LLM without the safety "
                "branch). Continue from a cache this model returned, with input_ids holding the whole conversation; "
                "pass the conversation without a cache; or pass safety_gating=False explicitly if you accept ungated "
                "output."
            )
        return context

    def _row_plans(
        self, verdicts: Sequence[SafetyVerdict], policy: SafetyPolicy, tokenizer: Any, eos: int | None
    ) -> list[RowPlan]:
        """What each row's verdict asks of generation (see `RowPlan`; template or guided response)."""
        plans = []
        for verdict in verdicts:
            action = verdict.action
            if action == "answer":
                plans.append(RowPlan())
                continue
            if verdict.response == "template":  # unassessed verdicts are always template refusals
                message = self._encode_message(tokenizer, verdict.message)
                plans.append(RowPlan(lead=message) if action == "caution" else RowPlan(output=message + [int(eos)]))
                continue
            fields = (
                verdict.category,
                verdict.level,
                self.config.safety_levels[verdict.level],
                verdict.profile,
                verdict.subcategory,
            )
            hint = self._encode_message(tokenizer, policy.hint(action, *fields))
            leads = {
                name: self._encode_message(tokenizer, policy.lead(name, *fields)) for name in ("caution", "refuse")
            }
            budget = policy.refusal_budget
            if action == "caution":
                plans.append(RowPlan(context=hint, lead=leads["caution"]))
            elif action == "refuse":
                plans.append(RowPlan(context=hint, lead=leads["refuse"], gate=GatePlan(((),), ("budget",), budget)))
            else:  # decide: the model chooses its lead, the gate keeps the choice's rules
                choice = GatePlan((tuple(leads["caution"]), tuple(leads["refuse"])), ("free", "budget"), budget)
                plans.append(RowPlan(context=hint, gate=choice))
        return plans

    @staticmethod
    def _row_wise_blockers(generation_config: Any, kwargs: dict[str, Any]) -> list[str]:
        """Arguments that keep generation from serving rows apart (the rows then all run, with the gate)."""
        settings = generation_config.to_dict()
        blockers = [key for key in (CACHE_ARG, "inputs_embeds") if kwargs.get(key) is not None]
        blockers += [  # both index rows of the caller's batch; stopping criteria and stop strings run per sub-batch
            key
            for key in ("prefix_allowed_tokens_fn", "negative_prompt_ids")
            if kwargs.get(key) is not None or settings.get(key) is not None
        ]
        blockers += [
            key for key in ("output_attentions", "output_hidden_states") if kwargs.get(key, settings.get(key, False))
        ]
        return_dict = kwargs.get("return_dict_in_generate", generation_config.return_dict_in_generate)
        if return_dict and (kwargs.get("num_beams") or generation_config.num_beams or 1) > 1:
            blockers.append("return_dict_in_generate with num_beams > 1")
        known = {"input_ids", "attention_mask", "image_sizes"}
        blockers += [k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and k not in known]
        return blockers

    def _generate_rows(
        self,
        plans: list[RowPlan],
        input_ids: torch.LongTensor,
        image_outputs: SafeVLMImageOutputs | None,
        generation_config: Any,
        logits_processor: Any,
        eos: int | None,
        parent_generate: Callable[..., Any],
        kwargs: dict[str, Any],
    ) -> tuple[Any, dict[int, int | None]]:
        """Generate row by row plan (see `generation_safevlm.run_rows`); returns the merged output and the choices
        made on ``"decide"`` rows (row -> lead index of its first returned sequence)."""
        kwargs = dict(kwargs)
        attention_mask = kwargs.pop("attention_mask", None)
        for name in ("input_ids", "mm_encoder_outputs", "image_sizes"):
            kwargs.pop(name, None)
        streamer = kwargs.pop("streamer", None)

        configured = generation_config.to_dict()

        def setting(key: str, default: Any = None) -> Any:
            value = kwargs.pop(key, None)
            value = value if value is not None else configured.get(key)
            return value if value is not None else default

        prompt_length = input_ids.shape[1]
        max_new = setting("max_new_tokens")
        max_length = setting("max_length", 20)
        max_new = max_new if max_new is not None else max(max_length - prompt_length, 0)
        min_new = max(setting("min_new_tokens") or 0, (setting("min_length") or 0) - prompt_length, 0)
        expand = setting("num_return_sequences", 1) or 1
        pad = setting("pad_token_id")
        pad = int(pad if pad is not None else eos)
        return_dict = setting("return_dict_in_generate", False)
        want_scores = bool(return_dict and setting("output_scores", False))
        want_logits = bool(return_dict and setting("output_logits", False))
        placeholders = (input_ids == self.config.image_token_id).sum(dim=1).tolist()
        pooled = list(image_outputs.pooler_output) if image_outputs is not None else []
        llm_images = images_by_row(placeholders, pooled)
        user_processors = list(logits_processor) if logits_processor is not None else []

        base_config = copy.deepcopy(generation_config)
        model_kwargs = base_config.update(**kwargs)  # decoding settings go into the config, model inputs stay

        def run(input_ids, attention_mask, image_features, max_new_tokens, min_new_tokens, gate, streamer):
            processors = LogitsProcessorList(user_processors + ([gate] if gate.active else []))
            images = (
                {"image": BaseModelOutputWithPooling(pooler_output=list(image_features))} if image_features else None
            )
            config = copy.deepcopy(base_config)
            config.update(
                max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens,
                max_length=None,
                min_length=None,  # min_new_tokens rules; a min_length beside it only makes transformers warn
                num_return_sequences=expand,
                return_dict_in_generate=bool(return_dict),
                output_scores=want_scores,
                output_logits=want_logits,
                pad_token_id=pad,
            )
            output = parent_generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                mm_encoder_outputs=images,
                generation_config=config,
                logits_processor=processors,
                streamer=streamer,
                **model_kwargs,
            )
            if isinstance(output, torch.Tensor):
                return gate.enforce(output, pad)
            output["sequences"] = gate.enforce(output["sequences"], pad)
            return output

        def make_gate(row_plans: list[GatePlan | None], length: int) -> SafetyGateLogitsProcessor:
            return SafetyGateLogitsProcessor(row_plans, eos, length)

        layout = OutputLayout(expand, pad, eos, self.config.get_text_config().vocab_size, want_scores, want_logits)
        results, outputs = run_rows(
            plans,
            input_ids,
            attention_mask,
            llm_images,
            run,
            max_new_tokens=max_new,
            min_new_tokens=min_new,
            layout=layout,
            make_gate=make_gate,
            streamer=streamer,
        )
        decisions: dict[int, int | None] = {}
        for rows, gate, output in outputs:
            sequences = output if isinstance(output, torch.Tensor) else output["sequences"]
            for index, choices in gate.decisions(sequences).items():
                decisions[rows[index]] = choices[0]
        sequences, scores, logits = assemble(input_ids, results, layout)
        if not return_dict:
            return sequences, decisions
        template = next((output for _, _, output in outputs if isinstance(output, ModelOutput)), None)
        merged = (type(template) if template is not None else GenerateDecoderOnlyOutput)(sequences=sequences)
        if scores is not None:
            merged["scores"] = scores
        if logits is not None:
            merged["logits"] = logits
        return merged, decisions

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
        safety_response: str | None = None,
        **kwargs,
    ):
        r"""
        [`~GenerationMixin.generate`] with level-based, graded safety responses.

        The prompt is assessed once, before the first token (the vision tower runs once and its output is reused by
        the LLM). Each row is then served by its verdict:

        * `safety_response="template"` (the default unless the policy says otherwise): a refused row gets exactly
          the policy's refusal message and EOS, written without running the LLM at all; a cautioned row gets the
          caution prefix, prefilled in one pass, then decodes freely; an answered row is untouched.
        * `safety_response="guided"`: the verdict goes into the context as the policy's hint, the gate forces only a
          short lead (`messages.lead`), and the model writes the rest: a refusal explains itself and ends within
          `guided.refusal_budget` tokens; a caution answers carefully; a `"decide"` verdict lets the model choose
          between the caution and the refusal lead (the verdict records which, as `decision`). A model trained with
          Stage II guided conditioning writes these well.

        Rows that still need the LLM are decoded together (stopping criteria and stop strings see those sub-batches);
        outputs keep the caller's row order and layout. Where an argument needs every row in one batch (a cache,
        `inputs_embeds`, attentions or hidden states, `prefix_allowed_tokens_fn`, `negative_prompt_ids`, beams with
        `return_dict_in_generate`), template mode runs every row with the gate instead, and guided mode raises.

        Every route into the LLM is gated or refused: images arrive as `pixel_values` or as this model's
        `get_image_features` output; `inputs_embeds` must be the token embeddings of `input_ids`; a cache must come
        from this model (it remembers what the safety branch saw, so a conversation keeps its verdict across turns);
        decoding modes that run Hub code or a draft model (`custom_generate`, contrastive search, DoLa, group or
        constrained beam search, assisted generation) are refused. A verdict that cannot be computed is a refusal.

        Args:
            safety_profile (`str`, *optional*): audience/region profile of the policy (e.g. `"minor"`).
            safety_policy (`SafetyPolicy | dict | str`, *optional*): replaces the checkpoint's policy for this call.
            safety_gating (`bool`, defaults to `True`): `False` is the one explicit opt-out.
            safety_response (`str`, *optional*): `"template"` or `"guided"` (default: the policy's `response`).
            tokenizer (*optional*): tokenizer for the messages (see [`set_safety_tokenizer`]).

        With `return_dict_in_generate=True` the output carries `safety_verdicts` (one per input row). Scores and
        logits at steps whose token was fixed without the LLM (a refusal, a prefilled lead, after a row ended) hold
        the forced distribution (0 for that token, -inf elsewhere); a cache is returned only when every row ran
        unchanged.
        """
        if safety_gating is not True and safety_gating is not False:
            raise TypeError(f"safety_gating must be True or False, got {safety_gating!r}.")
        cache = _pop_cache(kwargs)
        if cache is not None:
            kwargs[CACHE_ARG] = cache
        kwargs.setdefault("compute_safety", False)  # the head runs here, once, if at all; never inside the loop
        if not safety_gating:
            return super().generate(inputs, generation_config, logits_processor, **kwargs)

        gen_config = generation_config if generation_config is not None else self.generation_config
        self._check_gated_decoding(gen_config, kwargs)
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        if input_ids is None and kwargs.get("inputs_embeds") is None:
            input_ids = inputs = self._start_tokens(gen_config, kwargs)
        self._gated_text(input_ids, kwargs)
        cached = self._gated_cache(input_ids, kwargs)
        image_outputs = self._gated_images(kwargs)

        policy = self.safety_policy(safety_policy)
        profile = policy.check_profile(safety_profile)
        response = policy.check_response(safety_response)
        self._warn_if_untrained()
        prediction = self._prediction(
            input_ids, kwargs.get("inputs_embeds"), kwargs.get("attention_mask"), image_outputs, cached=cached
        )
        verdicts = self._verdicts(prediction, policy, profile, response)

        eos = kwargs.get("eos_token_id", gen_config.eos_token_id)
        eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
        if isinstance(eos, (list, tuple)):
            eos = None
        if eos is None and any(v.action != "answer" for v in verdicts):
            raise ValueError(
                "Safety gating needs an end-of-sequence token to end a refusal: pass eos_token_id (an int or a "
                "non-empty list) or set generation_config.eos_token_id."
            )
        needs_tokenizer = any(v.action != "answer" for v in verdicts)
        tokenizer = self._resolve_safety_tokenizer(kwargs.get("tokenizer")) if needs_tokenizer else None
        plans = self._row_plans(verdicts, policy, tokenizer, eos)
        return_dict = kwargs.get("return_dict_in_generate", gen_config.return_dict_in_generate)

        if all(plan.runs_llm and not (plan.context or plan.lead or plan.gate) for plan in plans):
            output = super().generate(inputs, generation_config, logits_processor, **kwargs)  # every row answers
            self._remember_images(kwargs.get(CACHE_ARG), output, input_ids, cached, image_outputs)
        elif not (blockers := self._row_wise_blockers(gen_config, kwargs)) and input_ids is not None:
            output, decisions = self._generate_rows(
                plans, input_ids, image_outputs, gen_config, logits_processor, eos, super().generate, kwargs
            )
            for row, lead in decisions.items():
                if lead is not None:
                    verdicts[row] = verdicts[row].with_decision(("caution", "refuse")[lead])
        else:
            if response == "guided":
                raise ValueError(
                    f"Guided safety responses serve each row apart, which {blockers or ['inputs_embeds']} prevents. "
                    "Use safety_response='template', or drop those arguments."
                )
            gate = SafetyGateLogitsProcessor(
                [
                    None
                    if p.runs_llm and not p.lead
                    else GatePlan.forced(
                        p.output[:-1] if p.output else p.lead,
                        "eos" if p.output else "free",  # output ends with EOS
                    )
                    for p in plans
                ],
                eos,
                input_ids.shape[1] if input_ids is not None else 0,
            )
            processors = LogitsProcessorList(list(logits_processor) if logits_processor is not None else [])
            processors.append(gate)
            output = super().generate(inputs, generation_config, processors, **kwargs)
            self._remember_images(kwargs.get(CACHE_ARG), output, input_ids, cached, image_outputs)
            pad = kwargs.get("pad_token_id", gen_config.pad_token_id)
            if isinstance(output, ModelOutput):
                output["sequences"] = gate.enforce(output["sequences"], pad)
            else:
                output = gate.enforce(output, pad)
        if return_dict and isinstance(output, ModelOutput):
            output["safety_verdicts"] = verdicts
        return output

    def _remember_images(self, given_cache, output, input_ids, cached, image_outputs) -> None:
        """Record on the cache a gated call leaves behind what the safety branch saw of its images."""
        returned = output.get(CACHE_ARG) if isinstance(output, ModelOutput) else None
        if (given_cache is None and returned is None) or input_ids is None:
            return
        rows = input_ids.shape[0]
        before = cached if cached is not None else CachedSafetyContext.empty(rows)
        new = (input_ids == self.config.image_token_id).sum(dim=1).tolist()
        new = [count - old for count, old in zip(new, before.placeholders)]
        images = self.model._images_per_row(new, image_outputs)
        context = CachedSafetyContext(
            features=[[*old, *(t.detach() for t in added)] for old, added in zip(before.features, images)],
            placeholders=[old + count for old, count in zip(before.placeholders, new)],
        )
        if given_cache is not None:
            given_cache.safevlm_safety_context = context
        if returned is not None and returned is not given_cache:
            # The returned cache has a row per returned sequence (beams / num_return_sequences expand each input row).
            expand = max(output["sequences"].shape[0] // rows, 1)
            returned.safevlm_safety_context = CachedSafetyContext(
                features=[row for row in context.features for _ in range(expand)],
                placeholders=[row for row in context.placeholders for _ in range(expand)],
            )


class SafeVLMForConditionalGeneration(SafeVLMGenerationMixin, SafeVLMPreTrainedModel, LlavaForConditionalGeneration):
    """LLaVA-1.5 for generation with the SafeVLM safety branch and graded, gated responses in `generate()`."""

    def __init__(self, config: SafeVLMConfig):
        self._init_generation_model(config, SafeVLMModel)


class SafeVLMNextForConditionalGeneration(
    SafeVLMGenerationMixin, SafeVLMNextPreTrainedModel, LlavaNextForConditionalGeneration
):
    """LLaVA-NeXT for generation with the SafeVLM safety branch and graded, gated responses in `generate()`."""

    base_model_type = "llava_next"
    processor_class_name = "SafeVLMNextProcessor"

    def __init__(self, config: SafeVLMNextConfig):
        self._init_generation_model(config, SafeVLMNextModel)


for _config_class, _model_class in (
    (SafeVLMConfig, SafeVLMForConditionalGeneration),
    (SafeVLMNextConfig, SafeVLMNextForConditionalGeneration),
):
    _config_class.register_for_auto_class()
    _model_class.register_for_auto_class("AutoModel")

__all__ = [
    "SafeVLMForConditionalGeneration",
    "SafeVLMGenerationMixin",
    "SafeVLMModel",
    "SafeVLMModelMixin",
    "SafeVLMNextForConditionalGeneration",
    "SafeVLMNextModel",
    "SafeVLMNextPreTrainedModel",
    "SafeVLMPreTrainedModel",
    "SafeVLMSafetyHead",
    "SafeVLMSafetyProjector",
    "SafeVLMSafetyTokens",
]
