"""Safety evaluation of (Safe)VLMs: benchmark adapters, judges, metrics, reports and human A/B evaluation.

Typical use::

    from safevlm_hf.evaluation import build_judge, evaluate, load_benchmark, build_report, write_report

    items = load_benchmark("figstep:SafeBench-Tiny.csv") + load_benchmark("xstest:xstest_prompts.csv")
    result = evaluate(
        model, processor, items, build_judge("llama-guard-3:meta-llama/Llama-Guard-3-8B"),
        refusal_judge=build_judge("string"), max_new_tokens=256,
    )
    write_report(build_report(result, model=model), "eval/", records=result.records)

Attack success comes only from a judge that decides harm; refusal, non-refusal and over-refusal rates from a refusal
judge, whose error can be measured with ``safevlm judge-check`` (:mod:`~.judge_check`). The command line equivalent
is ``safevlm eval`` (:mod:`safevlm_hf.evaluation.cli`).
"""

from .safety_benchmarks import (
    BENCHMARKS,
    FIGSTEP_PROMPT,
    BenchmarkFormatError,
    BenchmarkItem,
    BenchmarkSelection,
    LabelledItem,
    load_benchmark,
    load_figstep,
    load_mmsafetybench,
    load_vlguard,
    load_xstest,
    select_benchmark,
)
from .human_eval import HumanEvalError, HumanEvalSummary, export_ab_pairs, import_labels
from .judge_check import load_refusal_set, measure_refusal_judge
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
    LexiconJudge,
    LlamaGuard3Judge,
    LlamaGuard3VisionJudge,
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
from .provenance import weights_fingerprint
from .runner import EvaluationInputError, EvaluationResult, evaluate, evaluate_head
from .sampling import stratified_sample
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
    "BenchmarkSelection",
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
    "LexiconJudge",
    "LlamaGuard3Judge",
    "LlamaGuard3VisionJudge",
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
    "load_refusal_set",
    "load_vlguard",
    "load_xstest",
    "measure_refusal_judge",
    "plot_confusion_matrix",
    "render_figstep_image",
    "render_key_phrase_image",
    "risk_type_for",
    "select_benchmark",
    "stratified_sample",
    "weights_fingerprint",
    "write_report",
]
