"""Real shapes of the layer-wise paper's other two families on the meta device: llava-v1.6 (LLaVA-NeXT, Mistral-7B and
Vicuna-7B) and Llama-3.2-11B-Vision, their early exit's layer numbering and groups, and the mllama early exit run at
the real vision shapes (560-pixel tiles, 1601 patches padded to 1608, 4 tiles, 7680 projector features).

The configs (safevlm_hf.real_shapes) are written from the published config.json values of
llava-hf/llava-v1.6-mistral-7b-hf, llava-hf/llava-v1.6-vicuna-7b-hf and meta-llama/Llama-3.2-11B-Vision. The parameter
counts asserted are those the Hub reports for these checkpoints' safetensors weights (7.57B, 7.06B and 10.7B); an
architecture or config mistake moves them.
"""

import pytest
import torch
from transformers import (
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    MllamaForConditionalGeneration,
)

from safevlm_hf.layerwise import early_exit_for, layer_groups
from safevlm_hf.real_shapes import llama_32_11b_vision_config, llava_15_config, llava_next_config


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("text, published", [("mistral", 7_566_747_648), ("vicuna", 7_063_431_168)])
def test_llava_v16_shapes_and_early_exit(text, published):
    with torch.device("meta"):
        model = LlavaNextForConditionalGeneration(llava_next_config(text))
    assert parameters(model) == published
    assert model.model.image_newline.shape == (4096,)  # the row appended after each row of anyres tile features
    assert (
        model.model.multi_modal_projector.linear_1.in_features,
        model.model.multi_modal_projector.linear_2.out_features,
    ) == (1024, 4096)
    exit_ = early_exit_for(model)
    assert (exit_.num_layers, exit_.default_layer) == (24, 23)  # CLIP ViT-L/14-336, vision_feature_layer=-2
    with exit_.at(8) as kwargs:
        assert kwargs == {"vision_feature_layer": 8}
    assert layer_groups(24) == {"early": list(range(1, 9)), "middle": list(range(9, 17)), "late": list(range(17, 25))}


def test_llava_v16_vicuna_is_llava_15_plus_the_newline_row():
    with torch.device("meta"):
        base = parameters(LlavaForConditionalGeneration(llava_15_config("7b")))
        next_ = parameters(LlavaNextForConditionalGeneration(llava_next_config("vicuna")))
    assert next_ - base == 4096  # same tower, projector and LLM: only image_newline is new


def test_llama_32_11b_vision_shapes_and_early_exit_at_real_shapes():
    with torch.device("meta"):
        model = MllamaForConditionalGeneration(llama_32_11b_vision_config())
    assert parameters(model) == 10_670_220_835
    projector = model.model.multi_modal_projector
    assert (projector.in_features, projector.out_features) == (1280 * (1 + 5), 4096)  # final + 5 intermediate layers
    assert model.model.language_model.embed_tokens.weight.shape == (128256 + 8, 4096)  # <|image|> = 128256: no logit
    assert model.lm_head.out_features == 128256
    cross = [type(layer).__name__ for layer in model.model.language_model.layers].count(
        "MllamaCrossAttentionDecoderLayer"
    )
    assert cross == 8

    exit_ = early_exit_for(model)
    assert (exit_.num_layers, exit_.default_layer) == (40, 40)  # 32 local + 8 global blocks; the output is layer 40
    assert {g: (m[0], m[-1]) for g, m in layer_groups(40).items()} == {
        "early": (1, 14),
        "middle": (15, 27),
        "late": (28, 40),
    }

    vision = model.model.vision_model
    pixels = torch.empty(1, 1, 4, 3, 560, 560, device="meta")  # one image cut into 4 tiles of 560 x 560
    ratio_ids = torch.ones(1, 1, dtype=torch.long, device="meta")
    ratio_mask = torch.ones(1, 1, 4, dtype=torch.long, device="meta")
    for layer in (1, 16, 32, 33, 39, 40):  # local blocks, the first and a late global block, the default
        with exit_.at(layer):
            assert len(vision._forward_hooks) == (layer != 40)  # the substitution is hooked (not for the default)
            states = vision(pixel_values=pixels, aspect_ratio_ids=ratio_ids, aspect_ratio_mask=ratio_mask)
        features = states.last_hidden_state
        assert features.shape == (1, 1, 4, 1601, 7680)  # 40 x 40 patches + CLS per tile, padding (to 1608) removed
        cross_attention_states = projector(features).reshape(-1, features.shape[-2], 4096)
        assert cross_attention_states.shape == (4, 1601, 4096)
