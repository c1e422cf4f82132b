"""``safevlm eval``: evaluate a checkpoint on benchmarks with a judge and write a reproducible report.

Example::

    safevlm eval --model ./my-safevlm --bench figstep:SafeBench-Tiny.csv --bench xstest:xstest_prompts.csv \\
        --judge string --out eval/

writes ``eval/report.json``, ``eval/report.md``, ``eval/records.jsonl`` and PNG plots. :func:`register` adds the
subcommand to a parent parser; :func:`run` executes it (0 on success, 2 on bad input such as a malformed benchmark
file, an unknown profile or an unreachable judge endpoint).
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

from .safety_benchmarks import BenchmarkFormatError, select_benchmark
from ..cli_support import fail
from .judges import MODEL_JUDGE_KINDS, JudgeError, build_judge, judge_kind
from .judges.endpoint import NO_API_KEY
from .redaction import check_env_var_name, redact_text


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand (and ``judge-check``, :mod:`.judge_check`) to ``subparsers`` (from
    ``ArgumentParser.add_subparsers()``); returns the ``eval`` parser."""
    from . import judge_check

    judge_check.register(subparsers)
    # argparse option blocks repeat in shape across sub-commands, not in content: each documents its own options.
    parser = subparsers.add_parser(
        "eval",
        help="Evaluate a model on safety benchmarks and write a report.",
        description=(
            "Evaluate a checkpoint on safety benchmarks with a judge and write a reproducible report "
            "(report.json, report.md, records.jsonl and PNG plots)."
        ),
    )
    parser.add_argument("--model", required=True, help="Checkpoint folder or Hub id (SafeVLM or plain LLaVA).")
    parser.add_argument(
        "--bench",
        action="append",
        required=True,
        metavar="SPEC",
        help="Benchmark spec, repeatable: figstep:PATH[:text], xstest:PATH, vlguard:PATH[:subset], "
        "mmsafetybench:DIR[:SD|TYPO|SD_TYPO].",
    )
    parser.add_argument(
        "--judge",
        default="string",
        help="string (default; rule-based refusal detection: reports a non-refusal rate, not attack success) | "
        "string:xstest | string:gcg | hf:MODEL | hf-refusal:MODEL | llama-guard-3:MODEL | llama-guard-3-vision:MODEL "
        "| openai:MODEL.",
    )
    parser.add_argument(
        "--refusal-judge",
        default=None,
        metavar="SPEC",
        help="Judge of refusal/over-refusal (e.g. string, hf-refusal:MODEL). Default: the --judge when it decides "
        "refusals; with a harm-only judge (hf:, llama-guard-3:) the refusal columns stay empty unless this is given.",
    )
    parser.add_argument("--out", required=True, help="Output folder for the report, records and plots.")
    parser.add_argument("--profile", default=None, help="SafeVLM safety profile (default: the policy's default).")
    parser.add_argument("--policy", default=None, help="JSON file with a safety policy replacing the checkpoint's.")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="Answer length (default: 256).")
    parser.add_argument("--batch-size", type=int, default=8, help="Prompts per generate call (default: 8).")
    subset = parser.add_mutually_exclusive_group()
    subset.add_argument(
        "--limit", type=int, default=None, help="Keep the first N items of each benchmark file (a plain prefix)."
    )
    subset.add_argument(
        "--sample",
        type=int,
        default=None,
        metavar="N",
        help="Evaluate N items of each benchmark, drawn with --seed and stratified by category and expected label.",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of --sample and of generation (default: 0).")
    parser.add_argument(
        "--skip-missing-images",
        action="store_true",
        help="Skip benchmark items whose image file is missing (counted and listed in the report) instead of failing.",
    )
    parser.add_argument("--image-root", default=None, help="Folder of benchmark images (VLGuard, MM-SafetyBench).")
    parser.add_argument("--render-dir", default=None, help="Where typographic images go (default: OUT/rendered).")
    parser.add_argument(
        "--head-data",
        default=None,
        help="Labelled rows for safety-head metrics: a training file (.jsonl/.json), vlguard:PATH (its training "
        "labels), or a benchmark spec (figstep:, xstest:, mmsafetybench:; types from the benchmark's categories).",
    )
    parser.add_argument("--head-image-root", default=None, help="Image folder of --head-data (default: its folder).")
    parser.add_argument("--judge-base-url", default=None, help="OpenAI-compatible base URL (openai judges).")
    parser.add_argument(
        "--judge-api-key-env",
        default="OPENAI_API_KEY",
        help="NAME of the environment variable holding the judge API key (default: OPENAI_API_KEY); 'none' for a "
        "server that needs no key. A key pasted here is refused.",
    )
    parser.add_argument("--judge-cache", default=None, help="Judge cache folder (default: OUT/judge_cache).")
    parser.add_argument("--judge-timeout", type=float, default=60.0, help="Seconds per judge request (default: 60).")
    parser.add_argument("--judge-retries", type=int, default=3, help="Retries per judge request (default: 3).")
    parser.add_argument("--device", default="auto", help="auto (default: CUDA if available), cpu, cuda, cuda:1, ...")
    dtypes = ["auto", "float32", "bfloat16", "float16"]
    parser.add_argument("--dtype", default="auto", choices=dtypes, help="Weights dtype (default: auto).")
    parser.add_argument("--no-progress", action="store_true", help="Hide progress bars.")
    parser.add_argument("--no-plots", action="store_true", help="Skip the PNG plots.")
    parser.set_defaults(func=run)
    return parser


def _command_line(args: argparse.Namespace) -> list[str]:
    """The equivalent ``safevlm eval`` command, for the report (rebuilt from the parsed options; credentials in it are
    redacted when the report is written)."""
    command = ["safevlm", "eval"]
    for name, value in sorted(vars(args).items()):
        if name in ("func", "command") or value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        if value is True:
            command.append(flag)
        elif isinstance(value, list):
            for entry in value:
                command += [flag, str(entry)]
        else:
            command += [flag, str(value)]
    return command


def _judge_kwargs(spec: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Constructor options of the judge built from ``spec`` (the CLI options that apply to its kind)."""
    kind = judge_kind(spec)
    if kind == "openai":
        return {
            "base_url": args.judge_base_url,
            "api_key_env": args.judge_api_key_env,
            "cache_dir": args.judge_cache or out / "judge_cache",
            "timeout": args.judge_timeout,
            "max_retries": args.judge_retries,
            "show_progress": not args.no_progress,
        }
    if kind in MODEL_JUDGE_KINDS:
        return {"device": None if args.device == "auto" else args.device}
    return {}


def _error(message: str) -> int:
    return fail("eval", redact_text(message))  # a judge URL in the message may carry credentials


def run(args: argparse.Namespace) -> int:
    """Execute ``safevlm eval`` for parsed ``args``; returns the process exit code."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from safetensors import SafetensorError

    from ..checkpoints import check_safetensors_files
    from ..data.files import read_json_file
    from ..modeling.policy_safevlm import SafetyPolicyError
    from .head_data import HeadDataError, load_head_data
    from .report import benchmark_info, build_report, write_report
    from .runner import EvaluationInputError, evaluate, evaluate_head

    out = Path(args.out)
    render_dir = Path(args.render_dir) if args.render_dir else out / "rendered"
    # Read every input before loading the model, so a bad file fails in seconds, not after minutes of loading.
    try:
        if args.sample is not None and args.sample < 1:
            raise ValueError(f"--sample must be >= 1, got {args.sample}.")
        if args.judge_api_key_env not in NO_API_KEY:
            check_env_var_name(args.judge_api_key_env, "--judge-api-key-env")
        selections = []
        for spec in args.bench:
            selections.append(
                select_benchmark(
                    spec,
                    image_root=args.image_root,
                    render_dir=render_dir,
                    limit=args.limit,
                    sample=args.sample,
                    seed=args.seed,
                    skip_missing_images=args.skip_missing_images,
                )
            )
        empty = [selection.spec for selection in selections if not selection.items]
        if empty:
            raise ValueError(f"no item left to evaluate in {empty} (all skipped or an empty file).")
        labelled = None
        if args.head_data:
            labelled = load_head_data(args.head_data, image_root=args.head_image_root, render_dir=render_dir)
        policy = read_json_file(args.policy) if args.policy else None  # errors name the file and line
        judge = build_judge(args.judge, **_judge_kwargs(args.judge, args, out))
        refusal_judge = None
        if args.refusal_judge == args.judge:  # one judge, loaded and run once (evaluate() sees the same object)
            refusal_judge = judge
        elif args.refusal_judge:
            refusal_judge = build_judge(args.refusal_judge, **_judge_kwargs(args.refusal_judge, args, out))
        check_safetensors_files(args.model)  # a corrupted weights file is named before minutes of loading
    except (OSError, ValueError, BenchmarkFormatError, JudgeError, HeadDataError) as err:
        return _error(str(err))

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    try:
        model = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=True, dtype=dtype)
        processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    except (OSError, SafetensorError, RecursionError) as err:  # RecursionError: a config.json nested too deeply
        return _error(f"cannot load model {args.model!r}: {err or type(err).__name__}")
    model = model.to(device).eval()

    all_items = [item for selection in selections for item in selection.items]
    try:
        result = evaluate(
            model,
            processor,
            all_items,
            judge,
            refusal_judge=refusal_judge,
            profile=args.profile,
            policy=policy,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            seed=args.seed,
            progress=not args.no_progress,
        )
        head = None
        if labelled is not None:
            head = evaluate_head(model, processor, labelled, batch_size=args.batch_size, progress=not args.no_progress)
    except (JudgeError, SafetyPolicyError, EvaluationInputError) as err:
        return _error(str(err))

    report = build_report(
        result,
        model=model,
        benchmarks=[
            benchmark_info(
                selection.spec,
                selection.items,
                selection.limit,
                sample=selection.sample,
                seed=selection.seed,
                n_available=selection.n_available,
                skipped_missing_images=selection.skipped_missing_images,
            )
            for selection in selections
        ],
        head_metrics=head,
        command=_command_line(args),
        weights="auto",  # files when the model came from safetensors files (unchanged since), else its state dict
    )
    written = write_report(report, out, records=result.records, plots=not args.no_plots)
    print(summary_line(result.metrics["overall"], result.settings["metric_sources"]))
    for selection in selections:
        if selection.skipped_missing_images:
            first = ", ".join(image for _, image in selection.skipped_missing_images[:3])
            print(
                f"{selection.spec}: skipped {len(selection.skipped_missing_images)} items with missing images "
                f"(first: {first})."
            )
    print(f"Report: {written['markdown']} ({shlex.quote(str(written['json']))})")
    return 0


def summary_line(overall: dict[str, Any], sources: dict[str, Any]) -> str:
    """The one-line summary printed after a run; every rate is named with the judge that produced it."""

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}%"

    parts = [f"{overall['n_items']} items"]
    harm, refusal = sources.get("attack_success"), sources.get("refusal")
    if harm:
        parts.append(f"attack success {pct(overall['attack_success_rate'])} [{harm}]")
    if refusal:
        if not harm:
            parts.append(f"non-refusal (risky) {pct(overall['non_refusal_rate'])} [{refusal}]")
        parts.append(f"refusal (risky) {pct(overall['refusal_rate_risky'])} [{refusal}]")
        parts.append(f"over-refusal {pct(overall['over_refusal_rate'])} [{refusal}]")
    else:
        parts.append("refusal rates n/a (no refusal judge)")
    parts.append(f"unparseable {overall['unparseable']}")
    return ", ".join(parts) + "."


__all__ = ["register", "run", "summary_line"]
