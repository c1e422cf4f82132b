"""Real shapes of the layer-wise paper's other two families on the meta device: llava-v1.6 (LLaVA-NeXT, Mistral-7B and
Vicuna-7B) and Llama-3.2-11B-Vision, their early exit's layer numbering and groups, and the mllama early exit run at
the real vision shapes (560-pixel tiles, 1601 patches padded to 1608, 4 tiles, 7680 projector features).

The configs are written from the published config.json values of llava-hf/llava-v1.6-mistral-7b-hf,
llava-hf/llava-v1.6-vicuna-7b-hf and meta-llama/Llama-3.2-11B-Vision. The parameter counts asserted are those the Hub
reports for these checkpoints' safetensors weights (7.57B, 7.06B and 10.7B); an architecture or config mistake moves
them.
"""

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    MistralConfig,
    MllamaConfig,
    MllamaForConditionalGeneration,
)

from safevlm_hf.layerwise import early_exit_for, layer_groups


CLIP_VIT_L_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
)
LLAVA_V16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
VICUNA_7B = dict(
    vocab_size=32064,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
)


def llava_next_config(text: str) -> LlavaNextConfig:
    """llava-hf/llava-v1.6-{mistral,vicuna}-7b-hf."""
    text_config = {
        "mistral": MistralConfig(
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
        ),
        "vicuna": LlamaConfig(**VICUNA_7B),
    }[text]
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
    llava_15 = LlavaConfig(
        vision_config=CLIPVisionConfig(**CLIP_VIT_L_336),
        text_config=LlamaConfig(**VICUNA_7B),
        image_token_index=32000,
        vision_feature_layer=-2,
    )
    with torch.device("meta"):
        base = parameters(LlavaForConditionalGeneration(llava_15))
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
