# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""Configuration of Layer-wise PPO (L-PPO) training."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any


LAYER_SAMPLING = ("random", "cycle")
KL_ESTIMATORS = ("k1", "k3")


# A plain dataclass, not a `transformers.TrainingArguments` subclass: the PPO loop is not a `Trainer`, and most of
# TrainingArguments' ~150 fields (evaluation strategy, dataloader workers, hub pushing, ...) would be accepted but
# silently ignored here. The names that do carry over keep TrainingArguments' spelling and meaning.
@dataclass
class LPPOConfig:
    r"""
    Settings of an :class:`~safevlm_hf.layerwise.LPPOTrainer` run.

    Layer-wise PPO (Bachu et al., ICML 2025) is clip-PPO RLHF whose rollouts are generated - and whose
    log-probabilities and values are computed - with the LLM reading image features from vision-encoder layer `l`
    instead of the default layer, so that the safety behaviour learned at the default layer is extended to the early
    exit.

    Target layers:
        layers (`int | list[int] | str`):
            The vision layer(s) rollouts are conditioned on: one layer (as published), or several - `"a-b"`, a comma
            list, or a list - of which one is drawn per PPO step (our extension). Layers are 1..N or negative.
            Adding the default layer to the set (e.g. `[4, -2]`) keeps the default path's behaviour in the reward; with
            the early layer alone, the update can spill over to the default path (see examples/layerwise_alignment.py).
        layer_sampling (`str`, defaults to `"random"`):
            With several layers: `"random"` (seeded draw per step) or `"cycle"` (in order).

    Rollouts:
        max_steps (`int`, defaults to 100): PPO steps (one rollout batch and its updates per step).
        rollout_batch_size (`int`, defaults to 8): prompts per step.
        max_new_tokens (`int`, defaults to 32), temperature (`float`, defaults to 1.0), top_k (`int`, defaults to 0,
        off), top_p (`float`, defaults to 1.0): sampling of the responses. Log-probabilities use the same temperature;
        top-k/top-p truncation is not reflected in them (keep both off for exact on-policy ratios).

    PPO:
        ppo_epochs (`int`, defaults to 4): passes over each rollout batch.
        mini_batch_size (`int`, defaults to 4): rows per gradient step.
        clip_eps (`float`, defaults to 0.2): the ratio clip range epsilon.
        value_clip (`float | None`, defaults to 0.2): value-prediction clip range (`None`: unclipped value loss).
        vf_coef (`float`, defaults to 0.1): weight of the value loss.
        entropy_coef (`float`, defaults to 0.0): weight of the entropy bonus.
        target_kl (`float | None`): stop a step's remaining updates once the mean approximate KL between the
            updated and the rollout policy exceeds `1.5 * target_kl` (`None`: always run every epoch).
        gamma (`float`, defaults to 1.0) and lam (`float`, defaults to 0.95): GAE discount and lambda.
        whiten_advantages (`bool`, defaults to `False`): normalise advantages to zero mean and unit variance per
            rollout batch. Off by default: once a bounded reward saturates (e.g. every response is refused), the
            batch's advantages are value-estimate noise, and whitening scales that noise up to unit size and
            destabilises the policy.
        kl_coef (`float`, defaults to 0.05): per-token KL penalty to the frozen reference, subtracted from the reward.
        kl_estimator (`str`, defaults to `"k1"`): `"k1"` or `"k3"` (see `ppo_math.kl_per_token`).
        score_clip (`float | None`): clip the reward model's scores to [-score_clip, score_clip].

    Optimisation:
        learning_rate (`float`, defaults to 1e-5): policy (LoRA or LLM) learning rate.
        value_head_learning_rate (`float | None`): the value head's (default: `learning_rate`).
        weight_decay (`float`, defaults to 0.0), max_grad_norm (`float | None`, defaults to 1.0),
        lr_scheduler_type (`str`, defaults to `"constant"`) and warmup_steps (`int`, defaults to 0): as in
        `transformers.TrainingArguments` (the scheduler comes from `transformers.get_scheduler`).

    Policy:
        use_lora (`bool`, defaults to `True`): train LoRA adapters (PEFT) on the LLM; `False` trains the whole LLM.
            Either way the vision encoder, the projector(s) and SafeVLM's safety modules stay frozen.
        lora_r (`int`, defaults to 16), lora_alpha (`int`, defaults to 32), lora_dropout (`float`, defaults to 0.0).
        lora_target_modules (`list[str] | None`): short names of the LLM's linear layers to adapt (e.g.
            `["q_proj", "v_proj"]`); default: every linear layer of the LLM.
        offload_reference (`bool`, defaults to `True`): with `use_lora=False`, keep the frozen reference policy (the
            initial LLM, for the KL term) on the CPU and stream it to the GPU one module at a time for each forward
            (accelerate's `cpu_offload`), rather than a second full copy in GPU memory. `False`: keep it on the GPU
            (faster, twice the weights' memory). With LoRA the reference is the policy with its adapters disabled.

    Memory and devices:
        activation_checkpointing (`bool`, defaults to `False`): recompute each decoder layer's activations in the
            backward pass of the PPO updates instead of storing them (as `TrainingArguments.activation_checkpointing`;
            the rollouts, which need no backward pass, keep their KV cache).
        use_cpu (`bool`, defaults to `False`): train on the CPU even if a GPU is there (without a GPU the CPU is used
            anyway; several processes then talk over gloo).

    Bookkeeping:
        output_dir (`str`): where checkpoints, the log (`lppo_log.jsonl`) and the final model go.
        Under `accelerate launch` / `torchrun` with N processes, `rollout_batch_size` and `mini_batch_size` are global
        (each a multiple of N): N processes take the same steps as one.
        seed (`int`, defaults to 42): seeds LoRA/value-head initialisation, prompt order, layer draws and sampling.
        logging_steps (`int`, defaults to 1): write a log entry every N steps.
        save_steps (`int`, defaults to 0): save a resumable checkpoint every N steps (0: only at the end).
        save_total_limit (`int | None`): keep only the newest N checkpoints.
        show_progress (`bool`, defaults to `True`): tqdm progress bar.
    """

    output_dir: str
    layers: int | list[int] | str
    layer_sampling: str = "random"
    max_steps: int = 100
    rollout_batch_size: int = 8
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    ppo_epochs: int = 4
    mini_batch_size: int = 4
    clip_eps: float = 0.2
    value_clip: float | None = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    target_kl: float | None = None
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = False
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    score_clip: float | None = None
    learning_rate: float = 1e-5
    value_head_learning_rate: float | None = None
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    lr_scheduler_type: str = "constant"
    warmup_steps: int = 0
    use_lora: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = None
    offload_reference: bool = True
    activation_checkpointing: bool = False
    use_cpu: bool = False
    seed: int = 42
    logging_steps: int = 1
    save_steps: int = 0
    save_total_limit: int | None = None
    show_progress: bool = True

    def __post_init__(self) -> None:
        self.output_dir = str(self.output_dir)
        positive = ("max_steps", "rollout_batch_size", "max_new_tokens", "ppo_epochs", "mini_batch_size")
        for name in positive + ("lora_r", "logging_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LPPOConfig.{name} must be an integer >= 1, got {value!r}.")
        for name in ("save_steps", "warmup_steps", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"LPPOConfig.{name} must be an integer >= 0, got {value!r}.")
        if self.mini_batch_size > self.rollout_batch_size:
            raise ValueError(
                f"LPPOConfig.mini_batch_size ({self.mini_batch_size}) is larger than rollout_batch_size "
                f"({self.rollout_batch_size}); a mini-batch is a slice of one rollout batch."
            )
        if not 0.0 < self.clip_eps < 1.0:
            raise ValueError(f"LPPOConfig.clip_eps must be in (0, 1), got {self.clip_eps!r} (0.2 is usual).")
        if self.value_clip is not None and self.value_clip <= 0:
            raise ValueError(f"LPPOConfig.value_clip must be > 0 or None, got {self.value_clip!r}.")
        if not 0.0 <= self.gamma <= 1.0 or not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"LPPOConfig.gamma and lam must be in [0, 1], got {self.gamma!r} and {self.lam!r}.")
        if self.temperature <= 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(
                f"LPPOConfig.temperature must be > 0 and top_p in (0, 1], got {self.temperature!r} and {self.top_p!r}."
            )
        if self.kl_coef < 0 or self.vf_coef < 0 or self.entropy_coef < 0:
            raise ValueError("LPPOConfig.kl_coef, vf_coef and entropy_coef must be >= 0.")
        if self.target_kl is not None and self.target_kl <= 0:
            raise ValueError(f"LPPOConfig.target_kl must be > 0 or None, got {self.target_kl!r}.")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"LPPOConfig.kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}.")
        if self.layer_sampling not in LAYER_SAMPLING:
            raise ValueError(
                f"LPPOConfig.layer_sampling must be one of {LAYER_SAMPLING}, got {self.layer_sampling!r}."
            )
        if self.learning_rate <= 0:
            raise ValueError(f"LPPOConfig.learning_rate must be > 0, got {self.learning_rate!r}.")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(f"LPPOConfig.save_total_limit must be >= 1 or None, got {self.save_total_limit!r}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json_file(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2), encoding="utf-8")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LPPOConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown LPPOConfig field(s) {unknown}; known fields: {sorted(known)}.")
        return cls(**data)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "LPPOConfig":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


__all__ = ["KL_ESTIMATORS", "LAYER_SAMPLING", "LPPOConfig"]
