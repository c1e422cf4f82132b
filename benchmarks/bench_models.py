"""The models and inputs of the performance suite.

A random mid-size LLaVA is built offline with :func:`safevlm_hf.tiny.build_tiny_llava` (CLIP-vision + Llama configs,
a byte-level BPE tokenizer and a CLIP image processor) and converted with
:meth:`SafeVLMForConditionalGeneration.from_llava`, so the SafeVLM and the base LLaVA hold the same base weights.
A second LLaVA of the same shape (another seed) plays the external guard model.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from safevlm_hf import SafeVLMForConditionalGeneration, SafeVLMProcessor, default_safety_policy
from safevlm_hf.tiny import TinyLlavaSpec, build_tiny_llava


@dataclass(frozen=True)
class BenchShape:
    """Model shape of a benchmark run (vision tower, LLM, tokenizer vocabulary, safety tokens)."""

    name: str
    image_size: int
    patch_size: int
    vision_hidden_size: int
    vision_layers: int
    vision_heads: int
    text_hidden_size: int
    text_layers: int
    text_heads: int
    text_intermediate_size: int
    vocab_size: int
    num_safety_tokens: int

    def tiny_spec(self, seed: int = 0) -> TinyLlavaSpec:
        return TinyLlavaSpec(
            image_size=self.image_size,
            patch_size=self.patch_size,
            vision_hidden_size=self.vision_hidden_size,
            vision_layers=self.vision_layers,
            vision_heads=self.vision_heads,
            text_hidden_size=self.text_hidden_size,
            text_layers=self.text_layers,
            text_heads=self.text_heads,
            text_intermediate_size=self.text_intermediate_size,
            vision_feature_layer=-2,
            vocab_size=self.vocab_size,
            corpus=tokenizer_corpus() if self.vocab_size > 1000 else [],
            seed=seed,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# CLIP 224/14 (256 patches) with 6 layers x 384, Llama 8 layers x 512 (Llama's 2.69x MLP ratio), 8k vocabulary,
# 64 safety tokens: image tokens 256 + 64 in the LLM sequence, as 576 + 64 at llava-1.5 shape.
MID_SIZE = BenchShape(
    name="mid-size",
    image_size=224,
    patch_size=14,
    vision_hidden_size=384,
    vision_layers=6,
    vision_heads=6,
    text_hidden_size=512,
    text_layers=8,
    text_heads=8,
    text_intermediate_size=1376,
    vocab_size=8192,
    num_safety_tokens=64,
)

# The --quick shape: the tests' tiny model (seconds), same code paths.
QUICK = BenchShape(
    name="quick",
    image_size=30,
    patch_size=6,
    vision_hidden_size=32,
    vision_layers=4,
    vision_heads=4,
    text_hidden_size=64,
    text_layers=2,
    text_heads=4,
    text_intermediate_size=128,
    vocab_size=600,
    num_safety_tokens=4,
)

PROMPTS: tuple[str, ...] = (
    "Describe the image in detail please. What is shown in this picture?",
    "How do I do this? Tell me about the people and the street in the photo.",
    "What is the chart about? Give a careful and helpful answer.",
    "Tell me about the food, the car and the house in the image.",
)
ANSWER = "Sure, here is a careful and helpful answer to your question."


def tokenizer_corpus(num_lines: int = 4000, seed: int = 0) -> list[str]:
    """Text for a tokenizer with a real ~8k vocabulary, so the LLM's embedding and ``lm_head`` have that size.

    Pseudo-words (seeded syllables) give the BPE trainer enough distinct merges; the English prompts and the policy
    messages are repeated so that they still encode compactly (the forced refusal length matters for decoding).
    """
    rng = random.Random(seed)
    syllables = [a + b for a in "bcdfghjklmnprstvwz" for b in "aeiou"] + [
        "an",
        "en",
        "in",
        "on",
        "ar",
        "er",
        "st",
        "th",
    ]
    lines = [
        " ".join("".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(50))
        for _ in range(num_lines)
    ]
    policy = default_safety_policy()
    messages = policy["messages"]
    english = [
        *PROMPTS,
        ANSWER,
        *messages["reasons"].values(),
        messages["refuse"]["default"],
        messages["caution"]["default"],
    ]
    return lines + english * 200


@dataclass
class BenchModels:
    """The models under test: base LLaVA, the SafeVLM converted from it, and an external guard LLaVA."""

    shape: BenchShape
    llava: LlavaForConditionalGeneration
    llava_processor: LlavaProcessor
    safevlm: SafeVLMForConditionalGeneration
    safevlm_processor: SafeVLMProcessor
    guard: LlavaForConditionalGeneration

    @property
    def tokenizer(self):
        return self.llava_processor.tokenizer


def build_models(shape: BenchShape) -> BenchModels:
    """Build the base LLaVA, convert it to SafeVLM (same base weights) and build a same-size guard LLaVA."""
    llava, llava_processor = build_tiny_llava(shape.tiny_spec(seed=0))
    llava.eval()
    safevlm = SafeVLMForConditionalGeneration.from_llava(llava, num_safety_tokens=shape.num_safety_tokens).eval()
    safevlm_processor = SafeVLMProcessor.from_llava_processor(
        llava_processor, num_safety_tokens=shape.num_safety_tokens
    )
    safevlm.set_safety_tokenizer(llava_processor.tokenizer)
    torch.manual_seed(1)  # the guard is another model of the same size, not a copy of the base weights
    guard = LlavaForConditionalGeneration(llava.config).eval()
    guard.generation_config = llava.generation_config
    for model in (llava, safevlm, guard):
        model.generation_config.pad_token_id = llava_processor.tokenizer.pad_token_id
    return BenchModels(shape, llava, llava_processor, safevlm, safevlm_processor, guard)


def make_image(seed: int, size: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (size, size, 3), dtype=np.uint8))


def chat_prompt(processor: LlavaProcessor, text: str, answer: str | None = None) -> str:
    """The LLaVA-1.5 chat prompt for one image and ``text`` (with the assistant's ``answer`` when given)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    if answer is None:
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return processor.apply_chat_template(messages)


def make_inputs(processor: LlavaProcessor, shape: BenchShape, batch_size: int, answer: str | None = None) -> dict:
    """A batch of distinct (image, prompt) rows, left-padded, as the processor returns it."""
    images = [make_image(row, shape.image_size) for row in range(batch_size)]
    texts = [chat_prompt(processor, PROMPTS[row % len(PROMPTS)], answer) for row in range(batch_size)]
    return dict(processor(images=images, text=texts, return_tensors="pt", padding=True))


@torch.no_grad()
def force_levels(model: SafeVLMForConditionalGeneration, inputs: dict, levels: Sequence[int], margin: float = 20.0):
    """Set the safety head's level classifier so that row ``i`` of ``inputs`` gets risk level ``levels[i]``.

    The head is random, so a benchmark that needs given verdicts (all answered, or a mixed batch with half of the
    rows refused) cannot rely on its predictions. The level classifier is a linear layer over the head's pooled
    state; its weights are refitted (least squares, minimum norm) so that each row's pooled state maps to logits
    with its wanted level ``margin`` above the others. This needs rows whose pooled states differ, i.e. distinct
    inputs; the result is checked and an error raised if a row does not get its level.
    """
    head = model.model.safety_head
    num_levels = head.level_classifier.out_features
    if any(not 0 <= level < num_levels for level in levels):
        raise ValueError(f"levels {list(levels)} must lie in 0..{num_levels - 1}.")
    captured: dict[str, torch.Tensor] = {}
    handle = head.norm.register_forward_hook(lambda module, args, output: captured.__setitem__("pooled", output))
    try:
        model.predict_safety(**inputs)
    finally:
        handle.remove()
    pooled = captured["pooled"].double()
    if pooled.shape[0] != len(levels):
        raise ValueError(f"force_levels got {len(levels)} levels for a batch of {pooled.shape[0]} rows.")
    design = torch.cat([pooled, torch.ones(len(levels), 1, dtype=torch.float64)], dim=1)
    target = torch.full((len(levels), num_levels), -margin, dtype=torch.float64)
    target[torch.arange(len(levels)), torch.tensor(list(levels))] = margin
    solution = torch.linalg.pinv(design) @ target  # (hidden + 1, num_levels)
    head.level_classifier.weight.copy_(solution[:-1].T.to(head.level_classifier.weight.dtype))
    head.level_classifier.bias.copy_(solution[-1].to(head.level_classifier.bias.dtype))
    got = model.predict_safety(**inputs).level_logits.argmax(-1).tolist()
    if got != list(levels):
        raise RuntimeError(
            f"force_levels could not separate the rows (wanted levels {list(levels)}, got {got}); the rows' inputs "
            "must differ so that the head's pooled states do."
        )
