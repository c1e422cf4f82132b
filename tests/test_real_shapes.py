"""Real llava-1.5 shapes on the meta device: the safety modules stay a small fraction of the model."""

import pytest
import torch
from safevlm_hf import SafeVLMConfig, SafeVLMForConditionalGeneration
from safevlm_hf.real_shapes import llava_15_config  # the published llava-1.5 shapes


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
