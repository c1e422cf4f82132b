# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""Layer-wise alignment (Bachu et al., ICML 2025): the ICET per-layer vulnerability scan and L-PPO training.

* :func:`icet_scan` - generate with the LLM reading image features from each vision-encoder layer (an *image encoder
  early exit*), judge the answers, report attack success / refusal per layer and per third of the encoder.
* :class:`LPPOTrainer` + :class:`LPPOConfig` - clip-PPO RLHF whose rollouts are conditioned on a target layer's
  features, with pluggable rewards (:mod:`~safevlm_hf.layerwise.rewards`).
"""

from .icet import (
    IcetLayerResult,
    IcetReport,
    comparison_table,
    icet_scan,
    layer_group,
    load_icet_report,
    resolve_layers,
    vision_encoder_depth,
)
from .lppo_config import LPPOConfig
from .lppo_trainer import LPPOTrainer, ValueHead
from .prompts import PromptItem, load_prompt_file
from .rewards import CallableReward, HFRewardModel, RefusalReward, RewardFunction, SafetyHeadReward, build_reward


__all__ = [
    "CallableReward",
    "HFRewardModel",
    "IcetLayerResult",
    "IcetReport",
    "LPPOConfig",
    "LPPOTrainer",
    "PromptItem",
    "RefusalReward",
    "RewardFunction",
    "SafetyHeadReward",
    "ValueHead",
    "build_reward",
    "comparison_table",
    "icet_scan",
    "layer_group",
    "load_icet_report",
    "load_prompt_file",
    "resolve_layers",
    "vision_encoder_depth",
]
