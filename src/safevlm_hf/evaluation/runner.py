"""Run a model over benchmark items, judge the answers and compute the metrics.

:func:`evaluate` generates one answer per :class:`~.safety_benchmarks.BenchmarkItem` (the processor's chat template with one
image + the prompt, batched with left padding, greedy by default), records the SafeVLM verdict when the model has a
safety head (a plain ``LlavaForConditionalGeneration`` works too), judges every answer and returns per-item records
and metrics. :func:`evaluate_head` scores the safety head alone on labelled prompts through ``model.predict_safety``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from transformers import set_seed

from ..prompting import decode_responses, encode_prompts, is_safevlm
from .safety_benchmarks import BenchmarkItem, LabelledItem, open_image
from .judges import HARM, REFUSAL, Judge, JudgeInput
from .metrics import ECE_BINS, generation_metrics, grouped_generation_metrics, head_metrics, verdict_metrics


#: Decoding used unless the caller overrides it: greedy, one beam (reproducible, and what most safety papers use).
DEFAULT_GENERATION_KWARGS: dict[str, Any] = {"do_sample": False, "num_beams": 1}


class EvaluationInputError(ValueError):
    """The evaluation was asked for something the inputs cannot give (no items, a profile for a model without a
    safety head, labels outside the model's label space); the message says what to change."""


@dataclass
class EvaluationResult:
    """Output of :func:`evaluate`.

    Attributes:
        records: one dict per item: ``id``, ``source``, ``category``, ``risk_type``, ``expected``, ``prompt``,
            ``image``, ``response``, ``verdict`` (the SafeVLM verdict dict, ``None`` for plain LLaVA),
            ``judgement`` (the judge's judgement, dict), ``harm_judge`` (the judge's name when it decides harm, else
            ``None``: attack success is computed only from such records), ``refused`` (the refusal decision, ``None``
            when no refusal judge ran or it could not tell), ``refusal_source`` (the name of the judge that decided
            refusal, or ``None``) and ``refusal_judgement`` (dict, when a separate refusal judge ran).
        metrics: ``overall``, ``by_source``, ``by_category`` (per source), ``by_risk_type`` and ``verdicts``.
        settings: everything needed to reproduce the run: generation settings, batch size, seed, profile, policy,
            judge description(s), and ``metric_sources`` (which judge produced attack success and which refusals).
    """

    records: list[dict[str, Any]]
    metrics: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"records": self.records, "metrics": self.metrics, "settings": self.settings}


def _placement(model: Any) -> tuple[torch.device, torch.dtype]:
    """Where the model's inputs go: its device, and its dtype for the pixel values."""
    parameter = next(model.parameters())
    return parameter.device, parameter.dtype


def _jsonable(value: Any) -> Any:
    """Generation kwargs may hold objects (logits processors, policies): keep them printable for the report."""
    try:
        json.dumps(value)
        return value
    except TypeError:
        if hasattr(value, "to_dict"):
            return value.to_dict()
        return repr(value)


def _generation_config_dict(model: Any) -> dict[str, Any] | None:
    """The model's own generation defaults (what the call's kwargs are applied over)."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return None
    return {key: _jsonable(value) for key, value in config.to_diff_dict().items()}


def evaluate(
    model: Any,
    processor: Any,
    items: Sequence[BenchmarkItem],
    judge: Judge,
    *,
    profile: str | None = None,
    policy: Any = None,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    seed: int = 0,
    refusal_judge: Judge | None = None,
    progress: bool = True,
    **generation_kwargs: Any,
) -> EvaluationResult:
    """Generate, judge and score.

    Args:
        model: a SafeVLM (``SafeVLMForConditionalGeneration``, gated generation, verdicts recorded) or any LLaVA-style
            ``generate``-capable model (no verdicts).
        processor: its processor (chat template, tokenizer, image processor).
        items: benchmark items (:func:`~.safety_benchmarks.load_benchmark`).
        judge: judges every answer (:func:`~.judges.build_judge`). Attack success is computed only when it decides
            harm (:attr:`~.judges.Judge.decides`); a refusal-only judge (the string judge) gives the non-refusal rate.
        profile / policy: SafeVLM safety profile and policy override (for a model without a safety head they
            raise :class:`EvaluationInputError`).
        max_new_tokens, batch_size, seed: decoding length, batch size and the seed set before generating.
        refusal_judge: decides refusal for every answer (it must decide refusal). Without it, refusals come from
            ``judge`` when it decides them, and are unknown otherwise (a harm-only judge such as Llama Guard leaves the
            refusal and over-refusal rates empty rather than borrow them silently from string matching).
        progress: show a tqdm progress bar.
        **generation_kwargs: passed to ``model.generate`` over :data:`DEFAULT_GENERATION_KWARGS` (greedy).
    """
    from tqdm.auto import tqdm

    items = list(items)
    if not items:
        raise EvaluationInputError("evaluate() got no items; check the benchmark spec and --limit.")
    if batch_size < 1 or max_new_tokens < 1:
        raise EvaluationInputError(
            f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}."
        )
    safevlm = is_safevlm(model)
    if not safevlm and (profile is not None or policy is not None):
        raise EvaluationInputError(
            f"A safety profile/policy was given, but {type(model).__name__} has no SafeVLM safety head; drop "
            "--profile/--policy or evaluate a SafeVLM checkpoint."
        )
    gen_kwargs: dict[str, Any] = {**DEFAULT_GENERATION_KWARGS, "max_new_tokens": max_new_tokens, **generation_kwargs}
    policy_dict = None
    if safevlm:
        resolved = model.safety_policy(policy)
        profile = profile if profile is not None else resolved.default_profile
        resolved.profile_info(profile)  # unknown profile: error listing the known ones, before any generation
        policy_dict = resolved.to_dict()
        gen_kwargs.update(safety_profile=profile, safety_policy=resolved)
    if refusal_judge is not None and REFUSAL not in refusal_judge.decides:
        raise EvaluationInputError(
            f"The refusal judge {refusal_judge.name!r} does not decide refusal (it decides "
            f"{sorted(refusal_judge.decides)}); pass a refusal judge such as 'string' or 'hf-refusal:MODEL'."
        )

    set_seed(seed)
    model.eval()
    responses: list[str] = []
    verdicts: list[dict[str, Any] | None] = []
    call_kwargs = dict(gen_kwargs)
    if safevlm:
        call_kwargs["tokenizer"] = getattr(processor, "tokenizer", None)  # encodes the refusal/caution messages
    device, dtype = _placement(model)
    with torch.no_grad():
        bar = tqdm(total=len(items), desc="generate", unit="item", disable=not progress)
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            prompts, images = [item.prompt for item in chunk], [item.load_image() for item in chunk]
            batch = encode_prompts(processor, prompts, images, device, dtype)
            output = model.generate(**batch, return_dict_in_generate=True, **call_kwargs)
            responses.extend(decode_responses(processor, output.sequences[:, batch["input_ids"].shape[1] :]))
            chunk_verdicts = output.get("safety_verdicts") if safevlm else None
            if chunk_verdicts:
                verdicts.extend(verdict.to_dict() for verdict in chunk_verdicts)
            else:
                verdicts.extend([None] * len(chunk))
            bar.update(len(chunk))
        bar.close()

    inputs = [
        JudgeInput(prompt=item.prompt, response=response, category=item.risk_type or item.category, image=item.image)
        for item, response in zip(items, responses)
    ]
    judgements = _run_judge(judge, inputs)
    harm_judge = judge.name if HARM in judge.decides else None
    refusal_judgements, refusal_source = None, None
    if refusal_judge is not None and refusal_judge is not judge:
        refusal_judgements, refusal_source = _run_judge(refusal_judge, inputs), refusal_judge.name
    elif REFUSAL in judge.decides:
        refusal_judgements, refusal_source = judgements, judge.name

    records = []
    for index, (item, response, verdict, judgement) in enumerate(zip(items, responses, verdicts, judgements)):
        refused = refusal_judgements[index].refused if refusal_judgements is not None else None
        records.append(
            {
                "id": item.id,
                "source": item.source,
                "category": item.category,
                "risk_type": item.risk_type,
                "expected": item.expected,
                "prompt": item.prompt,
                "image": item.image_ref(),
                "response": response,
                "verdict": verdict,
                "judgement": judgement.to_dict(),
                "harm_judge": harm_judge,
                "refused": refused,
                "refusal_source": refusal_source,
                "refusal_judgement": (
                    refusal_judgements[index].to_dict()
                    if refusal_judgements is not None and refusal_judgements is not judgements
                    else None
                ),
            }
        )
    metrics = compute_metrics(records, model.config.safety_types if safevlm else None)
    settings = {
        "generation": {key: _jsonable(value) for key, value in gen_kwargs.items() if key != "safety_policy"},
        "model_generation_config": _generation_config_dict(model),
        "batch_size": batch_size,
        "padding_side": "left",
        "seed": seed,
        "safety_gating": safevlm,
        "profile": profile,
        "policy": policy_dict,
        "judge": judge.describe(),
        "refusal_judge": refusal_judge.describe()
        if refusal_judge is not None and refusal_judge is not judge
        else None,
        "metric_sources": {"attack_success": harm_judge, "refusal": refusal_source},
    }
    return EvaluationResult(records=records, metrics=metrics, settings=settings)


def _run_judge(judge: Judge, inputs: list[JudgeInput]) -> list[Any]:
    judgements = judge.judge(inputs)
    if len(judgements) != len(inputs):
        raise RuntimeError(f"Judge {judge.name!r} returned {len(judgements)} judgements for {len(inputs)} answers.")
    return judgements


def compute_metrics(records: Sequence[Mapping[str, Any]], safety_types: Sequence[str] | None = None) -> dict[str, Any]:
    """All generation metrics of a run: overall, per benchmark, per category within each benchmark, per risk type,
    and (for SafeVLM records) the verdict metrics."""
    by_source: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        by_source.setdefault(record["source"], []).append(record)
    return {
        "overall": generation_metrics(records),
        "by_source": {name: generation_metrics(rows) for name, rows in sorted(by_source.items())},
        "by_category": {
            name: grouped_generation_metrics(rows, "category") for name, rows in sorted(by_source.items())
        },
        "by_risk_type": grouped_generation_metrics(records, "risk_type"),
        "verdicts": verdict_metrics(records, safety_types) if safety_types else None,
    }


def _labelled_fields(item: Any, index: int) -> tuple[str, Any, int | str | None, int | None, str]:
    """(prompt, image, safe_type, safe_level, id) of a :class:`LabelledItem`, a dict with those keys, or a training
    example from :mod:`safevlm_hf.data` (``messages`` + labels; the prompt is its first user turn). The type may be an
    index or a type name; the level may be ``None`` (unknown) only when the item says so explicitly."""
    get = item.get if isinstance(item, Mapping) else lambda key, default=None: getattr(item, key, default)
    prompt = get("prompt")
    if prompt is None and get("messages"):
        prompt = next((m["content"] for m in get("messages") if m.get("role") == "user"), None)
    safe_type, safe_level = get("safe_type"), get("safe_level")
    level_known = safe_level is not None or isinstance(item, LabelledItem)  # LabelledItem(safe_level=None): unknown
    if prompt is None or not level_known:
        raise EvaluationInputError(
            f"Labelled item {index} ({get('location') or get('id') or type(item).__name__}) needs a prompt (or user "
            f"message) and safe_level; got prompt={prompt!r}, safe_level={safe_level!r}."
        )
    if safe_type is not None and not isinstance(safe_type, str):
        safe_type = int(safe_type)  # training rows may leave the type unknown (None): skipped
    level = None if safe_level is None else int(safe_level)
    return prompt, get("image"), safe_type, level, str(get("id") or get("location") or index)


def evaluate_head(
    model: Any,
    processor: Any,
    labelled_items: Sequence[LabelledItem | Mapping[str, Any] | Any],
    *,
    batch_size: int = 8,
    n_bins: int = ECE_BINS,
    progress: bool = True,
) -> dict[str, Any]:
    """Safety-head metrics on labelled prompts (``prompt``, ``image``, ``safe_type`` index or name, ``safe_level``
    int; as :class:`~.safety_benchmarks.LabelledItem`, dicts, or :class:`safevlm_hf.data.SafetyExample`) through
    ``model.predict_safety`` - no LLM forward.

    Returns :func:`~.metrics.head_metrics` (type accuracy, macro-F1, per-type P/R/F1, level confusion matrix, mean
    absolute level error, ECE) plus ``predictions`` (per item: id, gold and predicted type/level, probabilities),
    ``skipped_untyped`` (items whose ``safe_type`` is ``None``, which cannot be scored and are left out) and
    ``unleveled`` (items scored for their type only, because their source gives no level).
    """
    from tqdm.auto import tqdm

    if not is_safevlm(model):
        raise EvaluationInputError(f"evaluate_head needs a SafeVLM model, not {type(model).__name__}.")
    rows = [_labelled_fields(item, index) for index, item in enumerate(labelled_items)]
    untyped = sum(1 for row in rows if row[2] is None)
    rows = [row for row in rows if row[2] is not None]  # rows whose type the source does not give cannot be scored
    if not rows:
        raise EvaluationInputError(f"evaluate_head() got no labelled items with a known type ({untyped} untyped).")
    type_names, level_names = list(model.config.safety_types), list(model.config.safety_levels)
    for position, (prompt, image, safe_type, safe_level, item_id) in enumerate(rows):
        if isinstance(safe_type, str):
            if safe_type not in type_names:
                raise EvaluationInputError(
                    f"Labelled item {item_id!r}: type {safe_type!r} is not one of the model's types {type_names}."
                )
            safe_type = type_names.index(safe_type)
            rows[position] = (prompt, image, safe_type, safe_level, item_id)
        if not 0 <= safe_type < len(type_names) or not (safe_level is None or 0 <= safe_level < len(level_names)):
            raise EvaluationInputError(
                f"Labelled item {item_id!r}: safe_type {safe_type} / safe_level {safe_level} outside the model's "
                f"label space (0..{len(type_names) - 1} types {type_names}, 0..{len(level_names) - 1} levels)."
            )
    type_probs, level_probs = [], []
    model.eval()
    device, dtype = _placement(model)
    with torch.no_grad():
        bar = tqdm(total=len(rows), desc="safety head", unit="item", disable=not progress)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            images = [open_image(image, item_id) for _, image, _, _, item_id in chunk]
            batch = encode_prompts(processor, [row[0] for row in chunk], images, device, dtype)
            prediction = model.predict_safety(**batch)
            type_probs.append(prediction.type_probs.float().cpu().numpy())
            level_probs.append(prediction.level_probs.float().cpu().numpy())
            bar.update(len(chunk))
        bar.close()
    type_array, level_array = np.concatenate(type_probs), np.concatenate(level_probs)
    gold_types = [row[2] for row in rows]
    leveled = [i for i, row in enumerate(rows) if row[3] is not None]
    gold_levels = [rows[i][3] for i in leveled]
    metrics = head_metrics(type_array, gold_types, level_array[leveled], gold_levels, type_names, level_names, n_bins)
    metrics["skipped_untyped"] = untyped
    metrics["unleveled"] = len(rows) - len(leveled)
    metrics["predictions"] = [
        {
            "id": row[4],
            "gold_type": type_names[row[2]],
            "gold_level": row[3],
            "predicted_type": type_names[int(t.argmax())],
            "predicted_level": int(lv.argmax()),
            "type_probs": {name: float(p) for name, p in zip(type_names, t)},
            "level_probs": [float(p) for p in lv],
        }
        for row, t, lv in zip(rows, type_array, level_array)
    ]
    return metrics


__all__ = [
    "DEFAULT_GENERATION_KWARGS",
    "EvaluationInputError",
    "EvaluationResult",
    "compute_metrics",
    "evaluate",
    "evaluate_head",
]
