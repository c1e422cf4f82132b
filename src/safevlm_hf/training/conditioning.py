# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""Stage II conditioning data: assistant turns rewritten to follow the safety policy.

Stage II teaches the LLM to act on the safety verdict. Each row's labels (risk type, sub-category when the row has
one, level) are resolved through the :class:`~safevlm_hf.SafetyPolicy` exactly as ``generate()`` resolves the head's
verdict, and every assistant turn of the row is rewritten for the response mode ``generate()`` will use:

* ``"template"`` (the gate forces the policy's text):
  * ``"refuse"``: the policy's refusal message, which spells out the reason;
  * ``"caution"``: the policy's caution prefix followed by the row's own answer (the careful answer);
* ``"guided"`` (as the SafeVLM reference code conditions the LLM on the verdict): the turn opens with the policy's
  hint, as context only (``"context"``: shown to the model, never a training target, the place where ``generate()``
  inserts it), and the target is what the gate forces plus what the model must write itself:
  * ``"refuse"``: the refusal lead, then the reason in the model's own words (the policy's reason here);
  * ``"caution"``: the caution lead, the reason, then the row's careful answer;
  * ``"decide"``: a refusal when the row's own answer is one (judged by the refusal judge), a caution otherwise;
* ``"answer"``: the row's answer, unchanged.

Rows of unknown type (e.g. VLGuard's unsafe instructions on safe images) are resolved as the ``"Safe"`` type at
their level, i.e. by the generic per-level rules, with the policy's generic reason.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Sequence

from ..data.examples import NO_SUBCATEGORY, SafetyDataset, SafetyExample
from ..modeling.policy_safevlm import RESPONSE_MODES, SAFE_TYPE, SafetyPolicy


if TYPE_CHECKING:
    from ..evaluation.judges import StringMatchJudge


def policy_action(
    example: SafetyExample, policy: SafetyPolicy, safety_types: Sequence[str], profile: str | None = None
) -> tuple[str, str, str | None]:
    """``(action, category, sub-category)`` the policy gives the example's labels under ``profile``."""
    if example.safe_type is None:
        if SAFE_TYPE not in safety_types:
            raise ValueError(
                f"{example.location}: the row has no risk type and the label list {list(safety_types)} has no "
                f"{SAFE_TYPE!r} type to fall back on; give the row a safe_type."
            )
        category = SAFE_TYPE
    else:
        category = safety_types[example.safe_type]
    subcategory = example.safe_subcategory if example.safe_subcategory not in (None, NO_SUBCATEGORY) else None
    return policy.action(category, example.safe_level, profile, subcategory), category, subcategory


def _joined(*parts: str) -> str:
    text = ""
    for part in parts:
        if part:
            text = part if not text else text + ("" if text[-1].isspace() else " ") + part
    return text


@functools.cache
def _refusal_judge() -> StringMatchJudge:
    """The measured refusal judge (see its README for its error), built once: it compiles its rules when built, and
    its ``match`` keeps no state between answers."""
    from ..evaluation.judges import StringMatchJudge

    return StringMatchJudge()


def _is_refusal(answer: str) -> bool:
    return _refusal_judge().match(answer) is not None


def condition_example(
    example: SafetyExample,
    policy: SafetyPolicy,
    safety_types: Sequence[str],
    safety_levels: Sequence[str],
    profile: str | None = None,
    response: str = "template",
) -> SafetyExample:
    """The example with its assistant turns rewritten to follow ``policy`` in ``response`` mode (see above)."""
    if response not in RESPONSE_MODES:
        raise ValueError(f"response must be one of {list(RESPONSE_MODES)}, got {response!r}.")
    action, category, subcategory = policy_action(example, policy, safety_types, profile)
    if action == "answer":
        return example
    level, level_name = example.safe_level, safety_levels[example.safe_level]
    fields = (category, level, level_name, profile, subcategory)
    messages = []
    for turn in example.messages:
        if turn["role"] == "assistant":
            turn = (
                _template_turn(turn["content"], action, policy, fields)
                if response == "template"
                else _guided_turn(turn["content"], action, policy, fields)
            )
        messages.append(turn)
    return example.with_messages(messages)


def _template_turn(answer: str, action: str, policy: SafetyPolicy, fields: tuple) -> dict[str, str]:
    message = policy.message(action, *fields)
    if action != "caution":  # refuse, and decide (a refusal in template mode)
        return {"role": "assistant", "content": message}
    if answer.startswith(message.rstrip()):
        return {"role": "assistant", "content": answer}  # already conditioned: never stack a second prefix
    # The gate forces the caution prefix and lets the model continue: train on prefix + careful answer.
    return {"role": "assistant", "content": _joined(message, answer)}


def _guided_turn(answer: str, action: str, policy: SafetyPolicy, fields: tuple) -> dict[str, str]:
    reason = policy.reason(fields[0], fields[4])
    if action == "decide":
        choice = "refuse" if _is_refusal(answer) else "caution"
    else:
        choice = action
    lead = policy.lead(choice, *fields)
    content = _joined(lead, reason) if choice == "refuse" else _joined(lead, reason, answer)
    # The model reads the hint, one space, then the answer: as generate() appends the encoded hint and lead.
    return {"role": "assistant", "content": content, "context": policy.hint(action, *fields) + " "}


def condition_on_policy(
    dataset: SafetyDataset,
    policy: SafetyPolicy | dict | str | None,
    safety_types: Sequence[str],
    safety_levels: Sequence[str],
    profile: str | None = None,
    response: str | None = None,
    subcategories: Sequence[str] | None = None,
) -> SafetyDataset:
    """A copy of ``dataset`` whose assistant turns follow ``policy`` (``None``: the default policy).

    Args:
        dataset: the labelled rows.
        policy: a :class:`SafetyPolicy`, its dict or JSON, or ``None``.
        safety_types / safety_levels / subcategories: the model's label lists (``config.safety_types``, ...).
        profile: the policy profile to resolve actions under (default: the policy's default profile).
        response: ``"template"`` or ``"guided"`` (default: the policy's ``response``).
    """
    policy = SafetyPolicy.coerce(policy, safety_types, len(safety_levels), safety_levels, subcategories)
    profile = policy.check_profile(profile)  # an unknown profile fails here, listing the known ones
    response = policy.check_response(response)
    return dataset.map_examples(lambda e: condition_example(e, policy, safety_types, safety_levels, profile, response))


__all__ = ["condition_example", "condition_on_policy", "policy_action"]
