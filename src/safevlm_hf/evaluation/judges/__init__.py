"""Judges: decide whether a model's answer refused, and whether it is unsafe, behind one interface.

Built from a spec with :func:`build_judge`:

* ``"string"`` - :class:`StringMatchJudge`: rule-based refusal detection, measured on a labelled set
  (``safevlm judge-check``). Decides refusal only: reports call its complement the non-refusal rate, never attack
  success. ``"string:xstest"`` / ``"string:gcg"`` - :class:`LexiconJudge`: a published refusal lexicon, as baseline.
* ``"hf:MODEL"`` - :class:`HFJudge`: a local Hugging Face model judging harm (a causal LM answering safe/unsafe, or
  a sequence classifier). ``"hf-refusal:MODEL"``: the same route judging refusal (refusal/compliance).
* ``"llama-guard-3:MODEL"`` / ``"llama-guard-3-vision:MODEL"`` - :class:`LlamaGuard3Judge` /
  :class:`LlamaGuard3VisionJudge`: Llama Guard 3 in its native prompt and S1-S14 (vision: S1-S13) categories.
* ``"openai:MODEL"`` - :class:`OpenAIChatJudge`: any OpenAI-compatible ``/chat/completions`` endpoint applying the
  SafeVLM protocol (a 1-10 rubric score plus refused/unsafe flags), with retries, timeouts and an on-disk cache.

Every judge's :meth:`Judge.describe` returns everything that determines its answers (name, version, model and
weights hash, the full prompt templates and rules, settings); evaluation reports pin it. :attr:`Judge.decides` says
whether it decides harm, refusal or both. An answer the judge's output cannot be parsed from is returned with
``parsed=False`` and ``unsafe=None`` - metrics never count it as safe.
"""

from __future__ import annotations

from typing import Any

from .base import HARM, REFUSAL, Judge, JudgeEndpointError, JudgeError, JudgeInput, Judgement, normalize_text
from .endpoint import (
    GENERIC_RUBRIC,
    JUDGE_PROMPT_TEMPLATE,
    JUDGE_SYSTEM_PROMPT,
    SAFEVLM_RUBRICS,
    OpenAIChatJudge,
    parse_judge_reply,
)
from .hf import (
    CLASSIFIER_TEMPLATE,
    GUARD_PROMPT_TEMPLATE,
    REFUSAL_PROMPT_TEMPLATE,
    HFJudge,
    guard_categories_text,
    parse_guard_output,
)
from .lexicons import GCG_REFUSAL_SUBSTRINGS, PUBLISHED_LEXICONS, XSTEST_REFUSAL_PREFIXES
from .llama_guard import (
    LLAMA_GUARD_3_CATEGORIES,
    LLAMA_GUARD_3_VISION_CATEGORIES,
    LlamaGuard3Judge,
    LlamaGuard3VisionJudge,
    parse_llama_guard_output,
    render_llama_guard_3_prompt,
)
from .string import COMPLIANCE_IDIOMS, REFUSAL_PATTERNS, REFUSAL_PHRASES, LexiconJudge, StringMatchJudge


#: Spec prefixes of :func:`build_judge` (``"string"`` takes no target, or a lexicon name).
JUDGE_SPECS: tuple[str, ...] = (
    "string",
    "string:xstest",
    "string:gcg",
    "hf:MODEL",
    "hf-refusal:MODEL",
    "llama-guard-3:MODEL",
    "llama-guard-3-vision:MODEL",
    "openai:MODEL",
)
#: Kinds of the judges backed by a local model (their constructors take ``device=``).
MODEL_JUDGE_KINDS: frozenset[str] = frozenset({"hf", "hf-refusal", "llama-guard-3", "llama-guard-3-vision"})


def judge_kind(spec: str) -> str:
    """The kind of a judge spec: its part before the first colon, lower case (``"hf"`` for ``"hf:MODEL"``)."""
    return spec.partition(":")[0].strip().lower()


def build_judge(spec: str, **kwargs: Any) -> Judge:
    """Build a judge from a spec (see :data:`JUDGE_SPECS`; ``MODEL`` is a local folder or Hub id, or for ``openai``
    the endpoint's model name).

    Keyword arguments go to the judge's constructor (:class:`StringMatchJudge`, :meth:`HFJudge.from_pretrained`,
    :meth:`LlamaGuard3Judge.from_pretrained`, :class:`OpenAIChatJudge`), e.g.
    ``build_judge("openai:gpt-4o", base_url=..., cache_dir=...)``.
    """
    kind, target = judge_kind(spec), spec.partition(":")[2]
    if kind in ("string", "string_match"):
        if not target:
            return StringMatchJudge(**kwargs)
        if target in PUBLISHED_LEXICONS and not kwargs:
            return LexiconJudge(target)
    elif target:
        if kind == "hf":
            return HFJudge.from_pretrained(target, **kwargs)
        if kind == "hf-refusal":
            return HFJudge.from_pretrained(target, task=REFUSAL, **kwargs)
        if kind == "llama-guard-3":
            return LlamaGuard3Judge.from_pretrained(target, **kwargs)
        if kind == "llama-guard-3-vision":
            return LlamaGuard3VisionJudge.from_pretrained(target, **kwargs)
        if kind == "openai":
            return OpenAIChatJudge(target, **kwargs)
    raise ValueError(f"Unknown judge spec {spec!r}; use one of {', '.join(JUDGE_SPECS)}.")


__all__ = [
    "CLASSIFIER_TEMPLATE",
    "COMPLIANCE_IDIOMS",
    "GCG_REFUSAL_SUBSTRINGS",
    "GENERIC_RUBRIC",
    "GUARD_PROMPT_TEMPLATE",
    "HARM",
    "JUDGE_PROMPT_TEMPLATE",
    "JUDGE_SPECS",
    "JUDGE_SYSTEM_PROMPT",
    "LLAMA_GUARD_3_CATEGORIES",
    "LLAMA_GUARD_3_VISION_CATEGORIES",
    "MODEL_JUDGE_KINDS",
    "PUBLISHED_LEXICONS",
    "REFUSAL",
    "REFUSAL_PATTERNS",
    "REFUSAL_PHRASES",
    "REFUSAL_PROMPT_TEMPLATE",
    "SAFEVLM_RUBRICS",
    "XSTEST_REFUSAL_PREFIXES",
    "HFJudge",
    "Judge",
    "JudgeEndpointError",
    "JudgeError",
    "JudgeInput",
    "Judgement",
    "LexiconJudge",
    "LlamaGuard3Judge",
    "LlamaGuard3VisionJudge",
    "OpenAIChatJudge",
    "StringMatchJudge",
    "build_judge",
    "guard_categories_text",
    "judge_kind",
    "normalize_text",
    "parse_guard_output",
    "parse_judge_reply",
    "parse_llama_guard_output",
    "render_llama_guard_3_prompt",
]
