# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""Layer-wise alignment (Bachu et al., ICML 2025): the ICET per-layer vulnerability scan and L-PPO training.

* :func:`icet_scan` - generate with the LLM reading image features from each vision-encoder layer (an *image encoder
  early exit*), judge the answers, report attack success / refusal per layer and per third of the encoder;
  :class:`IcetGrid` puts several scans in one model x layer group x metric grid.
* :func:`early_exit_for` - each family's early exit (LLaVA-1.5, LLaVA-NeXT, SafeVLM, Llama 3.2 Vision), one API.
* :class:`LPPOTrainer` + :class:`LPPOConfig` - clip-PPO RLHF whose rollouts are conditioned on a target layer's
  features, with pluggable rewards (:mod:`~safevlm_hf.layerwise.rewards`).
"""

from .early_exit import ImageEncoderEarlyExit, early_exit_for
from .icet import (
    IcetLayerResult,
    IcetReport,
    comparison_table,
    icet_scan,
    layer_group,
    layer_groups,
    load_icet_report,
    resolve_layers,
    vision_encoder_depth,
)
from .icet_grid import IcetGrid
from .lppo_config import LPPOConfig
from .lppo_trainer import LPPOTrainer, ValueHead
from .prompts import PromptItem, load_prompt_file
from .rewards import CallableReward, HFRewardModel, RefusalReward, RewardFunction, SafetyHeadReward, build_reward


__all__ = [
    "CallableReward",
    "HFRewardModel",
    "IcetGrid",
    "IcetLayerResult",
    "IcetReport",
    "ImageEncoderEarlyExit",
    "LPPOConfig",
    "LPPOTrainer",
    "PromptItem",
    "RefusalReward",
    "RewardFunction",
    "SafetyHeadReward",
    "ValueHead",
    "build_reward",
    "comparison_table",
    "early_exit_for",
    "icet_scan",
    "layer_group",
    "layer_groups",
    "load_icet_report",
    "load_prompt_file",
    "resolve_layers",
    "vision_encoder_depth",
]
