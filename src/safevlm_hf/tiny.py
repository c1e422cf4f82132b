"""Tiny, fully offline builders for tests, examples and the demo: LLaVA-1.5, SafeVLM, LLaVA-NeXT, Llama 3.2 Vision.

Nothing is downloaded: the tokenizers are byte-level BPEs trained with `tokenizers` on a small corpus, the image
processors are built in code, and the model configs are the real architectures at toy sizes (CLIP-vision + Llama for
the LLaVA family, with a real anyres grid for LLaVA-NeXT; a local + global vision encoder and cross-attention layers
for `mllama`). The code paths are the same as for real checkpoints (e.g. `llava-hf/llava-1.5-7b-hf`,
`llava-hf/llava-v1.6-vicuna-7b-hf`, `meta-llama/Llama-3.2-11B-Vision`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForSequenceClassification,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    MllamaConfig,
    MllamaForConditionalGeneration,
    MllamaImageProcessorPil,
    MllamaProcessor,
    MllamaTextConfig,
    MllamaVisionConfig,
    PreTrainedTokenizerFast,
)

from .modeling.policy_safevlm import default_safety_policy


# LLaVA-1.5 conversation format ("USER: <image>\n... ASSISTANT: ..."), written for content given either as a string or
# as a list of {"type": "image"|"text"} parts. Assistant text is wrapped in {% generation %} so that
# `return_assistant_tokens_mask=True` marks the tokens a trainer should learn.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '</s>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + ' ' }}{% endif %}"
    "{% else %}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ part['text'] + '</s>' }}{% endgeneration %}"
    "{% else %}{{ part['text'] + ' ' }}{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]

_BASE_CORPUS = [
    "USER: ASSISTANT: describe the image in detail please.",
    "What is shown in this picture? How do I do this? Tell me about it.",
    "The image shows a red square on a blue background with a green circle.",
    "Sure, here is a careful and helpful answer to your question.",
    "a photo of a cat, a dog, a tree, a car, a house, a street, people, food, a chart.",
]


def _policy_corpus() -> list[str]:
    """The default policy's reasons and message templates (guided hints and leads are left to BPE's pieces: adding
    them would change every tiny model's vocabulary, and with it the seeded behaviour tests rely on)."""
    messages = default_safety_policy()["messages"]
    texts = list(messages["reasons"].values())
    texts += [table["default"] for key, table in messages.items() if key in ("refuse", "caution")]
    return texts


def _train_byte_level_bpe(
    corpus: Iterable[str], vocab_size: int, special_tokens: list[str], unk_token: str | None
) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token=unk_token))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([*_BASE_CORPUS, *_policy_corpus(), *corpus], trainer=trainer)
    return tokenizer


def build_tiny_tokenizer(corpus: Iterable[str] = (), vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (Llama-style special tokens, `<image>` included) trained offline on `corpus`."""
    tokenizer = _train_byte_level_bpe(corpus, vocab_size, SPECIAL_TOKENS, unk_token="<unk>")
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


@dataclass
class TinyLlavaSpec:
    """Sizes of the tiny LLaVA (defaults: seconds to build and run on a CPU)."""

    image_size: int = 30
    patch_size: int = 6
    vision_hidden_size: int = 32
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden_size: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate_size: int = 128
    vision_feature_layer: int = -2
    vocab_size: int = 600
    corpus: list[str] = field(default_factory=list)
    seed: int = 0
    attn_implementation: str = "sdpa"


def _tiny_llava_family_processor(
    spec: TinyLlavaSpec, processor_class: type, image_processor_class: type, **image_processor_kwargs: Any
) -> Any:
    """A LLaVA-family processor over the tiny tokenizer: a CLIP-style image processor at the spec's image size (plus
    the family's own `image_processor_kwargs`), the CLS token counted as LLaVA's checkpoints do, and the LLaVA-1.5
    chat template."""
    tokenizer = build_tiny_tokenizer(spec.corpus, spec.vocab_size)
    image_processor = image_processor_class(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        **image_processor_kwargs,
    )
    return processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )


def build_tiny_llava_processor(spec: TinyLlavaSpec | None = None) -> LlavaProcessor:
    """The LLaVA processor of the tiny model (tokenizer + CLIP image processor + chat template)."""
    return _tiny_llava_family_processor(spec or TinyLlavaSpec(), LlavaProcessor, CLIPImageProcessorPil)


def _tiny_clip_config(spec: TinyLlavaSpec) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=spec.vision_hidden_size,
        intermediate_size=4 * spec.vision_hidden_size,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden_size,
    )


def tiny_llama_config(tokenizer: PreTrainedTokenizerFast, **overrides: Any) -> LlamaConfig:
    """A tiny `LlamaConfig` over `tokenizer` (its vocabulary and special-token ids): one layer of width 16 with two
    heads unless `overrides` (any `LlamaConfig` field) say otherwise. The text model of every tiny model here, and of
    the tiny judges and reward models the tests build."""
    settings: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaConfig(**{**settings, **overrides})


def _tiny_llava_text_config(spec: TinyLlavaSpec, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return tiny_llama_config(
        tokenizer,
        hidden_size=spec.text_hidden_size,
        intermediate_size=spec.text_intermediate_size,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_heads,
        max_position_embeddings=2048,
    )


def _init_model(model_class: type, config: Any, spec: Any, tokenizer: PreTrainedTokenizerFast) -> Any:
    """A seeded, randomly initialized model in eval mode whose generation config knows the tokenizer's specials."""
    config._attn_implementation = spec.attn_implementation
    torch.manual_seed(spec.seed)
    model = model_class(config).eval()
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _init_tiny_llava_family(
    spec: TinyLlavaSpec, processor: Any, config_class: type, model_class: type, **config_kwargs: Any
) -> tuple[Any, Any]:
    """The seeded tiny model of a LLaVA family and `processor`: CLIP vision + Llama text configs from `spec`, the
    processor's image token, and the family's own `config_kwargs`."""
    config = config_class(
        vision_config=_tiny_clip_config(spec),
        text_config=_tiny_llava_text_config(spec, processor.tokenizer),
        image_token_index=processor.image_token_id,
        image_seq_length=(spec.image_size // spec.patch_size) ** 2,
        vision_feature_layer=spec.vision_feature_layer,
        vision_feature_select_strategy="default",
        **config_kwargs,
    )
    return _init_model(model_class, config, spec, processor.tokenizer), processor


def build_tiny_llava(spec: TinyLlavaSpec | None = None) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A randomly initialized tiny `LlavaForConditionalGeneration` and its processor, built offline."""
    spec = spec or TinyLlavaSpec()
    processor = build_tiny_llava_processor(spec)
    return _init_tiny_llava_family(spec, processor, LlavaConfig, LlavaForConditionalGeneration)


# ------------------------------------------------------------------------------------------------- LLaVA-NeXT
@dataclass
class TinyLlavaNextSpec(TinyLlavaSpec):
    """Sizes of the tiny LLaVA-NeXT: the tiny LLaVA's plus an anyres grid.

    The default grid is llava-v1.6's (`[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]`) scaled from
    336-pixel tiles to the tiny 30-pixel ones, so an image is cut into 1x2, 2x1, 2x2, 3x1 or 1x3 tiles (plus the base
    image) depending on its shape, and its number of image tokens depends on its size, as in the real model.
    """

    image_grid_pinpoints: list[list[int]] = field(
        default_factory=lambda: [[30, 60], [60, 30], [60, 60], [90, 30], [30, 90]]
    )


def build_tiny_llava_next(
    spec: TinyLlavaNextSpec | None = None,
) -> tuple[LlavaNextForConditionalGeneration, LlavaNextProcessor]:
    """A randomly initialized tiny `LlavaNextForConditionalGeneration` (anyres tiles, `image_newline`) and its
    `LlavaNextProcessor`, built offline. The LLaVA-1.5 chat template is llava-v1.6-vicuna's."""
    spec = spec or TinyLlavaNextSpec()
    processor = _tiny_llava_family_processor(
        spec, LlavaNextProcessor, LlavaNextImageProcessorPil, image_grid_pinpoints=spec.image_grid_pinpoints
    )
    return _init_tiny_llava_family(
        spec,
        processor,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        image_grid_pinpoints=spec.image_grid_pinpoints,
    )


# ---------------------------------------------------------------------------------------- Llama 3.2 Vision
# Llama 3 conversation format, with `<|image|>` where the user's image goes (Llama-3.2-Vision-Instruct's layout).
MLLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|image|>' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

MLLAMA_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|eot_id|>",
    "<|finetune_right_pad_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
]


@dataclass
class TinyMllamaSpec:
    """Sizes of the tiny Llama 3.2 Vision (`mllama`), with the real model's structure at toy sizes.

    The vision model has a local encoder (`vision_layers` blocks) and a gated global one (`global_layers`), and its
    output concatenates the final hidden state with the local blocks' `intermediate_layers_indices` (0-based), so
    `vision_output_dim = vision_hidden_size * (1 + len(intermediate_layers_indices))`, as 7680 = 1280 x 6 in the 11B
    model. The LLM's `cross_attention_layers` read the projected image states. As in the real model, the `<|image|>`
    token's id equals the text vocabulary size: it has an input embedding but no output logit.
    """

    image_size: int = 28
    patch_size: int = 7
    max_num_tiles: int = 4
    vision_hidden_size: int = 32
    vision_layers: int = 4
    global_layers: int = 2
    vision_heads: int = 4
    intermediate_layers_indices: list[int] = field(default_factory=lambda: [1, 2])
    text_hidden_size: int = 64
    text_layers: int = 3
    cross_attention_layers: list[int] = field(default_factory=lambda: [1])
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate_size: int = 128
    vocab_size: int = 600
    corpus: list[str] = field(default_factory=list)
    seed: int = 0
    attn_implementation: str = "sdpa"


def build_tiny_mllama_tokenizer(corpus: Iterable[str] = (), vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Llama 3's special tokens; `<|image|>` is added last (id = text vocab size)."""
    tokenizer = _train_byte_level_bpe(corpus, vocab_size, MLLAMA_SPECIAL_TOKENS, unk_token=None)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        extra_special_tokens={"image_token": "<|image|>"},
        padding_side="left",
        chat_template=MLLAMA_CHAT_TEMPLATE,
    )


def build_tiny_mllama(spec: TinyMllamaSpec | None = None) -> tuple[MllamaForConditionalGeneration, MllamaProcessor]:
    """A randomly initialized tiny `MllamaForConditionalGeneration` and its `MllamaProcessor` (tiles, aspect-ratio
    ids, cross-attention mask), built offline."""
    spec = spec or TinyMllamaSpec()
    tokenizer = build_tiny_mllama_tokenizer(spec.corpus, spec.vocab_size)
    image_processor = MllamaImageProcessorPil(
        size={"height": spec.image_size, "width": spec.image_size}, max_image_tiles=spec.max_num_tiles
    )
    processor = MllamaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=MLLAMA_CHAT_TEMPLATE
    )
    vision_config = MllamaVisionConfig(
        hidden_size=spec.vision_hidden_size,
        intermediate_size=2 * spec.vision_hidden_size,
        num_hidden_layers=spec.vision_layers,
        num_global_layers=spec.global_layers,
        attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        max_num_tiles=spec.max_num_tiles,
        intermediate_layers_indices=list(spec.intermediate_layers_indices),
        vision_output_dim=spec.vision_hidden_size * (1 + len(spec.intermediate_layers_indices)),
        initializer_range=0.2,
    )
    text_config = MllamaTextConfig(
        vocab_size=processor.image_token_id,  # every token but <|image|>, which only has an input embedding
        hidden_size=spec.text_hidden_size,
        intermediate_size=spec.text_intermediate_size,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        cross_attention_layers=list(spec.cross_attention_layers),
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = MllamaConfig(
        vision_config=vision_config, text_config=text_config, image_token_index=processor.image_token_id
    )
    model = _init_model(MllamaForConditionalGeneration, config, spec, tokenizer)
    # Mllama initializes its tanh gates (tile and position embeddings, global encoder blocks, the LLM's
    # cross-attention layers) at 0 or near it, which shuts the image out until training opens them, as it did in the
    # released model. Open them, so that the tiny LLM's answers depend on the image states it reads.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.rsplit(".", 1)[-1] in (
                "gate",
                "gate_attn",
                "gate_ffn",
                "cross_attn_attn_gate",
                "cross_attn_mlp_gate",
            ):
                parameter.fill_(1.0)
    return model, processor


def build_tiny_reward_model(
    tokenizer: PreTrainedTokenizerFast, num_labels: int = 1, seed: int = 0
) -> LlamaForSequenceClassification:
    """A randomly initialized tiny sequence-classification model over `tokenizer` (`num_labels=1`: a scalar reward
    model for `HFRewardModel` / `--reward-model hf:PATH`); its scores are noise, for exercising code paths only."""
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(tiny_llama_config(tokenizer, num_labels=num_labels)).eval()


def build_tiny_safevlm(spec: TinyLlavaSpec | None = None, num_safety_tokens: int = 4, **safety_overrides):
    """A tiny SafeVLM converted from a tiny LLaVA (safety modules freshly initialized) and its `SafeVLMProcessor`.

    With a :class:`TinyLlavaNextSpec`, a tiny SafeVLM-NeXT (anyres tiles) and its `SafeVLMNextProcessor`.
    """
    from .modeling.modeling_safevlm import SafeVLMForConditionalGeneration, SafeVLMNextForConditionalGeneration
    from .modeling.processing_safevlm import SafeVLMNextProcessor, SafeVLMProcessor

    if isinstance(spec, TinyLlavaNextSpec):
        base, base_processor = build_tiny_llava_next(spec)
        model_class, processor_class = SafeVLMNextForConditionalGeneration, SafeVLMNextProcessor
    else:
        base, base_processor = build_tiny_llava(spec)
        model_class, processor_class = SafeVLMForConditionalGeneration, SafeVLMProcessor
    model = model_class.from_llava(base, num_safety_tokens=num_safety_tokens, seed=0, **safety_overrides)
    processor = processor_class.from_llava_processor(base_processor, num_safety_tokens=num_safety_tokens)
    model.set_safety_tokenizer(processor.tokenizer)
    return model.eval(), processor


__all__ = [
    "LLAVA_CHAT_TEMPLATE",
    "MLLAMA_CHAT_TEMPLATE",
    "TinyLlavaNextSpec",
    "TinyLlavaSpec",
    "TinyMllamaSpec",
    "build_tiny_llava",
    "build_tiny_llava_next",
    "build_tiny_llava_processor",
    "build_tiny_mllama",
    "build_tiny_mllama_tokenizer",
    "build_tiny_reward_model",
    "build_tiny_safevlm",
    "build_tiny_tokenizer",
    "tiny_llama_config",
]
