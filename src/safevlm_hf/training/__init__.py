# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""Two-stage SafeVLM training on `transformers.Trainer`.

Example::

    from safevlm_hf.data import load_safety_dataset
    from safevlm_hf.training import SafeVLMTrainer, SafeVLMTrainingConfig, merge_stage2

    data = load_safety_dataset("data.jsonl")  # or "vlguard:train.json", or a datasets.Dataset
    stage1 = SafeVLMTrainingConfig(output_dir="out/stage1", stage=1, num_safe_samples=1000)
    SafeVLMTrainer(model, stage1, train_dataset=data, processing_class=processor).train()
    stage2 = SafeVLMTrainingConfig(output_dir="out/stage2", stage=2)  # LoRA on the LLM by default
    trainer = SafeVLMTrainer(model, stage2, train_dataset=data, processing_class=processor)
    trainer.train()
    merge_stage2(trainer.model).save_pretrained("out/safevlm")

    # The published PSA-VLM hyperparameters (flags/keywords override them):
    stage1 = SafeVLMTrainingConfig.from_recipe("psa-vlm", stage=1, output_dir="out/stage1", num_safe_samples=1000)
"""

from .conditioning import condition_example, condition_on_policy, policy_action
from .config import SafeVLMTrainingConfig
from .recipes import RecipeError, TrainingRecipe, build_training_config, list_recipes, load_recipe
from .stages import (
    SAFETY_PARAMETER_PREFIXES,
    apply_llm_lora,
    apply_stage2_lora,
    freeze_for_full_stage2,
    freeze_for_stage1,
    is_safety_parameter,
    llm_linear_layer_names,
    llm_lora_config,
    merge_stage2,
    record_training_stage,
    unwrap_safevlm,
)
from .trainer import SafeVLMTrainer


__all__ = [
    "RecipeError",
    "SAFETY_PARAMETER_PREFIXES",
    "SafeVLMTrainer",
    "SafeVLMTrainingConfig",
    "TrainingRecipe",
    "apply_llm_lora",
    "build_training_config",
    "apply_stage2_lora",
    "condition_example",
    "condition_on_policy",
    "freeze_for_full_stage2",
    "freeze_for_stage1",
    "is_safety_parameter",
    "list_recipes",
    "llm_linear_layer_names",
    "llm_lora_config",
    "load_recipe",
    "merge_stage2",
    "policy_action",
    "record_training_stage",
    "unwrap_safevlm",
]
