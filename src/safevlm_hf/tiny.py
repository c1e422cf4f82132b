"""Tiny, fully offline LLaVA/SafeVLM builders for tests, examples and the demo.

Nothing is downloaded: the tokenizer is a byte-level BPE trained with `tokenizers` on a small corpus, the image
processor is a `CLIPImageProcessorPil` built in code, and the model configs are tiny CLIP-vision + Llama configs.
The code paths are the same as for real checkpoints (e.g. `llava-hf/llava-1.5-7b-hf`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
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
    policy = default_safety_policy()
    messages = policy["messages"]
    texts = list(messages["reasons"].values())
    texts += [table["default"] for key, table in messages.items() if key in ("refuse", "caution")]
    return texts


def build_tiny_tokenizer(corpus: Iterable[str] = (), vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (Llama-style special tokens, `<image>` included) trained offline on `corpus`."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([*_BASE_CORPUS, *_policy_corpus(), *corpus], trainer=trainer)
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


def build_tiny_llava_processor(spec: TinyLlavaSpec | None = None) -> LlavaProcessor:
    """The LLaVA processor of the tiny model (tokenizer + CLIP image processor + chat template)."""
    spec = spec or TinyLlavaSpec()
    tokenizer = build_tiny_tokenizer(spec.corpus, spec.vocab_size)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )


def build_tiny_llava(spec: TinyLlavaSpec | None = None) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A randomly initialized tiny `LlavaForConditionalGeneration` and its processor, built offline."""
    spec = spec or TinyLlavaSpec()
    processor = build_tiny_llava_processor(spec)
    tokenizer = processor.tokenizer
    vision_config = CLIPVisionConfig(
        hidden_size=spec.vision_hidden_size,
        intermediate_size=4 * spec.vision_hidden_size,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden_size,
    )
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden_size,
        intermediate_size=spec.text_intermediate_size,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_heads,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=processor.image_token_id,
        image_seq_length=(spec.image_size // spec.patch_size) ** 2,
        vision_feature_layer=spec.vision_feature_layer,
        vision_feature_select_strategy="default",
    )
    config._attn_implementation = spec.attn_implementation
    torch.manual_seed(spec.seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor


def build_tiny_safevlm(spec: TinyLlavaSpec | None = None, num_safety_tokens: int = 4, **safety_overrides):
    """A tiny SafeVLM converted from a tiny LLaVA (safety modules freshly initialized) and its `SafeVLMProcessor`."""
    from .modeling.modeling_safevlm import SafeVLMForConditionalGeneration
    from .modeling.processing_safevlm import SafeVLMProcessor

    llava, llava_processor = build_tiny_llava(spec)
    model = SafeVLMForConditionalGeneration.from_llava(llava, num_safety_tokens=num_safety_tokens, **safety_overrides)
    processor = SafeVLMProcessor.from_llava_processor(llava_processor, num_safety_tokens=num_safety_tokens)
    model.set_safety_tokenizer(processor.tokenizer)
    return model.eval(), processor


__all__ = [
    "LLAVA_CHAT_TEMPLATE",
    "TinyLlavaSpec",
    "build_tiny_llava",
    "build_tiny_llava_processor",
    "build_tiny_safevlm",
    "build_tiny_tokenizer",
]
