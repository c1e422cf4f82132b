# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""Stage II conditioning data: assistant turns rewritten to follow the safety policy.

Stage II teaches the LLM to act on the safety verdict. Each row's label (risk type, level) is resolved through the
:class:`~safevlm_hf.SafetyPolicy` exactly as ``generate()`` resolves the head's verdict, and every assistant turn of
the row becomes:

* ``"refuse"``: the policy's refusal message, which spells out the reason (e.g. "I'm sorry, but I can't help with
  this request. It involves someone's personal or private information. (Risk: Privacy, level 2 - ...)");
* ``"caution"``: the policy's caution prefix followed by the row's own answer (the careful answer);
* ``"answer"``: the row's answer, unchanged.

Rows of unknown type (e.g. VLGuard's unsafe instructions on safe images) are resolved as the ``"Safe"`` type at
their level, i.e. by the generic per-level rules, with the policy's generic reason.
"""

from __future__ import annotations

from typing import Sequence

from ..data.examples import SafetyDataset, SafetyExample
from ..modeling.policy_safevlm import SAFE_TYPE, SafetyPolicy


def policy_action(
    example: SafetyExample, policy: SafetyPolicy, safety_types: Sequence[str], profile: str | None = None
) -> tuple[str, str]:
    """``(action, category)`` the policy gives the example's labels under ``profile``."""
    if example.safe_type is None:
        if SAFE_TYPE not in safety_types:
            raise ValueError(
                f"{example.location}: the row has no risk type and the label list {list(safety_types)} has no "
                f"{SAFE_TYPE!r} type to fall back on; give the row a safe_type."
            )
        category = SAFE_TYPE
    else:
        category = safety_types[example.safe_type]
    return policy.action(category, example.safe_level, profile), category


def condition_example(
    example: SafetyExample,
    policy: SafetyPolicy,
    safety_types: Sequence[str],
    safety_levels: Sequence[str],
    profile: str | None = None,
) -> SafetyExample:
    """The example with its assistant turns rewritten to follow ``policy`` (see the module docstring)."""
    action, category = policy_action(example, policy, safety_types, profile)
    if action == "answer":
        return example
    message = policy.message(action, category, example.safe_level, safety_levels[example.safe_level], profile)
    messages = []
    for turn in example.messages:
        if turn["role"] == "assistant":
            if action == "refuse":
                content = message
            elif turn["content"].startswith(message.rstrip()):
                content = turn["content"]  # already conditioned: never stack a second prefix
            else:
                # The gate forces the caution prefix and lets the model continue: train on prefix + careful answer.
                separator = "" if not message or message[-1].isspace() else " "
                content = message + separator + turn["content"]
            turn = {"role": "assistant", "content": content}
        messages.append(turn)
    return example.with_messages(messages)


def condition_on_policy(
    dataset: SafetyDataset,
    policy: SafetyPolicy | dict | str | None,
    safety_types: Sequence[str],
    safety_levels: Sequence[str],
    profile: str | None = None,
) -> SafetyDataset:
    """A copy of ``dataset`` whose assistant turns follow ``policy`` (``None``: the default policy).

    Args:
        dataset: the labelled rows.
        policy: a :class:`SafetyPolicy`, its dict or JSON, or ``None``.
        safety_types / safety_levels: the model's label lists (``config.safety_types``, ``config.safety_levels``).
        profile: the policy profile to resolve actions under (default: the policy's default profile).
    """
    policy = SafetyPolicy.coerce(policy, safety_types, len(safety_levels))
    if profile is not None:
        policy.profile_info(profile)  # an unknown profile fails here, listing the known ones
    return dataset.map_examples(lambda e: condition_example(e, policy, safety_types, safety_levels, profile))


__all__ = ["condition_example", "condition_on_policy", "policy_action"]
