"""Safety evaluation of (Safe)VLMs: benchmark adapters, judges, metrics, reports and human A/B evaluation.

Typical use::

    from safevlm_hf.evaluation import build_judge, evaluate, load_benchmark, build_report, write_report

    items = load_benchmark("figstep:SafeBench-Tiny.csv") + load_benchmark("xstest:xstest_prompts.csv")
    result = evaluate(model, processor, items, build_judge("string"), max_new_tokens=256)
    write_report(build_report(result, model=model), "eval/", records=result.records)

The command line equivalent is ``safevlm eval`` (:mod:`safevlm_hf.evaluation.cli`).
"""

from .benchmarks import (
    BENCHMARKS,
    FIGSTEP_PROMPT,
    BenchmarkFormatError,
    BenchmarkItem,
    LabelledItem,
    load_benchmark,
    load_figstep,
    load_mmsafetybench,
    load_vlguard,
    load_xstest,
)
from .human_eval import HumanEvalError, HumanEvalSummary, export_ab_pairs, import_labels
from .judges import (
    GUARD_PROMPT_TEMPLATE,
    JUDGE_PROMPT_TEMPLATE,
    REFUSAL_PHRASES,
    SAFEVLM_RUBRICS,
    HFJudge,
    Judge,
    JudgeEndpointError,
    JudgeError,
    JudgeInput,
    Judgement,
    OpenAIChatJudge,
    StringMatchJudge,
    build_judge,
)
from .metrics import (
    ECE_BINS,
    classification_report,
    expected_calibration_error,
    generation_metrics,
    head_metrics,
    head_metrics_from_verdicts,
    plot_confusion_matrix,
)
from .report import build_report, write_report
from .runner import EvaluationInputError, EvaluationResult, evaluate, evaluate_head
from .taxonomy import CATEGORY_RISK_TYPES, RISK_TYPES, risk_type_for
from .typography import render_figstep_image, render_key_phrase_image


__all__ = [
    "BENCHMARKS",
    "CATEGORY_RISK_TYPES",
    "ECE_BINS",
    "FIGSTEP_PROMPT",
    "GUARD_PROMPT_TEMPLATE",
    "JUDGE_PROMPT_TEMPLATE",
    "REFUSAL_PHRASES",
    "RISK_TYPES",
    "SAFEVLM_RUBRICS",
    "BenchmarkFormatError",
    "BenchmarkItem",
    "EvaluationInputError",
    "EvaluationResult",
    "HFJudge",
    "HumanEvalError",
    "HumanEvalSummary",
    "Judge",
    "JudgeEndpointError",
    "JudgeError",
    "JudgeInput",
    "Judgement",
    "LabelledItem",
    "OpenAIChatJudge",
    "StringMatchJudge",
    "build_judge",
    "build_report",
    "classification_report",
    "evaluate",
    "evaluate_head",
    "expected_calibration_error",
    "export_ab_pairs",
    "generation_metrics",
    "head_metrics",
    "head_metrics_from_verdicts",
    "import_labels",
    "load_benchmark",
    "load_figstep",
    "load_mmsafetybench",
    "load_vlguard",
    "load_xstest",
    "plot_confusion_matrix",
    "render_figstep_image",
    "render_key_phrase_image",
    "risk_type_for",
    "write_report",
]
