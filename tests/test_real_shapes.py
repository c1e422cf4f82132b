"""Real llava-1.5 shapes on the meta device: the safety modules stay a small fraction of the model."""

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

from safevlm_hf import SafeVLMConfig, SafeVLMForConditionalGeneration


def llava_15_config(size: str) -> LlavaConfig:
    """The published llava-hf/llava-1.5-{7b,13b}-hf configuration values."""
    text = {
        "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
        "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    }[size]
    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(vocab_size=32064, **text),
        image_token_index=32000,
        image_seq_length=576,
        vision_feature_layer=-2,
    )


@pytest.mark.parametrize("size, expected_base", [("7b", 7.06e9), ("13b", 13.35e9)])
def test_safety_parameters_at_llava_15_shapes(size, expected_base):
    config = SafeVLMConfig.from_llava_config(llava_15_config(size))
    with torch.device("meta"):
        model = SafeVLMForConditionalGeneration(config)
    safety = sum(p.numel() for m in model.safety_modules().values() for p in m.parameters())
    total = sum(p.numel() for p in model.parameters())
    base = total - safety
    print(
        f"\nllava-1.5-{size}: base {base / 1e9:.3f}B, safety {safety / 1e6:.1f}M = {100 * safety / base:.2f}% of base"
    )
    assert abs(base - expected_base) / expected_base < 0.01  # really the llava-1.5 shape
    assert safety / base <= 0.03
    assert model.model.safety_tokens.llm_tokens.shape == (64, text_hidden := config.text_config.hidden_size)
    assert model.model.safety_tokens.head_tokens.shape == (64, text_hidden)
    assert model.model.safety_projector.linear_1.in_features == 1024
    assert model.model.safety_head.type_classifier.out_features == 7
    assert model.model.safety_head.level_classifier.out_features == 4
