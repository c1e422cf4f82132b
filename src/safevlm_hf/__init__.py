"""safevlm-hf: safety alignment for LLaVA-style vision-language models as a Hugging Face Transformers plugin.

Importing the package registers SafeVLM with `AutoConfig`, `AutoModel`, `AutoModelForImageTextToText` and
`AutoProcessor`, so saved checkpoints load through the Auto classes with or without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .hub.model_card import write_model_card
from .modeling.configuration_safevlm import SafeVLMConfig, SafeVLMNextConfig
from .modeling.gating_safevlm import GatePlan, SafetyGateLogitsProcessor
from .modeling.modeling_safevlm import (
    POST_SAVE_HOOKS,
    SafeVLMForConditionalGeneration,
    SafeVLMModel,
    SafeVLMNextForConditionalGeneration,
    SafeVLMNextModel,
    SafeVLMPreTrainedModel,
)
from .modeling.policy_safevlm import (
    DEFAULT_SAFETY_LEVELS,
    DEFAULT_SAFETY_TYPES,
    SafetyPolicy,
    SafetyPolicyError,
    SafetyVerdict,
    default_safety_policy,
)
from .modeling.processing_safevlm import SafeVLMNextProcessor, SafeVLMProcessor


__version__ = "0.1.0"

# AutoModel gives the generating model (with lm_head and gating), which is what users of a safety checkpoint expect
# from `AutoModel.from_pretrained(..., trust_remote_code=True)`; the saved auto_map says the same.
for _config, _model, _processor in (
    (SafeVLMConfig, SafeVLMForConditionalGeneration, SafeVLMProcessor),
    (SafeVLMNextConfig, SafeVLMNextForConditionalGeneration, SafeVLMNextProcessor),
):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
    AutoModelForImageTextToText.register(_config, _model, exist_ok=True)
    AutoProcessor.register(_config, _processor, exist_ok=True)


def _write_model_card_after_save(save_directory, config, overwrite_model_card: bool) -> None:
    write_model_card(save_directory, config, overwrite=overwrite_model_card)


# The card generator ships with the package, not in every checkpoint's remote code: `save_pretrained` calls it here.
if _write_model_card_after_save not in POST_SAVE_HOOKS:
    POST_SAVE_HOOKS.append(_write_model_card_after_save)

__all__ = [
    "DEFAULT_SAFETY_LEVELS",
    "DEFAULT_SAFETY_TYPES",
    "SafeVLMConfig",
    "SafeVLMForConditionalGeneration",
    "GatePlan",
    "SafeVLMModel",
    "SafeVLMNextConfig",
    "SafeVLMNextForConditionalGeneration",
    "SafeVLMNextModel",
    "SafeVLMNextProcessor",
    "SafeVLMPreTrainedModel",
    "SafeVLMProcessor",
    "SafetyGateLogitsProcessor",
    "SafetyPolicy",
    "SafetyPolicyError",
    "SafetyVerdict",
    "default_safety_policy",
]
