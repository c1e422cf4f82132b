import pytest
from transformers import AutoConfig, LlavaConfig

from safevlm_hf import DEFAULT_SAFETY_LEVELS, DEFAULT_SAFETY_TYPES, SafeVLMConfig, SafetyPolicy, SafetyPolicyError


def test_defaults_follow_the_paper():
    config = SafeVLMConfig()
    assert config.model_type == "safevlm"
    assert isinstance(config, LlavaConfig)
    assert config.num_safety_tokens == 64
    assert config.safety_types == [
        "Politics",
        "Illegal Risk",
        "Insults & Bullying",
        "Fairness",
        "Privacy",
        "Misleading",
        "Safe",
    ]
    assert config.safety_levels == list(DEFAULT_SAFETY_LEVELS) and len(config.safety_levels) == 4
    assert config.safety_feature_layer == config.vision_feature_layer
    assert config.safety_loss_weight == 10.0
    # A config without sub-categories (as saved before they existed) gets the default policy for its labels.
    assert config.safety_subcategories == []
    assert SafetyPolicy.from_dict(config.safety_policy) == SafetyPolicy.default(config.safety_types, subcategories=[])


def test_a_new_conversion_predicts_the_sexual_content_sub_category():
    config = SafeVLMConfig.from_llava_config(LlavaConfig())
    assert config.safety_subcategories == ["Illegal Risk/Sexual content"]
    assert SafetyPolicy.from_dict(config.safety_policy) == SafetyPolicy.default()
    custom = SafeVLMConfig.from_llava_config(LlavaConfig(), safety_types=["Harm", "Safe"])
    assert custom.safety_subcategories == []  # no default sub-category fits this taxonomy
    with pytest.raises(ValueError, match="safety_subcategories entry 'Harm' must be 'Type/Sub-category'"):
        SafeVLMConfig.from_llava_config(LlavaConfig(), safety_types=["Harm", "Safe"], safety_subcategories=["Harm"])


def test_from_llava_config_keeps_every_llava_field():
    llava = LlavaConfig(image_token_index=7, vision_feature_layer=-3, image_seq_length=100)
    config = SafeVLMConfig.from_llava_config(llava, num_safety_tokens=16, safety_loss_weight=1.0)
    assert (config.image_token_id, config.vision_feature_layer, config.image_seq_length) == (7, -3, 100)
    assert config.text_config.to_dict() == llava.text_config.to_dict()
    assert config.vision_config.hidden_size == llava.vision_config.hidden_size
    assert config.num_safety_tokens == 16 and config.safety_loss_weight == 1.0
    assert config.safety_feature_layer == -3  # follows the LLaVA layer unless overridden


def test_round_trip_through_auto_config(tmp_path):
    config = SafeVLMConfig(num_safety_tokens=8, safety_feature_layer=-5)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is SafeVLMConfig
    expected = {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}
    assert {k: v for k, v in loaded.to_dict().items() if k != "_name_or_path"} == expected


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_safety_tokens": 0}, "num_safety_tokens must be an integer >= 1, got 0"),
        ({"safety_types": ["Safe", "Safe"]}, r"duplicate labels \['Safe'\]"),
        ({"safety_levels": ["only one"]}, "at least two label strings"),
        ({"safety_feature_layer": 99}, "safety_feature_layer 99 is outside the vision encoder"),
        (
            {"safety_policy": {"levels": {"0": "answer", "1": "answer", "2": "answer", "3": "answer"}}},
            r"safety_policy.levels.3: level 3 is always 'refuse'",
        ),
        (
            {
                "safety_policy": {
                    "levels": {"0": "answer", "1": "answer", "2": "answer", "3": "refuse"},
                    "types": {"Nudity": {"1": "refuse"}},
                }
            },
            r"unknown risk type 'Nudity'",
        ),
    ],
)
def test_invalid_settings_raise_one_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SafeVLMConfig(**kwargs)


def test_custom_taxonomy_gets_a_valid_default_policy():
    config = SafeVLMConfig(safety_types=["O1: Hate", "O2: Violence", "Safe"], safety_levels=["low", "mid", "high"])
    policy = SafetyPolicy.from_dict(config.safety_policy, config.safety_types, 3)
    assert policy.action("O2: Violence", 2) == "refuse"  # the top level is always refused
    assert set(DEFAULT_SAFETY_TYPES) - set(config.safety_types)  # the default types were pruned, not required


def test_policy_error_is_a_value_error_naming_the_key():
    with pytest.raises(SafetyPolicyError, match=r"safety_policy.profiles.kids.levels.7"):
        SafeVLMConfig(
            safety_policy={
                "levels": {"0": "answer", "1": "caution", "2": "refuse", "3": "refuse"},
                "profiles": {"kids": {"levels": {"7": "refuse"}}},
            }
        )
