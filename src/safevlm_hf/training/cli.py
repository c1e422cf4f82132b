# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""``safevlm convert``, ``safevlm train`` and ``safevlm plan``: conversion, two-stage training and its memory plan.

:func:`register` adds the three subcommands to the ``safevlm`` console script's subparsers (each sets ``func`` to its
runner, which returns an exit code). Launchers run the console script as a module, e.g.
``torchrun --nproc_per_node 2 -m safevlm_hf.cli train ...`` or
``accelerate launch --multi_gpu --num_processes 2 -m safevlm_hf.cli train ...`` (on a machine without GPUs
both start CPU processes that talk over gloo; note that ``accelerate launch --cpu`` starts multi-process CPU runs only
through MPI, and without ``--multi_gpu`` a GPU-less machine gets a single process).

Exit codes: 0 success, 2 bad input (data, model folder or options; the message says which and what to do).
"""

from __future__ import annotations

import argparse
import json
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError
from transformers.utils import logging

from ..checkpoints import CheckpointFileError, check_safetensors_files
from ..cli_support import EXIT_OK, fail
from ..prompting import is_safevlm_config


if TYPE_CHECKING:
    from .recipes import TrainingRecipe


logger = logging.get_logger(__name__)


def _checked_weights(model: str) -> str:
    """`model`, after checking that every safetensors file of a local folder is readable (the error names the file)."""
    check_safetensors_files(model)
    return model


def _safevlm_classes(model_type: str) -> tuple[type, type] | None:
    """(model class, processor class) of the SafeVLM family for a base (``llava``, ``llava_next``) or SafeVLM
    (``safevlm``, ``safevlm_next``) ``model_type``; ``None`` for any other."""
    from ..modeling.modeling_safevlm import SafeVLMForConditionalGeneration, SafeVLMNextForConditionalGeneration
    from ..modeling.processing_safevlm import SafeVLMNextProcessor, SafeVLMProcessor

    families = {
        ("llava", "safevlm"): (SafeVLMForConditionalGeneration, SafeVLMProcessor),
        ("llava_next", "safevlm_next"): (SafeVLMNextForConditionalGeneration, SafeVLMNextProcessor),
    }
    return next((classes for types, classes in families.items() if model_type in types), None)


# --------------------------------------------------------------------------------------------------------- convert
def _add_convert_parser(subparsers) -> None:
    # argparse option blocks repeat in shape across sub-commands, not in content: each documents its own options.
    parser = subparsers.add_parser(
        "convert",
        help="Convert a LLaVA or LLaVA-NeXT checkpoint folder into a SafeVLM checkpoint (fresh safety modules).",
        description=(
            "Turn a LLaVA-1.5 or LLaVA-NeXT checkpoint (the model + its processor) into a SafeVLM checkpoint of the "
            "same family: every base weight is copied unchanged and the safety modules are newly initialized, ready "
            "for Stage I."
        ),
    )
    parser.add_argument(
        "--model", required=True, help="LLaVA or LLaVA-NeXT checkpoint folder (or a Hub id already cached)."
    )
    parser.add_argument("--out", required=True, help="Folder to write the SafeVLM checkpoint to.")
    parser.add_argument(
        "--num-safety-tokens", type=int, default=64, help="Size of each safety-token set (default: 64)."
    )
    parser.add_argument(
        "--safety-feature-layer",
        type=int,
        default=None,
        help="Vision-encoder layer the safety projector reads (default: the LLaVA vision_feature_layer).",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="Seed of the safety modules' initialization: one seed gives one model (default: a drawn seed, printed).",
    )
    parser.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    """Convert ``args.model`` (LLaVA-1.5 or LLaVA-NeXT) into a SafeVLM checkpoint in ``args.out``; returns an exit
    code."""
    from transformers import AutoConfig

    if args.num_safety_tokens < 1:
        return fail("convert", f"--num-safety-tokens must be >= 1, got {args.num_safety_tokens}.")
    try:
        config = AutoConfig.from_pretrained(args.model)
    except (OSError, ValueError, RecursionError) as err:
        return fail("convert", f"cannot read a model config from {args.model!r}: {err}")
    if is_safevlm_config(config):
        return fail("convert", f"{args.model} is already a SafeVLM checkpoint; train it with `safevlm train`.")
    classes = _safevlm_classes(config.model_type)
    if classes is None:
        return fail(
            "convert",
            f"{args.model} is a {config.model_type!r} model; `safevlm convert` takes a LLaVA (llava) or LLaVA-NeXT "
            "(llava_next) checkpoint.",
        )
    model_class, processor_class = classes
    overrides = {"num_safety_tokens": args.num_safety_tokens}
    if args.safety_feature_layer is not None:
        overrides["safety_feature_layer"] = args.safety_feature_layer
    try:
        processor = processor_class.from_llava_processor(args.model, num_safety_tokens=args.num_safety_tokens)
    except (OSError, ValueError) as err:
        return fail(
            "convert", f"cannot load the LLaVA processor (tokenizer + image processor) from {args.model!r}: {err}"
        )
    if args.seed is not None and not 0 <= args.seed < 2**32:
        return fail("convert", f"--seed must be in 0..{2**32 - 1}, got {args.seed}.")
    # Always seeded: the initial head decides the untrained model's verdicts, so a run must be reproducible.
    seed = args.seed if args.seed is not None else secrets.randbelow(2**32)
    if args.seed is None:
        print(f"Initializing the safety modules with seed {seed} (pass --seed {seed} to reproduce this conversion).")
    try:
        model = model_class.from_llava(_checked_weights(args.model), seed=seed, **overrides)
    except (CheckpointFileError, SafetensorError) as err:
        return fail("convert", f"cannot load the LLaVA weights from {args.model!r}: {err}")
    out = Path(args.out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    print(f"Converted {args.model} to SafeVLM ({args.num_safety_tokens} safety tokens per set, seed {seed}): {out}")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------------------- train
# `safevlm train` options that set a SafeVLMTrainingConfig field: option dest -> (field, built-in default). The
# options default to None so that a recipe's value survives unless the user gives the flag; precedence is
# built-in default < --recipe < flags < --set.
_TRAIN_FLAGS: dict[str, tuple[str, object]] = {
    "epochs": ("num_train_epochs", 1.0),
    "max_steps": ("max_steps", -1),
    "batch_size": ("per_device_train_batch_size", 8),
    "grad_accum": ("gradient_accumulation_steps", 1),
    "lr": ("learning_rate", 1e-4),
    "seed": ("seed", 42),
    "save_steps": ("save_steps", 500),
    "logging_steps": ("logging_steps", 10),
    "stage2_mode": ("stage2_mode", "lora"),
    "lora_r": ("lora_r", 16),
    "lora_alpha": ("lora_alpha", 32),
    "lora_dropout": ("lora_dropout", 0.05),
    "lora_target_modules": ("lora_target_modules", None),
    "safety_profile": ("safety_profile", None),
    "stage2_response": ("stage2_response", None),
    "num_safe_samples": ("num_safe_samples", None),
    "safety_loss_weight": ("safety_loss_weight", None),
    "max_length": ("max_length", None),
    "gradient_checkpointing": ("activation_checkpointing", None),
    "bf16": ("bf16", None),
}


def _add_train_parser(subparsers) -> None:
    # argparse option blocks repeat in shape across sub-commands, not in content: each documents its own options.
    parser = subparsers.add_parser(
        "train",
        help="Train a SafeVLM checkpoint: --stage 1 (safety modules) or --stage 2 (LLM).",
        description=(
            "Stage 1 trains the safety projector, safety tokens and safety head (the rest frozen); stage 2 trains "
            "the LLM (LoRA by default, merged into a plain SafeVLM checkpoint) with the safety modules frozen, on "
            "data whose answers follow the safety policy. Runs unchanged under torchrun / accelerate launch "
            "(DeepSpeed ZeRO / FSDP configs: examples/accelerate/). --recipe NAME sets a published recipe's "
            "hyperparameters; explicit flags override it."
        ),
    )
    parser.add_argument(
        "--recipe",
        nargs="?",
        const="",
        default=None,
        metavar="NAME|FILE",
        help="Training recipe: a shipped name (e.g. psa-vlm) or a .yaml/.json file; without a value, list them.",
    )
    parser.add_argument("--list-recipes", action="store_true", help="List the shipped recipes and exit.")
    parser.add_argument("--stage", type=int, choices=(1, 2), help="1: safety modules; 2: the LLM (required).")
    parser.add_argument("--model", help="SafeVLM checkpoint folder (see `safevlm convert`; required).")
    parser.add_argument(
        "--data", help="Training data: a .jsonl/.json file of the documented format, or vlguard:PATH (required)."
    )
    parser.add_argument("--out", help="Output folder: checkpoint-N folders and the final model (required).")
    parser.add_argument(
        "--eval-data", default=None, help="Held-out data (same forms as --data), evaluated at the end."
    )
    parser.add_argument(
        "--image-root", default=None, help="Folder of relative image paths (default: the data file's)."
    )
    parser.add_argument(
        "--skip-bad-rows",
        action="store_true",
        help="Skip, count and report bad rows instead of stopping at the first.",
    )
    parser.add_argument(
        "--num-safe-samples", type=int, default=None, help="Stage 1 balancing: all risky rows + N sampled safe rows."
    )
    parser.add_argument(
        "--stage2-mode", choices=("lora", "full"), default=None, help="Stage 2: LoRA (default) or full."
    )
    parser.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default: 16).")
    parser.add_argument("--lora-alpha", type=int, default=None, help="LoRA alpha (default: 32).")
    parser.add_argument("--lora-dropout", type=float, default=None, help="LoRA dropout (default: 0.05).")
    parser.add_argument("--lora-target-modules", nargs="+", default=None, help="LLM linear layers (default: all).")
    parser.add_argument(
        "--no-conditioning",
        action="store_true",
        help="Stage 2: train on the data's answers as they are, not rewritten to follow the safety policy.",
    )
    parser.add_argument("--safety-profile", default=None, help="Policy profile for the stage 2 conditioning.")
    parser.add_argument(
        "--stage2-response",
        choices=["template", "guided"],
        default=None,
        help="Stage 2 conditioning for template responses (the gate forces the policy's text) or guided ones (the "
        "policy's hint in context, the model writes its reason or careful answer). Default: the policy's.",
    )
    parser.add_argument(
        "--no-merge", action="store_true", help="Stage 2 LoRA: save the adapter only, do not merge it into the model."
    )
    parser.add_argument("--safety-loss-weight", type=float, default=None, help="Default: the model's config value.")
    parser.add_argument("--epochs", type=float, default=None, help="Training epochs (default: 1).")
    parser.add_argument(
        "--max-steps", type=int, default=None, help="Stop after this many optimizer steps (-1: epochs)."
    )
    parser.add_argument("--batch-size", type=int, default=None, help="Per-process batch size (default: 8).")
    parser.add_argument("--grad-accum", type=int, default=None, help="Gradient accumulation steps (default: 1).")
    parser.add_argument("--lr", type=float, default=None, help="Peak learning rate (default: 1e-4).")
    parser.add_argument("--seed", type=int, default=None, help="Seed (default: 42).")
    parser.add_argument("--max-length", type=int, default=None, help="Reject rows longer than this many tokens.")
    parser.add_argument("--save-steps", type=int, default=None, help="Save a checkpoint every N steps (default: 500).")
    parser.add_argument("--logging-steps", type=int, default=None, help="Log every N steps (default: 10).")
    parser.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Recompute each decoder layer's activations in the backward pass instead of storing them (less memory, "
        "about a third more compute; the loss is unchanged).",
    )
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 mixed precision (needs a GPU with bf16, or --set use_cpu=True).",
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="Dtype the weights load in (default: the checkpoint's, fp16 for llava-hf). DeepSpeed with bf16 keeps fp32 "
        "master weights itself; without DeepSpeed, --bf16 autocasts, and the trained weights stay in this dtype, so "
        "use float32 there.",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        help="Resume from a checkpoint folder, or (no value) from the last checkpoint in --out.",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Any other SafeVLMTrainingConfig / TrainingArguments field, e.g. --set warmup_steps=10 (repeatable).",
    )
    parser.set_defaults(func=run_train)


def training_settings(args: argparse.Namespace, recipe: TrainingRecipe | None = None) -> dict[str, object]:
    """The `SafeVLMTrainingConfig` field settings of ``safevlm train`` options: built-in defaults, then the recipe's
    stage block, then the flags the user gave, then ``--set KEY=VALUE`` (values still untyped).

    ``recipe`` is ``args.recipe`` when the caller has loaded it already (default: loaded here).
    """
    from .recipes import load_recipe

    settings: dict[str, object] = {field: default for field, default in _TRAIN_FLAGS.values()}
    if args.recipe:
        settings.update((recipe or load_recipe(args.recipe)).settings(args.stage))
    for dest, (field, _) in _TRAIN_FLAGS.items():
        value = getattr(args, dest, None)  # `safevlm plan` has only some of the options
        if value is not None:
            settings[field] = value
    if getattr(args, "no_conditioning", False):
        settings["stage2_conditioning"] = False
    settings["per_device_eval_batch_size"] = settings["per_device_train_batch_size"]
    for item in getattr(args, "overrides", []):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}.")
        settings[key.strip()] = value
    settings["stage"] = args.stage
    if getattr(args, "out", None) is not None:
        settings["output_dir"] = str(args.out)
    return settings


def build_training_config(args: argparse.Namespace):
    """The :class:`SafeVLMTrainingConfig` for ``safevlm train`` options (see :func:`training_settings`)."""
    from .recipes import build_training_config as from_settings

    origin = f"recipe {args.recipe} with the command-line options" if args.recipe else "the command-line options"
    return from_settings(training_settings(args), origin=origin)


def _print_recipes() -> int:
    from .recipes import list_recipes

    for recipe in list_recipes():
        print(f"{recipe.name}: {recipe.description}")
        if recipe.source:
            print(f"  source: {recipe.source}")
        if recipe.launch:
            print("  launch: " + ", ".join(f"{key}={value}" for key, value in recipe.launch.items()))
        for stage, settings in recipe.stages.items():
            print(f"  stage {stage}: " + " ".join(f"{key}={value}" for key, value in settings.items()))
        print(f"  file: {recipe.path} (copy, edit, then pass its path to --recipe)")
    return EXIT_OK


def _report_skipped(dataset, label: str) -> None:
    if dataset.skipped_rows:
        print(f"{label}: skipped {len(dataset.skipped_rows)} bad row(s):")
        for row in dataset.skipped_rows:
            print(f"  {row}")


def run_train(args: argparse.Namespace) -> int:
    """Run ``safevlm train``; returns an exit code."""
    import torch
    from transformers import AutoConfig

    from ..data import SafetyDataError, load_safety_dataset
    from ..modeling.policy_safevlm import SafetyPolicyError
    from .stages import merge_stage2, unwrap_safevlm
    from .trainer import SafeVLMTrainer

    if args.list_recipes or args.recipe == "":
        return _print_recipes()
    missing = [f"--{name}" for name in ("stage", "model", "data", "out") if getattr(args, name) is None]
    if missing:
        return fail("train", f"needs {', '.join(missing)}.")
    try:
        config = build_training_config(args)
    except ValueError as err:  # RecipeError included: it names the recipe file and the key
        return fail("train", f"bad training options: {err}")
    try:
        model_config = AutoConfig.from_pretrained(args.model)
    except (OSError, ValueError, RecursionError) as err:
        return fail("train", f"cannot read a model config from {args.model!r}: {err}")
    if not is_safevlm_config(model_config):
        return fail(
            "train",
            f"{args.model} is a {model_config.model_type!r} checkpoint, not SafeVLM; convert it first (LLaVA or "
            f"LLaVA-NeXT): safevlm convert --model {args.model} --out SAFEVLM_DIR",
        )
    model_class, processor_class = _safevlm_classes(model_config.model_type)
    try:
        processor = processor_class.from_pretrained(args.model)
    except (OSError, ValueError) as err:
        return fail(
            "train", f"cannot load the SafeVLM processor (tokenizer + image processor) from {args.model!r}: {err}"
        )
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    try:
        model = model_class.from_pretrained(_checked_weights(args.model), dtype=dtype)
    except (CheckpointFileError, SafetensorError) as err:
        return fail("train", f"cannot load the SafeVLM weights from {args.model!r}: {err}")

    data_options = dict(
        image_root=args.image_root,
        skip_bad_rows=args.skip_bad_rows,
        safety_types=model.config.safety_types,
        num_levels=len(model.config.safety_levels),
    )
    try:
        train_data = load_safety_dataset(args.data, **data_options)
        eval_data = load_safety_dataset(args.eval_data, **data_options) if args.eval_data else None
        trainer = SafeVLMTrainer(
            model, args=config, train_dataset=train_data, eval_dataset=eval_data, processing_class=processor
        )
    except (SafetyDataError, SafetyPolicyError) as err:
        return fail("train", str(err))
    main = trainer.is_world_process_zero()
    if main:
        _report_skipped(train_data, args.data)
        if eval_data is not None:
            _report_skipped(eval_data, args.eval_data)
        print(f"Stage {args.stage}: {len(trainer.train_dataset)} training rows from {args.data}")

    try:
        result = trainer.train(resume_from_checkpoint=args.resume)
    except SafetyDataError as err:  # an image that became unreadable after loading, a row over --max-length
        return fail("train", str(err))
    metrics = dict(result.metrics)
    if args.recipe:
        trainer.stage_record["recipe"] = args.recipe
    if eval_data is not None:
        metrics.update(trainer.evaluate())  # also added to the stage's record in the model config

    # The exported folder is what `save_pretrained` writes (weights, config, remote code, processor), without the
    # Trainer's pickled training_args.bin; the checkpoint-N folders keep everything `--resume` needs. Every process
    # takes part in gathering the weights (DeepSpeed ZeRO-3 and FSDP shard them; the local copy holds empty
    # placeholders), and the main process writes them.
    out = Path(args.out)
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # the DeepSpeed engine, FSDP or DDP module
    export = trainer.accelerator.unwrap_model(trainer.model)
    saved = out / "adapter" if args.stage == 2 and config.stage2_mode == "lora" and args.no_merge else out
    if main and args.stage == 2 and config.stage2_mode == "lora":
        export.save_pretrained(out / "adapter", state_dict=state_dict)
        processor.save_pretrained(out / "adapter")
        if not args.no_merge:
            # Merged from the saved files, so that the same code serves sharded and unsharded runs. Training is over:
            # the base must load whole on this process, not partitioned by DeepSpeed ZeRO-3 (whose zero.Init would
            # wait for the other processes, which are not loading).
            from peft import PeftModel
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
            base = model_class.from_pretrained(args.model)
            merged = merge_stage2(PeftModel.from_pretrained(base, out / "adapter"))
            # The base was reloaded from --model: carry over the stages recorded by this run's trainer.
            merged.config.safety_training_stages = unwrap_safevlm(export).config.safety_training_stages
            merged.save_pretrained(out)
            processor.save_pretrained(out)
    elif main:
        export.save_pretrained(out, state_dict=state_dict)
        processor.save_pretrained(out)
    trainer.accelerator.wait_for_everyone()
    if main:
        print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}, indent=2))
        print(f"Saved the stage {args.stage} model to {saved}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------------------ plan
# `--engine` -> the sharding a plan row is computed for; a recipe's launch config picks the default.
_ENGINES = {"ddp": "none", "zero2": "zero2", "zero3": "zero3/fsdp", "fsdp": "zero3/fsdp"}
_LAUNCH_ENGINES = {"deepspeed_zero2.yaml": "zero2", "deepspeed_zero3.yaml": "zero3", "fsdp.yaml": "fsdp"}


def _add_plan_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="GPU memory per stage (parameters, gradients, optimizer, activations), computed without weights.",
        description=(
            "Build the model on the meta device (no weight is loaded or downloaded) and print the memory each GPU "
            "needs for a training stage, with and without bf16, gradient checkpointing, ZeRO-2 and ZeRO-3/FSDP "
            "sharding (and, for stage 2, LoRA vs the full LLM). The recipe's (or the options') configuration is "
            "marked. See safevlm_hf/training/plan.py for what is counted."
        ),
    )
    parser.add_argument(
        "--model", required=True, help="Model folder (LLaVA or SafeVLM config.json), or llava-1.5-7b / llava-1.5-13b."
    )
    parser.add_argument("--stage", type=int, choices=(1, 2), required=True, help="1: safety modules; 2: the LLM.")
    parser.add_argument("--recipe", default=None, metavar="NAME|FILE", help="Training recipe (e.g. psa-vlm).")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs that share the work (default: 1).")
    parser.add_argument("--engine", choices=tuple(_ENGINES), default=None, help="Sharding of the marked row.")
    parser.add_argument("--batch-size", type=int, default=None, help="Micro-batch per GPU (default: recipe, or 8).")
    parser.add_argument("--seq-len", type=int, default=None, help="Tokens per row (default: image + safety + text).")
    parser.add_argument("--text-tokens", type=int, default=512, help="Text tokens per row (default: 512).")
    parser.add_argument(
        "--stage2-mode", choices=("lora", "full"), default=None, help="Stage 2 mode of the marked row."
    )
    parser.add_argument("--lora-r", type=int, default=None)
    parser.add_argument("--lora-alpha", type=int, default=None)
    parser.add_argument("--lora-dropout", type=float, default=None)
    parser.add_argument("--lora-target-modules", nargs="+", default=None)
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None)
    parser.set_defaults(func=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    """Run ``safevlm plan``; returns an exit code."""
    from .plan import plan_training
    from .recipes import load_recipe

    try:
        recipe = load_recipe(args.recipe) if args.recipe else None  # read once: its settings and its launch block
        settings = training_settings(args, recipe)
        engine = args.engine
        if engine is None and recipe is not None:
            engine = _LAUNCH_ENGINES.get(str(recipe.launch.get("accelerate_config")))
        chosen = {
            "precision": "bf16" if settings["bf16"] else "fp32",
            "gradient_checkpointing": bool(settings["activation_checkpointing"]),
            "sharding": _ENGINES[engine or "ddp"],
        }
        if args.stage == 2:
            chosen["mode"] = settings["stage2_mode"]
        plan = plan_training(
            args.model,
            args.stage,
            gpus=args.gpus,
            micro_batch=int(settings["per_device_train_batch_size"]),
            seq_len=args.seq_len,
            text_tokens=args.text_tokens,
            lora_r=int(settings["lora_r"]),
            lora_alpha=int(settings["lora_alpha"]),
            lora_dropout=float(settings["lora_dropout"]),
            lora_target_modules=settings["lora_target_modules"],
            chosen=chosen,
        )
    except (OSError, ValueError) as err:  # RecipeError included
        return fail("plan", str(err))
    print(plan.table())
    return EXIT_OK


# -------------------------------------------------------------------------------------------------------- wiring
def register(subparsers) -> None:
    """Add the ``convert``, ``train`` and ``plan`` subcommands to an `argparse` subparsers object (each sets
    ``func``)."""
    _add_convert_parser(subparsers)
    _add_train_parser(subparsers)
    _add_plan_parser(subparsers)
