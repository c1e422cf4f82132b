# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""`SafeVLMTrainer`: the two-stage SafeVLM recipe on `transformers.Trainer`.

Checkpoints, ``resume_from_checkpoint``, logging, progress bars and multi-process launch (``torchrun`` /
``accelerate launch``) are the Trainer's own; this class adds what the recipe needs: which weights each stage trains
(:mod:`.stages`), data preparation (Stage I balancing, Stage II policy conditioning), the step counts the model's loss
is normalized by, the logged loss parts and head accuracies, and the record of the stage in the model's config.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable

import datasets
import torch
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
    published_data_name,
    record_training_stage,
    unwrap_safevlm,
)


logger = logging.get_logger(__name__)

IGNORE_INDEX = -100

# The model's safety targets, in the order of its `safety_num_items_in_batch` counts (type, level, sub-category).
SAFETY_LABEL_NAMES = ("safety_type_labels", "safety_level_labels", "safety_subcategory_labels")

# Sums kept between two log calls (over processes): loss parts are averaged over their terms (`loss_terms`, kept
# apart), accuracies over rows; `safety_batches` says whether any batch had a safety term to log.
_STAT_NAMES = ("lm_loss", "safety_loss", "safety_batches", "type_correct", "type_rows", "level_correct", "level_rows")


# Logged values kept in the stage record (the last logged ones).
_RECORDED_LOG_KEYS = ("loss", "lm_loss", "safety_loss", "safety_type_accuracy", "safety_level_accuracy")


def _recordable(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics as config.json can hold them: rounded numbers, a non-finite value as its name ("nan")."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, float):
            out[key] = round(value, 6) if math.isfinite(value) else str(value)
        elif isinstance(value, (int, str, bool)) or value is None:
            out[key] = value
    return out


class SafeVLMTrainer(Trainer):
    """Trainer for the two SafeVLM stages.

    * **Stage I** (``args.stage=1``) trains the safety projector, both safety-token sets and the safety head; the
      vision tower, the original projector and the LLM (with ``lm_head``) are frozen. Loss: the model's own,
      ``lm_loss + w * (CE(type) + CE(level))`` with ``w = config.safety_loss_weight`` (``args.safety_loss_weight``,
      when given, sets it once here, so the saved config records the weight that trained it). The LM term reaches
      safety tokens set 1, which sit in the LLM's input.
    * **Stage II** (``args.stage=2``) trains the LLM with LoRA (``args.stage2_mode="lora"``, the default; adapters on
      the LLM's linear layers only) or fully (``"full"``); the safety modules and the LLM's input embeddings are
      frozen. Loss: ``lm_loss`` (no safety labels reach the model and the safety head does not run).

    The model computes the loss (this class only passes it the step's counts): every term is normalized over the
    whole optimizer step (every gradient-accumulation micro-batch on every process), so a run on N processes takes
    the same steps as one process with the same global batch.

    At the end of :meth:`train` the stage is appended to the model's ``config.safety_training_stages`` (stage, data,
    rows, steps, metrics, ...), which the model card shows; ``trainer.stage_record`` is that entry (``None`` before).

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

        if args.label_smoothing_factor or kwargs.get("compute_loss_func") is not None:
            raise ValueError(
                "SafeVLMTrainer uses the model's own loss (lm_loss + safety_loss_weight * safety_loss); "
                "label_smoothing_factor and compute_loss_func would replace it with an LM-only loss. Leave them unset."
            )
        if args.safety_loss_weight is not None:
            if args.stage == 1:
                base.config.safety_loss_weight = float(args.safety_loss_weight)  # the one owner of the weight
            else:
                logger.warning("safety_loss_weight has no effect in Stage II, which trains on lm_loss alone.")
        model = self._prepare_model(model, args, peft_config)
        subcategories = base.config.safety_subcategories or None
        if args.label_names is None:
            # The targets the collator gives; the Trainer would otherwise expect every `*label*` forward argument.
            # Stage II trains on the LM targets only (see `compute_loss`).
            safety_labels = ["safety_type_labels", "safety_level_labels"]
            safety_labels += ["safety_subcategory_labels"] if subcategories else []
            args.label_names = ["labels"] if args.stage == 2 else ["labels", *safety_labels]
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
        self.stage_record: dict[str, Any] | None = None  # this trainer's entry in config.safety_training_stages
        self._safety_num_items: torch.Tensor | None = None  # this optimizer step's safety rows (Stage I)
        self._step_normalized = False  # whether the Trainer normalizes this step's loss over the step

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

    # ------------------------------------------------------------------------------------------------ the record
    def train(self, *args: Any, **kwargs: Any):
        """`Trainer.train`, then the stage is appended to the model's ``config.safety_training_stages`` (see
        :func:`~safevlm_hf.training.record_training_stage`): the model card and any later run read what trained
        this checkpoint. An :meth:`evaluate` after training adds its metrics to that record."""
        result = super().train(*args, **kwargs)
        self.stage_record = record_training_stage(self.model, self._stage_entry(result.metrics))
        return result

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        metrics = super().evaluate(*args, **kwargs)
        if self.stage_record is not None:  # held-out metrics of the model this trainer finished
            self.stage_record["metrics"].update(_recordable(metrics))
        return metrics

    def _stage_entry(self, train_metrics: dict[str, float]) -> dict[str, Any]:
        args, state = self.args, self.state
        metrics = {k: v for k, v in train_metrics.items() if k in ("train_loss", "train_runtime")}
        logged = [entry for entry in state.log_history if "loss" in entry]
        if logged:  # the last logged values of the loss parts and the head's accuracies
            metrics.update({k: v for k, v in logged[-1].items() if k in _RECORDED_LOG_KEYS})
        dataset = self.train_dataset
        entry: dict[str, Any] = {
            "stage": args.stage,
            "data": published_data_name(getattr(dataset, "name", None) or type(dataset).__name__),
            "rows": len(dataset) if hasattr(dataset, "__len__") else None,
            "steps": state.global_step,
            "epochs": round(float(state.epoch or 0.0), 4),
            "global_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
            "learning_rate": args.learning_rate,
            "seed": args.seed,
        }
        if args.stage == 1:
            entry["safety_loss_weight"] = unwrap_safevlm(self.model).config.safety_loss_weight
            entry["num_safe_samples"] = args.num_safe_samples
        else:
            entry["mode"] = args.stage2_mode
            entry["conditioning"] = args.stage2_conditioning
            entry["safety_profile"] = args.safety_profile
            if args.stage2_mode == "lora":
                entry["lora"] = {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout}
        entry["metrics"] = _recordable(metrics)
        return entry

    # -------------------------------------------------------------------------------------------------------- loss
    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """Collect the micro-batches of one optimizer step and count their safety targets (over every process).

        The Trainer counts LM tokens this way for ``num_items_in_batch``; the safety rows need the same count, passed
        to the model as ``safety_num_items_in_batch``, so that the safety terms are averaged over the whole step too
        rather than per micro-batch and per process. Counted only when the Trainer passes ``num_items_in_batch`` (the
        loss is then normalized over the step and not divided by the accumulation steps again).
        """
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._safety_num_items, self._step_normalized = None, False
        if num_items_in_batch is None or not self.model_accepts_loss_kwargs:
            return batch_samples, num_items_in_batch
        across_devices = self.args.average_tokens_across_devices and self.args.world_size > 1
        if self.args.stage == 1:
            counts = torch.zeros(len(SAFETY_LABEL_NAMES), dtype=torch.long, device=device)
            for batch in batch_samples:
                for index, name in enumerate(SAFETY_LABEL_NAMES):
                    if batch.get(name) is not None:
                        counts[index] += (batch[name] != IGNORE_INDEX).sum().to(device)
            if across_devices:
                counts = self.accelerator.gather(counts[None]).sum(dim=0)
            self._safety_num_items = counts
        # The logged loss parts of this step are sums over its micro-batches (and processes, see `_record_stats`):
        # one step mean when normalized over every process, one per process otherwise.
        self._stats["train"]["loss_terms"] += 1 if across_devices else self.args.world_size
        self._step_normalized = True
        return batch_samples, num_items_in_batch

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """The model's own loss (``outputs.loss``, see `SafeVLMForConditionalGeneration.forward`), with its parts
        recorded for logging.

        Stage I passes the step's safety-row counts (:meth:`get_batch_samples`) with the Trainer's
        ``num_items_in_batch``, so every term is a sum over this micro-batch divided by the count over the whole step.
        Stage II passes no safety labels and skips the safety head: its modules are frozen, so the term could train
        nothing. Evaluation gives each term as this batch's mean.
        """
        mode = "train" if model.training else "eval"
        inputs = dict(inputs)
        if self.args.stage == 2:
            for name in SAFETY_LABEL_NAMES:
                inputs.pop(name, None)
            inputs["compute_safety"] = False
        normalized = mode == "train" and num_items_in_batch is not None and self._step_normalized
        if normalized and self._safety_num_items is not None:
            inputs["safety_num_items_in_batch"] = self._safety_num_items
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        self._record_stats(mode, outputs, inputs, normalized)
        return (loss, outputs) if return_outputs else loss

    # ----------------------------------------------------------------------------------------------------- logging
    @torch.no_grad()
    def _record_stats(self, mode: str, outputs: Any, inputs: dict[str, Any], normalized: bool) -> None:
        """Add this micro-batch's loss parts and head hits to the sums kept until the next log (summed over
        processes). A step-normalized part is this micro-batch's share of the step mean, so the step's shares add up
        to it; a batch mean counts as one term (on each process)."""
        device = outputs.logits.device
        values = torch.zeros(len(_STAT_NAMES), dtype=torch.float64, device=device)
        if outputs.lm_loss is not None:
            values[0] = outputs.lm_loss.detach().double()
        if outputs.safety_loss is not None:
            values[1] = outputs.safety_loss.detach().double()
            values[2] = 1.0
        for offset, logits, name in (
            (3, outputs.safety_type_logits, "safety_type_labels"),
            (5, outputs.safety_level_logits, "safety_level_labels"),
        ):
            target = inputs.get(name)
            if logits is None or target is None:
                continue
            target = target.to(device)
            valid = target != IGNORE_INDEX
            values[offset] = (logits.argmax(-1).eq(target) & valid).sum()
            values[offset + 1] = valid.sum()
        if self.args.world_size > 1:
            values = self.accelerator.gather(values[None]).sum(dim=0)
        stats = self._stats[mode]
        for name, value in zip(_STAT_NAMES, values.tolist()):
            stats[name] += value
        if not normalized:
            stats["loss_terms"] += self.args.world_size

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        stats = self._stats[mode]
        metrics: dict[str, float] = {}
        if stats["loss_terms"]:
            metrics["lm_loss"] = stats["lm_loss"] / stats["loss_terms"]
            if stats["safety_batches"]:
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
