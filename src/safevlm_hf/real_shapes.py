# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""The published configurations of the real models this package targets, built offline (nothing is downloaded).

Written from the ``config.json`` of llava-hf/llava-1.5-{7b,13b}-hf, llava-hf/llava-v1.6-{mistral,vicuna}-7b-hf and
meta-llama/Llama-3.2-11B-Vision. ``safevlm plan`` builds its built-in models from them on the meta device, the
performance suite (``benchmarks/``) counts their FLOPs, and the real-shape tests check them against the parameter
counts the Hub reports for these checkpoints (an architecture or config mistake moves the counts). The tiny models of
the tests and the demo are :mod:`safevlm_hf.tiny`'s.
"""

from __future__ import annotations

from typing import Any

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig, MistralConfig, MllamaConfig


#: CLIP ViT-L/14 at 336 pixels: the vision tower of LLaVA-1.5 and LLaVA-NeXT (llava-v1.6).
CLIP_VIT_L_336: dict[str, Any] = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
)

#: Vicuna-7B / 13B as LLaVA's LLM (LLaVA's vocabulary of 32064, the image token included).
VICUNA: dict[str, dict[str, Any]] = {
    size: dict(
        vocab_size=32064,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    )
    for size, (hidden, intermediate, layers, heads) in {
        "7b": (4096, 11008, 32, 32),
        "13b": (5120, 13824, 40, 40),
    }.items()
}

#: The anyres grid of llava-v1.6.
LLAVA_V16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def llava_15_config(size: str) -> LlavaConfig:
    """llava-hf/llava-1.5-{7b,13b}-hf (``size``: ``"7b"`` or ``"13b"``): CLIP ViT-L/14-336 + Vicuna."""
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**CLIP_VIT_L_336),
        text_config=LlamaConfig(**VICUNA[size]),
        image_token_index=32000,
        image_seq_length=576,
        vision_feature_layer=-2,
    )


def llava_next_config(text: str) -> LlavaNextConfig:
    """llava-hf/llava-v1.6-{mistral,vicuna}-7b-hf (``text``: ``"mistral"`` or ``"vicuna"``)."""
    if text == "mistral":
        text_config = MistralConfig(
            vocab_size=32064,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=32768,
            rms_norm_eps=1e-5,
            rope_theta=1000000.0,
            sliding_window=None,
        )
    elif text == "vicuna":
        text_config = LlamaConfig(**VICUNA["7b"])
    else:
        raise ValueError(f"llava-v1.6 comes with a 'mistral' or 'vicuna' LLM, not {text!r}.")
    return LlavaNextConfig(
        vision_config=CLIPVisionConfig(**CLIP_VIT_L_336),
        text_config=text_config,
        image_token_index=32000,
        image_grid_pinpoints=LLAVA_V16_PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def llama_32_11b_vision_config() -> MllamaConfig:
    """meta-llama/Llama-3.2-11B-Vision."""
    vision = dict(
        image_size=560,
        patch_size=14,
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_global_layers=8,
        attention_heads=16,
        vision_output_dim=7680,
        max_num_tiles=4,
        intermediate_layers_indices=[3, 7, 15, 23, 30],
        norm_eps=1e-5,
    )
    rope = dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    )
    text = dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=40,
        num_attention_heads=32,
        num_key_value_heads=8,
        cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38],
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters=rope,
        tie_word_embeddings=False,
    )
    return MllamaConfig(vision_config=vision, text_config=text, image_token_index=128256)


__all__ = [
    "CLIP_VIT_L_336",
    "LLAVA_V16_PINPOINTS",
    "VICUNA",
    "llama_32_11b_vision_config",
    "llava_15_config",
    "llava_next_config",
]
