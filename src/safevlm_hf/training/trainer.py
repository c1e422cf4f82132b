# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""`SafeVLMTrainer`: the two-stage SafeVLM recipe on `transformers.Trainer`.

Checkpoints, ``resume_from_checkpoint``, logging, progress bars and multi-process launch (``torchrun`` /
``accelerate launch``) are the Trainer's own; this class adds what the recipe needs: which weights each stage trains
(:mod:`.stages`), data preparation (Stage I balancing, Stage II policy conditioning), the loss and its metrics.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

import datasets
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback, set_seed
from transformers.utils import logging

from ..data.collator import SafeVLMDataCollator
from ..data.examples import SafetyDataError, SafetyDataset, balance_for_stage1
from ..data.loading import safety_dataset_from_hf
from .conditioning import condition_on_policy
from .config import SafeVLMTrainingConfig
from .stages import (
    apply_stage2_lora,
    freeze_for_full_stage2,
    freeze_for_stage1,
    is_safety_parameter,
    llm_lora_config,
    unwrap_safevlm,
)


logger = logging.get_logger(__name__)

IGNORE_INDEX = -100

# Sums kept between two log calls: loss values are averaged over micro-batches, accuracies over rows.
_STAT_NAMES = ("lm_loss", "safety_loss", "loss_terms", "type_correct", "type_rows", "level_correct", "level_rows")


class SafeVLMTrainer(Trainer):
    """Trainer for the two SafeVLM stages.

    * **Stage I** (``args.stage=1``) trains the safety projector, both safety-token sets and the safety head; the
      vision tower, the original projector and the LLM (with ``lm_head``) are frozen. Loss:
      ``lm_loss + w * (CE(type) + CE(level))`` with ``w = args.safety_loss_weight`` (default: the model's
      ``config.safety_loss_weight``). The LM term reaches safety tokens set 1, which sit in the LLM's input.
    * **Stage II** (``args.stage=2``) trains the LLM with LoRA (``args.stage2_mode="lora"``, the default; adapters on
      the LLM's linear layers only) or fully (``"full"``); the safety modules and the LLM's input embeddings are
      frozen. Loss: ``lm_loss`` (the safety term, constant here, is logged).

    Both loss terms are normalized over the whole optimizer step (every gradient-accumulation micro-batch on every
    process), so a run on N processes takes the same steps as one process with the same global batch.

    Logged besides the Trainer's own values: ``lm_loss``, ``safety_loss``, ``safety_type_accuracy`` and
    ``safety_level_accuracy`` (the head's accuracy on the rows seen since the last log; ``eval_``-prefixed in
    evaluation).

    Args:
        model: a `SafeVLMForConditionalGeneration`, a path to one, or (Stage II) a PEFT model wrapping one.
        args: a :class:`SafeVLMTrainingConfig` (default: Stage I with default settings).
        data_collator: default :class:`SafeVLMDataCollator` over ``processing_class``.
        train_dataset / eval_dataset: a :class:`SafetyDataset` (balanced for Stage I when ``args.num_safe_samples``
            is set, conditioned on the safety policy for Stage II when ``args.stage2_conditioning``), a
            `datasets.Dataset` of the documented format, or any dataset whose items the collator accepts.
        processing_class: the model's :class:`SafeVLMProcessor` (saved with every checkpoint).
        peft_config: a `peft.LoraConfig` replacing the default Stage II LoRA (must target the LLM only).
    """

    _tag_names = ["safevlm", "safety"]

    def __init__(
        self,
        model: nn.Module | str,
        args: SafeVLMTrainingConfig | None = None,
        data_collator: Callable | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        peft_config: Any = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple = (None, None),
        **kwargs: Any,
    ):
        if args is None:
            args = SafeVLMTrainingConfig(output_dir="safevlm-stage1")
        elif not isinstance(args, SafeVLMTrainingConfig):
            raise TypeError(f"args must be a SafeVLMTrainingConfig, got {type(args).__name__}.")
        if isinstance(model, str):
            from ..modeling.modeling_safevlm import SafeVLMForConditionalGeneration
            from ..modeling.processing_safevlm import SafeVLMProcessor

            if processing_class is None:
                processing_class = SafeVLMProcessor.from_pretrained(model)
            model = SafeVLMForConditionalGeneration.from_pretrained(model)
        base = unwrap_safevlm(model)

        train_dataset = self._prepare_dataset(train_dataset, base, args, is_train=True)
        if isinstance(eval_dataset, dict):
            eval_dataset = {k: self._prepare_dataset(v, base, args, is_train=False) for k, v in eval_dataset.items()}
        else:
            eval_dataset = self._prepare_dataset(eval_dataset, base, args, is_train=False)

        model = self._prepare_model(model, args, peft_config)
        subcategories = base.config.safety_subcategories or None
        if args.label_names is None:
            # The targets the collator gives; the Trainer would otherwise expect every `*label*` forward argument.
            args.label_names = ["labels", "safety_type_labels", "safety_level_labels"]
            args.label_names += ["safety_subcategory_labels"] if subcategories else []
        if data_collator is None:
            if processing_class is None:
                raise ValueError("SafeVLMTrainer needs processing_class (the SafeVLMProcessor) or a data_collator.")
            data_collator = SafeVLMDataCollator(
                processing_class, max_length=args.max_length, subcategories=subcategories
            )

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            **kwargs,
        )
        self._stats = {"train": defaultdict(float), "eval": defaultdict(float)}
        self._step_counts: tuple[torch.Tensor, int] | None = None

    # ------------------------------------------------------------------------------------------------- preparation
    @staticmethod
    def _prepare_dataset(dataset: Any, base: nn.Module, args: SafeVLMTrainingConfig, is_train: bool) -> Any:
        if dataset is None:
            return None
        config = base.config
        if isinstance(dataset, datasets.Dataset):
            dataset = safety_dataset_from_hf(
                dataset, safety_types=config.safety_types, num_levels=len(config.safety_levels)
            )
        if not isinstance(dataset, SafetyDataset):
            if args.num_safe_samples is not None and is_train:
                raise ValueError(
                    "num_safe_samples balancing needs a SafetyDataset (or a datasets.Dataset) to train on."
                )
            return dataset
        for example in dataset.examples:  # the data may have been loaded for another label space
            if example.safe_type is not None and example.safe_type >= len(config.safety_types):
                raise SafetyDataError(
                    f"{example.location}: safe_type {example.safe_type} is out of range for this model's "
                    f"{len(config.safety_types)} safety_types {list(config.safety_types)}."
                )
            if example.safe_level >= len(config.safety_levels):
                raise SafetyDataError(
                    f"{example.location}: safe_level {example.safe_level} is out of range for this model's "
                    f"{len(config.safety_levels)} safety_levels."
                )
        if args.stage == 1 and is_train:
            dataset = balance_for_stage1(dataset, args.num_safe_samples, args.seed, config.safety_types)
        elif args.num_safe_samples is not None and is_train:
            logger.warning("num_safe_samples balances Stage I data only; Stage II trains on every row.")
        if args.stage == 2 and args.stage2_conditioning:
            dataset = condition_on_policy(
                dataset,
                base.safety_policy(),
                config.safety_types,
                config.safety_levels,
                args.safety_profile,
                response=args.stage2_response,
                subcategories=config.safety_subcategories,
            )
        return dataset

    @staticmethod
    def _prepare_model(model: nn.Module, args: SafeVLMTrainingConfig, peft_config: Any) -> nn.Module:
        is_peft = hasattr(model, "get_base_model")
        if args.stage == 1:
            if is_peft or peft_config is not None:
                raise ValueError(
                    "Stage I trains the safety modules of a plain SafeVLM model: merge any adapters first "
                    "(safevlm_hf.training.merge_stage2) and do not pass peft_config."
                )
            trainable = freeze_for_stage1(model)
        elif args.stage2_mode == "full":
            if is_peft or peft_config is not None:
                raise ValueError("stage2_mode='full' trains the LLM itself; use stage2_mode='lora' for adapters.")
            trainable = freeze_for_full_stage2(model)
        else:
            if is_peft:
                if peft_config is not None:
                    raise ValueError("The model already has adapters; do not pass peft_config as well.")
                for name, parameter in unwrap_safevlm(model).named_parameters():
                    if ".lora_" not in name:
                        parameter.requires_grad_(False)
            else:
                set_seed(args.seed)  # LoRA's random initialization must not depend on what ran before
                if peft_config is None:
                    peft_config = llm_lora_config(
                        model, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules
                    )
                model = apply_stage2_lora(model, peft_config)
            trainable = [n for n, p in model.named_parameters() if p.requires_grad]
            if any(is_safety_parameter(n.removeprefix("base_model.model.")) for n in trainable):
                raise ValueError("Stage II must not train the safety modules, but the adapters reach them.")
        if not trainable:
            raise ValueError(f"Stage {args.stage} found no parameter to train in {type(model).__name__}.")
        logger.info(f"Stage {args.stage}: training {len(trainable)} parameter tensors.")
        return model

    # -------------------------------------------------------------------------------------------------------- loss
    @property
    def safety_loss_weight(self) -> float:
        """The weight ``w`` of the safety term (0 in Stage II, whose trainable weights it cannot reach)."""
        if self.args.stage == 2:
            return 0.0
        if self.args.safety_loss_weight is not None:
            return float(self.args.safety_loss_weight)
        return float(unwrap_safevlm(self.accelerator.unwrap_model(self.model)).config.safety_loss_weight)

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """Collect the micro-batches of one optimizer step and count their targets (over every process).

        The Trainer counts LM tokens this way for ``num_items_in_batch``; the safety rows need the same count so
        that their loss is averaged over the whole step too rather than per micro-batch and per process.
        """
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        counts = torch.zeros(3, dtype=torch.long, device=device)
        for batch in batch_samples:
            if "labels" in batch:  # causal LM: position 0 is never a target
                counts[0] += (batch["labels"][..., 1:] != IGNORE_INDEX).sum().to(device)
            if "safety_type_labels" in batch:
                counts[1] += (batch["safety_type_labels"] != IGNORE_INDEX).sum().to(device)
            if "safety_level_labels" in batch:
                counts[2] += (batch["safety_level_labels"] != IGNORE_INDEX).sum().to(device)
        scale = 1
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            counts = self.accelerator.gather(counts[None]).sum(dim=0)
            # DDP averages gradients over processes; undo it so the step's loss is the global sum / global count.
            scale = self.accelerator.num_processes
        self._step_counts = (counts, scale)
        return batch_samples, num_items_in_batch

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """``lm_loss + w * (CE(type) + CE(level))`` from the model's outputs, with each term normalized over the step.

        When the Trainer passes ``num_items_in_batch`` (training with a model that accepts loss kwargs, which
        SafeVLM does), every term is a sum over this micro-batch divided by the count over the whole step (see
        :meth:`get_batch_samples`), and the Trainer does not divide by the accumulation steps again. Otherwise
        (evaluation) the terms are this batch's means.
        """
        mode = "train" if model.training else "eval"
        outputs = model(**inputs)
        zero = outputs.logits.new_zeros(())
        lm_mean = outputs.lm_loss if outputs.lm_loss is not None else zero
        safety_mean = outputs.safety_loss if outputs.safety_loss is not None else zero
        weight = self.safety_loss_weight

        labels = inputs.get("labels")
        type_labels, level_labels = inputs.get("safety_type_labels"), inputs.get("safety_level_labels")
        local_tokens = (labels[..., 1:] != IGNORE_INDEX).sum() if labels is not None else zero.long()
        if mode == "train" and num_items_in_batch is not None and self._step_counts is not None:
            counts, scale = self._step_counts
            counts = counts.to(lm_mean.device).clamp(min=1)
            lm_term = lm_mean * local_tokens / counts[0] if local_tokens > 0 else zero
            safety_term = zero
            if weight:
                # CE sums per head: the model's safety_loss is a per-batch mean of each head, not a sum.
                for logits, target, count in (
                    (outputs.safety_type_logits, type_labels, counts[1]),
                    (outputs.safety_level_logits, level_labels, counts[2]),
                ):
                    if target is not None and bool((target != IGNORE_INDEX).any()):
                        ce = F.cross_entropy(
                            logits.float(), target.to(logits.device), ignore_index=IGNORE_INDEX, reduction="sum"
                        )
                        safety_term = safety_term + ce / count
            loss = scale * (lm_term + weight * safety_term)
        else:
            loss = (lm_mean if local_tokens > 0 else zero) + weight * safety_mean
        self._record_stats(
            mode, lm_mean if local_tokens > 0 else None, safety_mean, outputs, type_labels, level_labels
        )
        return (loss, outputs) if return_outputs else loss

    # ----------------------------------------------------------------------------------------------------- logging
    @torch.no_grad()
    def _record_stats(self, mode, lm_mean, safety_mean, outputs, type_labels, level_labels) -> None:
        device = outputs.logits.device
        values = torch.zeros(len(_STAT_NAMES), dtype=torch.float64, device=device)
        if lm_mean is not None:
            values[0] = lm_mean.detach().double()
        values[1] = safety_mean.detach().double()
        values[2] = 1.0
        for offset, logits, target in (
            (3, outputs.safety_type_logits, type_labels),
            (5, outputs.safety_level_logits, level_labels),
        ):
            if logits is None or target is None:
                continue
            target = target.to(device)
            valid = target != IGNORE_INDEX
            values[offset] = (logits.argmax(-1).eq(target) & valid).sum()
            values[offset + 1] = valid.sum()
        if self.args.world_size > 1:
            values = self.accelerator.gather(values[None]).sum(dim=0)
        for name, value in zip(_STAT_NAMES, values.tolist()):
            self._stats[mode][name] += value

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        stats = self._stats[mode]
        metrics: dict[str, float] = {}
        if stats["loss_terms"]:
            metrics["lm_loss"] = stats["lm_loss"] / stats["loss_terms"]
            metrics["safety_loss"] = stats["safety_loss"] / stats["loss_terms"]
        if stats["type_rows"]:
            metrics["safety_type_accuracy"] = stats["type_correct"] / stats["type_rows"]
        if stats["level_rows"]:
            metrics["safety_level_accuracy"] = stats["level_correct"] / stats["level_rows"]
        if mode == "eval":
            metrics = {f"eval_{key}": value for key, value in metrics.items()}
        stats.clear()
        # In place: `evaluate()` returns the dict it logs, so the head accuracies reach its return value too.
        logs.update(metrics)
        super().log(logs, start_time)


__all__ = ["SafeVLMTrainer"]
