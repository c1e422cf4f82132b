# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""`safevlm icet` (per-layer vulnerability scan) and `safevlm lppo` (Layer-wise PPO training).

Examples::

    safevlm icet --model ./llava --bench figstep:SafeBench.csv --layers all --judge string --out icet/
    safevlm icet --model ./my-safevlm --bench vlguard:test.json --layers 1-12 --out icet/ --compare-gating
    safevlm icet --model llava15=./llava --model next=./llava-next --model llama32=./mllama --bench ... --out grid/
    safevlm icet --model before=./llava --model after=lppo/final --bench ... --out grid/    # L-PPO before/after
    safevlm lppo --model ./llava --prompts prompts.jsonl --layer 8 --reward refusal --out lppo/
    accelerate launch --multi_gpu --num_processes 4 -m safevlm_hf.cli lppo ... --batch-size 16  # data-parallel

:func:`register` adds both sub-commands to a parent parser; :func:`run_icet` and :func:`run_lppo` execute them and
return the exit code (0 on success, 2 on bad input: an unreadable prompt file, a layer outside the encoder, ...).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from ..cli_support import fail


def register(subparsers: Any) -> None:
    """Add the `icet` and `lppo` sub-commands to `subparsers` (from `ArgumentParser.add_subparsers()`)."""
    _register_icet(subparsers)
    _register_lppo(subparsers)


def _add_prompt_source(parser: argparse.ArgumentParser, required_help: str) -> None:
    # argparse option blocks repeat in shape across sub-commands, not in content: each documents its own options.
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--bench",
        action="append",
        metavar="SPEC",
        help="Benchmark spec, repeatable: figstep:PATH[:text], xstest:PATH, vlguard:PATH[:subset], "
        "mmsafetybench:DIR[:SD|TYPO|SD_TYPO].",
    )
    source.add_argument("--prompts", metavar="FILE", help=required_help)
    parser.add_argument("--limit", type=int, default=None, help="Keep the first N items of each benchmark.")
    parser.add_argument("--image-root", default=None, help="Folder of benchmark images (VLGuard, MM-SafetyBench).")


def _add_runtime(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (default: CUDA if available), cpu, cuda, cuda:1, ...")
    dtypes = ["auto", "float32", "bfloat16", "float16"]
    parser.add_argument("--dtype", default="auto", choices=dtypes, help="Weights dtype (default: auto).")
    parser.add_argument("--seed", type=int, default=0, help="Seed (default: 0).")
    parser.add_argument("--no-progress", action="store_true", help="Hide progress bars.")


def _register_icet(subparsers: Any) -> None:
    # argparse option blocks repeat in shape across sub-commands, not in content: each documents its own options.
    parser = subparsers.add_parser(
        "icet",
        help="Scan which vision-encoder layers make the model unsafe (ICET early exit); one model or a grid of them.",
        description=(
            "For each chosen vision layer l, generate with the LLM reading layer-l image states (same projection), "
            "judge the answers and report attack success (from a harm judge; a refusal-only judge such as the default "
            "string judge gives the non-refusal rate instead) and refusal per layer and per third of the encoder. One "
            "model: OUT/icet_report.{json,md}, OUT/icet_layers.png. Several (--model NAME=PATH, repeatable, or "
            "--models FILE): OUT/NAME/icet_report.* for each. Always OUT/icet_grid.{md,json,png}: model x layer group "
            "(Early/Middle/Late) x metric, and every model's per-layer curves on one plot. Supports LLaVA-1.5, "
            "LLaVA-NeXT, SafeVLM and Llama 3.2 Vision (mllama) checkpoints."
        ),
    )
    models = parser.add_mutually_exclusive_group(required=True)
    models.add_argument(
        "--model",
        action="append",
        metavar="[NAME=]PATH",
        help="Checkpoint folder or Hub id, repeatable; NAME labels its grid row and output folder (default: the "
        "folder name), e.g. --model before=./llava --model after=./lppo/final.",
    )
    models.add_argument(
        "--models",
        metavar="FILE",
        help="Text file of models, one [NAME=]PATH per line (# comments; relative paths "
        "are read from the file's folder), instead of --model.",
    )
    _add_prompt_source(parser, "JSONL prompt file (prompt, image, category, expected per line) instead of --bench.")
    parser.add_argument("--layers", default="all", help="all (default) | a-b | comma list, e.g. 1-12 or 4,8,-2.")
    parser.add_argument(
        "--judge",
        default="string",
        help="string (default; detects refusals only: reports a non-refusal rate, not attack success) | hf:MODEL | "
        "llama-guard-3:MODEL | openai:MODEL (harm judges: attack success).",
    )
    parser.add_argument("--judge-base-url", default=None, help="OpenAI-compatible base URL (openai judges).")
    parser.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="Variable holding the judge API key.")
    parser.add_argument("--reward-model", metavar="hf:MODEL", help="Also report this reward model's mean score.")
    parser.add_argument("--out", required=True, help="Output folder.")
    parser.add_argument(
        "--no-gating", action="store_true", help="SafeVLM models: generate without gating (the LLM alone)."
    )
    parser.add_argument(
        "--compare-gating",
        action="store_true",
        help="SafeVLM models: scan with gating on and off, write both reports and give each its grid row.",
    )
    parser.add_argument("--max-new-tokens", type=int, default=64, help="Answer length (default: 64).")
    parser.add_argument("--batch-size", type=int, default=8, help="Prompts per generate call (default: 8).")
    _add_runtime(parser)
    parser.set_defaults(func=run_icet)


def _register_lppo(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "lppo",
        help="Layer-wise PPO: align the model at an early vision layer.",
        description=(
            "Clip-PPO RLHF whose rollouts read image features from the target vision layer(s); LoRA on the LLM "
            "(vision encoder and projectors frozen). Writes checkpoints, lppo_log.jsonl and OUT/final (merged model)."
        ),
    )
    parser.add_argument(
        "--model",
        required=True,
        metavar="DIR",
        help="Checkpoint folder or Hub id (LLaVA-1.5, LLaVA-NeXT, SafeVLM, Llama 3.2 Vision).",
    )
    _add_prompt_source(parser, "JSONL training prompts (prompt, image, category, expected per line).")
    layers = parser.add_mutually_exclusive_group(required=True)
    layers.add_argument("--layer", type=int, help="The target vision layer (one layer per run, as published).")
    layers.add_argument(
        "--layers",
        help="Several target layers (a-b or a comma list), one drawn per batch; e.g. '4,-2' adds the default layer, "
        "which keeps its behaviour in the reward.",
    )
    parser.add_argument("--layer-sampling", default="random", choices=["random", "cycle"], help="With --layers.")
    parser.add_argument(
        "--reward",
        required=True,
        help="safety-head (SafeVLM's own head) | refusal (prompts labelled expected=refuse/answer) | hf:MODEL "
        "(sequence-classification reward model).",
    )
    parser.add_argument("--judge", default="string", help="Refusal detector of the safety-head/refusal rewards.")
    parser.add_argument("--out", required=True, help="Output folder (checkpoints, log, final model).")
    parser.add_argument("--steps", type=int, default=100, help="PPO steps (default: 100).")
    parser.add_argument("--batch-size", type=int, default=8, help="Prompts per rollout batch (default: 8).")
    parser.add_argument("--mini-batch-size", type=int, default=4, help="Rows per gradient step (default: 4).")
    parser.add_argument("--ppo-epochs", type=int, default=4, help="Passes over each rollout batch (default: 4).")
    parser.add_argument("--learning-rate", type=float, default=1e-5, help="Default: 1e-5.")
    parser.add_argument("--kl-coef", type=float, default=0.05, help="Per-token KL penalty (default: 0.05).")
    parser.add_argument("--kl-estimator", default="k1", choices=["k1", "k3"], help="Default: k1.")
    parser.add_argument("--clip-eps", type=float, default=0.2, help="PPO ratio clip (default: 0.2).")
    parser.add_argument("--vf-coef", type=float, default=0.1, help="Value-loss weight (default: 0.1).")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="Rollout length (default: 32).")
    parser.add_argument("--temperature", type=float, default=1.0, help="Rollout sampling temperature (default: 1.0).")
    parser.add_argument("--full-finetune", action="store_true", help="Train the whole LLM instead of LoRA adapters.")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default: 16).")
    parser.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha (default: 32).")
    parser.add_argument("--save-steps", type=int, default=0, help="Checkpoint every N steps (default: at the end).")
    parser.add_argument("--resume", action="store_true", help="Resume from the newest checkpoint in --out.")
    parser.add_argument("--no-merge", action="store_true", help="Save only the LoRA adapters, not a merged model.")
    parser.add_argument(
        "--held-out",
        type=int,
        default=None,
        metavar="N",
        help="Prompts drawn (seeded) from the set and kept out of training; the summary compares the policy's greedy "
        "reward on them before and after (default: 10%% of the prompts, 1 to 64; 0: none).",
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="Recompute activations in the PPO updates' backward pass instead of storing them (less memory).",
    )
    parser.add_argument(
        "--no-offload-reference",
        action="store_true",
        help="--full-finetune: keep the frozen reference LLM on the GPU (faster; twice the weights' memory).",
    )
    _add_runtime(parser)
    parser.set_defaults(func=run_lppo)


# ------------------------------------------------------------------------------------------------------ helpers
def _load_items(args: argparse.Namespace, out: Path) -> list[Any]:
    if args.prompts:
        from .prompts import load_prompt_file

        return load_prompt_file(args.prompts)
    from ..evaluation.safety_benchmarks import load_benchmark

    items = []
    for spec in args.bench:
        items += load_benchmark(spec, image_root=args.image_root, render_dir=out / "rendered", limit=args.limit)
    return items


def _load_model(path: str, args: argparse.Namespace, place: bool = True) -> tuple[Any, Any]:
    """The model at `path` (on `--device` if `place`; L-PPO's trainer places it on its process's device itself) and
    its processor."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import safevlm_hf  # noqa: F401  (registers SafeVLM with the Auto classes)

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True, dtype=dtype)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    if hasattr(model, "set_safety_tokenizer"):
        model.set_safety_tokenizer(processor.tokenizer)
    return (model.to(device) if place else model).eval(), processor


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


# --------------------------------------------------------------------------------------------------------- icet
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _model_entry(text: str, where: str, base: Path | None = None) -> tuple[str, str]:
    """`(label, path)` from `[NAME=]PATH` (a relative PATH is read from `base` when given)."""
    label, separator, path = (part.strip() for part in text.strip().partition("="))
    if not separator or "/" in label or "\\" in label:  # no NAME: the '=' (if any) belongs to the path
        label, path = "", text.strip()
    if not path:
        raise ValueError(f"{where}: {text!r} names no model path; write [NAME=]PATH.")
    if base is not None and not Path(path).is_absolute() and (base / path).exists():
        path = str(base / path)
    label = label or Path(path.rstrip("/\\")).name or path
    if not _LABEL.match(label):
        raise ValueError(
            f"{where}: model name {label!r} is not usable as a folder name; give one with NAME=PATH (letters, "
            "digits, '.', '_', '-')."
        )
    return label, path


def _model_entries(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The models to scan, as unique `(label, path)` pairs, from `--model` or `--models FILE`."""
    if args.models:
        listing = Path(args.models)
        if not listing.is_file():
            raise FileNotFoundError(f"Model list {listing} does not exist.")
        entries = []
        for number, line in enumerate(listing.read_text(encoding="utf-8").splitlines(), start=1):
            text = line.split("#", 1)[0].strip()
            if text:
                entries.append(_model_entry(text, f"{listing}:{number}", listing.parent))
        if not entries:
            raise ValueError(f"{listing} lists no model; write one [NAME=]PATH per line.")
    else:
        entries = [_model_entry(text, f"--model {text}") for text in args.model]
    labels = [label for label, _ in entries]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(
            f"Model name(s) {repeated} are used twice; name each model with NAME=PATH (e.g. --model before=... "
            "--model after=...)."
        )
    return entries


def _check_model(path: str, args: argparse.Namespace) -> bool:
    """Read the model's config (not its weights): fail fast on an unsupported family or a layer outside its encoder.
    Returns whether it is a SafeVLM."""
    from transformers import AutoConfig

    import safevlm_hf  # noqa: F401  (registers SafeVLM with the Auto classes)

    from ..prompting import is_safevlm_config
    from .early_exit import early_exit_class, resolve_layers

    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    family = early_exit_class(config)
    resolve_layers(args.layers, family.encoder_depth(config))
    return is_safevlm_config(config)


def run_icet(args: argparse.Namespace) -> int:
    """Execute `safevlm icet`; returns the exit code."""
    import gc

    import torch

    from ..evaluation.safety_benchmarks import BenchmarkFormatError
    from ..evaluation.judges import JudgeError, build_judge
    from .icet import comparison_table, icet_scan
    from .icet_grid import IcetGrid
    from .rewards import build_reward

    out = Path(args.out)
    if args.no_gating and args.compare_gating:
        return fail("icet", "--no-gating and --compare-gating exclude each other.")
    try:  # read every input and every model's config before loading weights: a bad input fails in seconds
        entries = _model_entries(args)
        items = _load_items(args, out)
        judge_kwargs = {}
        if args.judge.lower().startswith("openai:"):
            judge_kwargs = {
                "base_url": args.judge_base_url,
                "api_key_env": args.judge_api_key_env,
                "cache_dir": out / "judge_cache",
            }
        judge = build_judge(args.judge, **judge_kwargs)
    except (OSError, ValueError, BenchmarkFormatError, JudgeError) as err:
        return fail("icet", str(err))
    safevlm = {}
    for label, path in entries:
        try:
            safevlm[label] = _check_model(path, args)
        except (OSError, ValueError, KeyError) as err:
            return fail("icet", f"model {label!r} ({path}): {err}")
    if (args.no_gating or args.compare_gating) and not any(safevlm.values()):
        plain = entries[0][1] if len(entries) == 1 else "none of the models"
        return fail(
            "icet",
            f"{plain} is a plain model: no safety gating to turn off (--no-gating/--compare-gating need a SafeVLM).",
        )
    several = len(entries) > 1
    rows = []
    reward = None
    for label, path in entries:
        try:
            model, processor = _load_model(path, args)
        except (OSError, ValueError) as err:
            return fail("icet", f"cannot load model {label!r} ({path}): {err}")
        runs = [("icet", None)]
        if safevlm[label]:
            runs = (
                [("icet_gated", True), ("icet_ungated", False)]
                if args.compare_gating
                else [("icet", not args.no_gating)]
            )
        folder = out / label if several else out
        reports = {}
        try:
            if args.reward_model and reward is None:
                reward = build_reward(args.reward_model, model=model)  # loaded once, shared by every model's scan
            for prefix, gating in runs:
                report = icet_scan(
                    model,
                    processor,
                    items,
                    judge,
                    args.layers,
                    reward_model=reward,
                    gating=gating,
                    max_new_tokens=args.max_new_tokens,
                    batch_size=args.batch_size,
                    seed=args.seed,
                    show_progress=not args.no_progress,
                )
                paths = report.save(folder, prefix=prefix)
                reports[prefix] = report
                compared = args.compare_gating and gating is not None
                rows.append((f"{label} (gating {'on' if gating else 'off'})" if compared else label, report))
                field, title = report.headline[0]  # named for the judge: ASR, or non-refusal from a refusal-only judge
                summary = ", ".join(f"{g} {title} {_pct(v[field])}" for g, v in report.group_averages().items())
                gate = "" if gating is None else f" (gating {'on' if gating else 'off'})"
                print(f"ICET scan of {label}{gate}: {len(report.layers)} layers x {len(items)} prompts; {summary}.")
                print(f"Report: {paths['markdown']}")
        except (ValueError, TypeError, FileNotFoundError, JudgeError) as err:
            return fail("icet", f"model {label!r}: {err}")
        if args.compare_gating and safevlm[label]:
            table = comparison_table(reports["icet_gated"], reports["icet_ungated"], ("gated", "ungated"))
            comparison = folder / "icet_gating_comparison.md"
            comparison.write_text(f"# ICET scan of {label}: gating on vs off\n\n{table}\n", encoding="utf-8")
            print(f"Comparison: {comparison}")
        del model, processor  # one model in memory at a time
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    try:
        grid = IcetGrid(rows).save(out)
    except ValueError as err:
        return fail("icet", str(err))
    print(f"Grid ({len(rows)} row(s): model x Early/Middle/Late x metric): {grid['markdown']}, plot {grid['plot']}")
    return 0


# --------------------------------------------------------------------------------------------------------- lppo
def split_held_out(items: list[Any], count: int | None, seed: int) -> tuple[list[Any], list[Any]]:
    """(training prompts, held-out prompts): ``count`` prompts drawn with ``seed`` (default: 10 % of the set, 1 to 64,
    none when the set has a single prompt), so that reruns and resumed runs hold out the same ones."""
    import random

    if count is None:
        count = min(64, max(1, round(0.1 * len(items)))) if len(items) > 1 else 0
    if not 0 <= count < len(items):
        raise ValueError(
            f"--held-out {count} must be >= 0 and leave at least one of the {len(items)} prompts to train on."
        )
    held = set(random.Random(seed).sample(range(len(items)), count))
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def lppo_summary(trainer: Any) -> str:
    """One line that compares the SAME prompts before and after training (greedy answers to the held-out prompts),
    beside the update statistics that say whether the policy moved at all."""
    from .lppo_trainer import mean_update_statistics

    history = trainer.log_history
    steps = history[-1]["step"] if history else trainer.step
    means = mean_update_statistics(history)
    moved = f"mean approx. KL {means['approx_kl']:.2e}, clip fraction {means['clip_fraction']:.3f} per update"
    if len(trainer.eval_history) >= 2:
        before, after = trainer.eval_history[0], trainer.eval_history[-1]
        reward = (
            f"held-out reward {before['reward']:.3f} -> {after['reward']:.3f} ({before['num_prompts']} prompts, "
            f"greedy, layer {before['layer']})"
        )
    else:
        reward = "no held-out prompts to compare before and after (--held-out 0)"
    return f"L-PPO on layer(s) {trainer.layers}: {steps} steps; {reward}; {moved}."


def run_lppo(args: argparse.Namespace) -> int:
    """Execute `safevlm lppo`; returns the exit code."""
    from ..evaluation.safety_benchmarks import BenchmarkFormatError
    from ..evaluation.judges import JudgeError, build_judge
    from .lppo_config import LPPOConfig
    from ..training.stages import published_data_name
    from .lppo_trainer import LPPOTrainer
    from .rewards import build_reward

    out = Path(args.out)
    if args.device not in ("auto", "cpu", "cuda"):
        return fail(
            "lppo",
            f"--device {args.device}: L-PPO puts each process on its own GPU (accelerate); pick GPUs with "
            "CUDA_VISIBLE_DEVICES and use --device auto, cuda or cpu.",
        )
    try:
        items, held_out = split_held_out(_load_items(args, out), args.held_out, args.seed)
        judge = build_judge(args.judge)
        config = LPPOConfig(
            output_dir=str(out),
            layers=args.layer if args.layer is not None else args.layers,
            layer_sampling=args.layer_sampling,
            max_steps=args.steps,
            rollout_batch_size=args.batch_size,
            mini_batch_size=min(args.mini_batch_size, args.batch_size),
            ppo_epochs=args.ppo_epochs,
            learning_rate=args.learning_rate,
            kl_coef=args.kl_coef,
            kl_estimator=args.kl_estimator,
            clip_eps=args.clip_eps,
            vf_coef=args.vf_coef,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            use_lora=not args.full_finetune,
            lora_r=args.lora_r,
            lora_alpha=args.lora_alpha,
            offload_reference=not args.no_offload_reference,
            activation_checkpointing=args.gradient_checkpointing,
            use_cpu=args.device == "cpu",
            save_steps=args.save_steps,
            seed=args.seed,
            show_progress=not args.no_progress,
        )
    except (OSError, ValueError, BenchmarkFormatError, JudgeError) as err:
        return fail("lppo", str(err))
    try:
        model, processor = _load_model(args.model, args, place=False)
    except (OSError, ValueError) as err:
        return fail("lppo", f"cannot load model {args.model!r}: {err}")
    try:
        reward = build_reward(args.reward, model=model, processor=processor, judge=judge)
        data_name = ", ".join(published_data_name(spec) for spec in ([args.prompts] if args.prompts else args.bench))
        trainer = LPPOTrainer(
            model, processor, config, items, reward, eval_items=held_out or None, data_name=data_name
        )
        trainer.train(resume_from_checkpoint=True if args.resume else None)
        final = trainer.save_model(out / "final", merge=not args.no_merge)
    except (ValueError, TypeError, FileNotFoundError, JudgeError) as err:
        return fail("lppo", str(err))
    if trainer.accelerator.is_main_process:
        print(f"{lppo_summary(trainer)} Log: {out / 'lppo_log.jsonl'}")
        print(f"Model: {final}")
    return 0
