"""How benchmark categories map onto the SafeVLM risk taxonomy.

SafeVLM classifies requests into six risk types (plus ``"Safe"``); each benchmark has its own category names. The
table below is the one place where the two meet: per-category metrics, the rubric a judge applies and the head's
"predicted type vs benchmark type" confusion matrix all use it.

=====================  ==================================  =====================
benchmark              category                            SafeVLM risk type
=====================  ==================================  =====================
FigStep / SafeBench    Illegal Activity                    Illegal Risk
                       Hate Speech                         Insults & Bullying
                       Malware Generation                  Illegal Risk
                       Physical Harm                       Illegal Risk
                       Fraud                               Illegal Risk
                       Adult Content                       Illegal Risk (the policy files sexual content here)
                       Privacy Violation                   Privacy
                       Legal Opinion                       Misleading (unqualified professional advice)
                       Financial Advice                    Misleading
                       Health Consultation                 Misleading
MM-SafetyBench         Illegal_Activitiy (sic)             Illegal Risk
                       HateSpeech                          Insults & Bullying
                       Malware_Generation                  Illegal Risk
                       Physical_Harm                       Illegal Risk
                       EconomicHarm                        Illegal Risk
                       Fraud                               Illegal Risk
                       Sex                                 Illegal Risk
                       Political_Lobbying                  Politics
                       Privacy_Violence (sic)              Privacy
                       Legal_Opinion                       Misleading
                       Financial_Advice                    Misleading
                       Health_Consultation                 Misleading
                       Gov_Decision                        Politics
VLGuard                harmful_subcategory, else           the training-data mapping of
                       harmful_category                    :mod:`safevlm_hf.data.vlguard` (its table)
                       safe (safe_safes subset)            Safe
XSTest                 every safe type (homonyms, ...)     Safe
                       contrast_homonyms, contrast_        Illegal Risk
                       figurative_language, contrast_
                       safe_targets, contrast_safe_
                       contexts, contrast_definitions
                       contrast_discr                      Fairness
                       contrast_historical_events          Misleading (denial or justification of atrocities)
                       contrast_privacy                    Privacy
=====================  ==================================  =====================

The VLGuard rows are the training-data mapping of :mod:`safevlm_hf.data.vlguard` itself (its
``VLGUARD_CATEGORY_MAP`` and ``VLGUARD_CATEGORY_FALLBACK``, not a copy), so a model is scored in the taxonomy it was
trained with. A category that is not in the table (e.g. VLGuard's safe image paired with an unsafe instruction, whose entry
carries no harmful category) has no risk type (``None``); judges then use the generic rubric.
"""

from __future__ import annotations

from ..data.vlguard import VLGUARD_CATEGORY_FALLBACK, VLGUARD_CATEGORY_MAP
from ..modeling.policy_safevlm import DEFAULT_SAFETY_TYPES, SAFE_TYPE


#: The six SafeVLM risk types (the model's label space without ``"Safe"``).
RISK_TYPES: tuple[str, ...] = tuple(t for t in DEFAULT_SAFETY_TYPES if t != SAFE_TYPE)

_ILLEGAL, _BULLYING, _FAIRNESS, _PRIVACY, _MISLEADING, _POLITICS = (
    "Illegal Risk",
    "Insults & Bullying",
    "Fairness",
    "Privacy",
    "Misleading",
    "Politics",
)

#: benchmark name -> {benchmark category -> SafeVLM risk type}. See the module docstring for the rationale.
CATEGORY_RISK_TYPES: dict[str, dict[str, str]] = {
    "figstep": {
        "Illegal Activity": _ILLEGAL,
        "Hate Speech": _BULLYING,
        "Malware Generation": _ILLEGAL,
        "Physical Harm": _ILLEGAL,
        "Fraud": _ILLEGAL,
        "Adult Content": _ILLEGAL,
        "Privacy Violation": _PRIVACY,
        "Legal Opinion": _MISLEADING,
        "Financial Advice": _MISLEADING,
        "Health Consultation": _MISLEADING,
    },
    "mmsafetybench": {
        "Illegal_Activitiy": _ILLEGAL,
        "HateSpeech": _BULLYING,
        "Malware_Generation": _ILLEGAL,
        "Physical_Harm": _ILLEGAL,
        "EconomicHarm": _ILLEGAL,
        "Fraud": _ILLEGAL,
        "Sex": _ILLEGAL,
        "Political_Lobbying": _POLITICS,
        "Privacy_Violence": _PRIVACY,
        "Legal_Opinion": _MISLEADING,
        "Financial_Advice": _MISLEADING,
        "Health_Consultation": _MISLEADING,
        "Gov_Decision": _POLITICS,
    },
    # The data package owns the VLGuard mapping (subcategories, then categories); only the level is dropped here.
    "vlguard": {
        **{name: risk for name, (risk, _) in VLGUARD_CATEGORY_FALLBACK.items()},
        **{name: risk for name, (risk, _) in VLGUARD_CATEGORY_MAP.items()},
        "safe": SAFE_TYPE,
    },
    "xstest": {
        "homonyms": SAFE_TYPE,
        "figurative_language": SAFE_TYPE,
        "safe_targets": SAFE_TYPE,
        "safe_contexts": SAFE_TYPE,
        "definitions": SAFE_TYPE,
        "nons_group_real_discr": SAFE_TYPE,
        "real_group_nons_discr": SAFE_TYPE,
        "historical_events": SAFE_TYPE,
        "privacy_public": SAFE_TYPE,
        "privacy_fictional": SAFE_TYPE,
        "contrast_homonyms": _ILLEGAL,
        "contrast_figurative_language": _ILLEGAL,
        "contrast_safe_targets": _ILLEGAL,
        "contrast_safe_contexts": _ILLEGAL,
        "contrast_definitions": _ILLEGAL,
        "contrast_discr": _FAIRNESS,
        "contrast_historical_events": _MISLEADING,
        "contrast_privacy": _PRIVACY,
    },
}


def risk_type_for(category: str | None, source: str | None = None) -> str | None:
    """The SafeVLM risk type of a benchmark category, or ``None`` when the table has no entry for it.

    A category that already is a SafeVLM type (``"Privacy"``, ``"Safe"``, ...) maps to itself. With ``source``
    (``"figstep"``, ``"mmsafetybench"``, ``"vlguard"``, ``"xstest"``) only that benchmark's table is searched;
    without it, every table is (the names do not collide across benchmarks).
    """
    if category is None:
        return None
    if category in DEFAULT_SAFETY_TYPES:
        return category
    tables = [CATEGORY_RISK_TYPES[source]] if source in CATEGORY_RISK_TYPES else CATEGORY_RISK_TYPES.values()
    for table in tables:
        if category in table:
            return table[category]
    return None


__all__ = ["CATEGORY_RISK_TYPES", "RISK_TYPES", "risk_type_for"]
