# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""Graded safety policies and verdicts for SafeVLM.

A policy maps (risk type or sub-category, risk level, profile) to one of four actions:

* ``"answer"``  - the model answers freely;
* ``"caution"`` - the model answers carefully, after a short explanatory prefix;
* ``"refuse"``  - the model refuses and says why;
* ``"decide"``  - (below the top level) in guided mode the model chooses between answering carefully and refusing;
  in template mode it refuses.

and to one of two response modes (per policy, overridable per call):

* ``"template"`` - the gate forces the policy's whole message (refusal + EOS, or the caution prefix);
* ``"guided"``   - the verdict goes into the model's context as a hint, and the gate forces only a short lead
  (``messages.lead``); a refusal then ends within ``guided.refusal_budget`` tokens.

This file travels inside every checkpoint (it is imported by the configuration and modeling files), so it imports
only the standard library.

Policy dict schema (``config.safety_policy``; every key but ``levels`` is optional, and policies written before a key
existed load unchanged)::

    {
      "version": 1,
      "default_profile": "default",
      "response": "template",                                                    # or "guided"
      "levels": {"0": "answer", "1": "caution", "2": "refuse", "3": "refuse"},   # one action per level
      "types": {"Illegal Risk": {"1": "refuse", "2": "refuse"},                  # per-type overrides,
                "Illegal Risk/Sexual content": {"1": "refuse"}},                  # per-sub-category overrides
      "profiles": {
        "adult": {"description": "...", "levels": {"2": "caution"}},
        "adult_eu": {"extends": "adult", "region": "EU", "types": {"Illegal Risk/Sexual content": {"2": "caution"}}},
      },
      "messages": {
        "refuse":  {"default": "...{reason}...", "types": {"Privacy": {"default": "...", "levels": {"3": "..."}}}},
        "caution": {"default": "...{reason}..."},
        "reasons": {"Politics": "...", "Illegal Risk/Sexual content": "...", ...},
        "unassessed": "...",                         # the refusal given when no verdict could be computed
        "hint": {"refuse": "...", "caution": "...", "decide": "..."},   # guided mode: the hint in the context
        "lead": {"refuse": "...", "caution": "..."},                     # guided mode: what the gate forces
      },
      "guided": {"refusal_budget": 48},              # guided mode: tokens a refusal may take after its lead
    }

Templates may use the plain placeholders ``{category} {level} {level_name} {reason} {profile}`` (no conversions or
format specs); every template is formatted with sample values when the policy is validated.

Resolution of an action, most specific wins: the generic ``levels`` table (base, then each profile from the root of
its ``extends`` chain to the profile itself), then the per-type ``types`` rules in the same order, then the
per-sub-category rules. So relaxing level 2 for adults does not relax a type kept strict at the base, and a region
profile that relaxes ``"Illegal Risk/Sexual content"`` relaxes nothing else of ``"Illegal Risk"``. The highest level
(3 by default) is always ``"refuse"``: no table may say otherwise. A policy may be stricter than the default anywhere,
down to refusing at level 0.
"""

from __future__ import annotations

import copy
import json
import math
import string
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping, Sequence


ACTIONS: tuple[str, ...] = ("answer", "caution", "refuse", "decide")
MESSAGE_ACTIONS: tuple[str, ...] = ("caution", "refuse")
RESPONSE_MODES: tuple[str, ...] = ("template", "guided")
TEMPLATE_FIELDS: frozenset[str] = frozenset({"category", "level", "level_name", "reason", "profile"})
SUBCATEGORY_SEPARATOR = "/"
UNASSESSED_CATEGORY = "Unassessed"

DEFAULT_SAFETY_TYPES: tuple[str, ...] = (
    "Politics",
    "Illegal Risk",
    "Insults & Bullying",
    "Fairness",
    "Privacy",
    "Misleading",
    "Safe",
)
DEFAULT_SAFETY_LEVELS: tuple[str, ...] = (
    "safe to answer",
    "answer carefully",
    "answer or reject",
    "reject",
)
# Sub-categories a new SafeVLM predicts besides its type (policies can address them); checkpoints saved without one
# keep working with none.
DEFAULT_SAFETY_SUBCATEGORIES: tuple[str, ...] = ("Illegal Risk/Sexual content",)
SAFE_TYPE = "Safe"
DEFAULT_REFUSAL_BUDGET = 48

_DEFAULT_POLICY: dict[str, Any] = {
    "version": 1,
    "default_profile": "default",
    "levels": {"0": "answer", "1": "caution", "2": "refuse", "3": "refuse"},
    # Illegal content is strict by default; sexual content, a sub-category of it, is relaxed only by a regional adult
    # profile, and relaxing it relaxes nothing else of "Illegal Risk".
    "types": {
        "Illegal Risk": {"1": "refuse", "2": "refuse"},
        "Illegal Risk/Sexual content": {"1": "refuse", "2": "refuse"},
    },
    "profiles": {
        "default": {"description": "General audience: level 2 is refused, level 1 answered with care."},
        "adult": {
            "description": "Verified adults: level 2 is answered with care, except for types kept strict.",
            "levels": {"2": "caution"},
        },
        "minor": {
            "description": "Users under 18: every risky request (level 1 and above) is refused.",
            "levels": {"1": "refuse", "2": "refuse"},
        },
        "adult_eu_pegi": {
            "description": (
                "Adults in a region with an age-rating system (PEGI 18): sexual content that the rating allows is "
                "answered with care at levels 1-2; other illegal content stays refused."
            ),
            "extends": "adult",
            "region": "EU",
            "types": {"Illegal Risk/Sexual content": {"1": "caution", "2": "caution"}},
        },
        "minor_eu_pegi": {
            "description": "Minors in a PEGI region: as `minor`, and misleading content is refused too.",
            "extends": "minor",
            "region": "EU",
            "types": {"Misleading": {"1": "refuse"}},
        },
    },
    "messages": {
        "refuse": {
            "default": (
                "I'm sorry, but I can't help with this request. {reason} "
                "(Risk: {category}, level {level} - {level_name}.)"
            ),
        },
        "caution": {
            "default": "Note: {reason} I will answer carefully and leave out anything harmful. ",
        },
        "reasons": {
            "Politics": "It involves politically sensitive content.",
            "Illegal Risk": "It involves illegal content, such as violent material, crime or drugs.",
            "Illegal Risk/Sexual content": "It involves sexual content.",
            "Insults & Bullying": "It involves insults, bullying or hateful content.",
            "Fairness": "It involves prejudice or discrimination.",
            "Privacy": "It involves someone's personal or private information.",
            "Misleading": "It involves false rumors or misleading content.",
            "Safe": "This deployment's policy does not allow answering at this risk level.",
        },
        "unassessed": "I'm sorry, but I can't help with this request: its safety could not be assessed.",
        "hint": {
            "refuse": "[Safety: {category}, level {level} ({level_name}). {reason} Refuse and briefly explain why.]",
            "caution": "[Safety: {category}, level {level} ({level_name}). {reason} Answer carefully, leave out "
            "anything harmful.]",
            "decide": "[Safety: {category}, level {level} ({level_name}). {reason} Answer carefully, or refuse if "
            "the request cannot be answered safely.]",
        },
        "lead": {"refuse": "I'm sorry, but I can't help with this.", "caution": "Note:"},
    },
    "guided": {"refusal_budget": DEFAULT_REFUSAL_BUDGET},
}
_SAMPLE_FIELDS = {"category": "Privacy", "level": 2, "level_name": "answer or reject", "reason": "R.", "profile": "p"}


def default_safety_policy(
    safety_types: Sequence[str] | None = None,
    num_levels: int | None = None,
    subcategories: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Return a fresh copy of the default policy dict (safe to mutate).

    With a custom taxonomy (``safety_types``, ``subcategories``), rules and reasons for labels it lacks are dropped;
    with another number of levels, level 0 answers, level 1 is answered with caution and every higher level is
    refused. Either way the default stays valid for the label space.
    """
    policy = copy.deepcopy(_DEFAULT_POLICY)
    if num_levels is not None and num_levels != len(DEFAULT_SAFETY_LEVELS):
        policy["levels"] = {str(i): ("answer", "caution", "refuse")[min(i, 2)] for i in range(num_levels)}
        policy["levels"][str(num_levels - 1)] = "refuse"

        def keep(table: dict[str, str]) -> dict[str, str]:
            return {k: v for k, v in table.items() if int(k) < num_levels - 1}

        policy["types"] = {t: keep(v) for t, v in policy["types"].items()}
        for entry in policy["profiles"].values():
            if "levels" in entry:
                entry["levels"] = keep(entry["levels"])
            if "types" in entry:
                entry["types"] = {t: keep(v) for t, v in entry["types"].items()}
    known = set(safety_types if safety_types is not None else DEFAULT_SAFETY_TYPES)
    known |= set(subcategories if subcategories is not None else DEFAULT_SAFETY_SUBCATEGORIES)
    policy["types"] = {t: v for t, v in policy["types"].items() if t in known}
    for entry in policy["profiles"].values():
        if "types" in entry:
            entry["types"] = {t: v for t, v in entry["types"].items() if t in known}
    reasons = policy["messages"]["reasons"]
    policy["messages"]["reasons"] = {t: v for t, v in reasons.items() if t in known}
    return policy


class SafetyPolicyError(ValueError):
    """Raised for an invalid safety policy; the message names the offending key."""


@dataclass(frozen=True)
class SafetyVerdict:
    """The safety head's verdict for one row, resolved through a policy.

    Attributes:
        category: the most probable risk type label (one of ``config.safety_types``), or ``"Unassessed"``.
        level: the most probable risk level (0 = safe to answer ... 3 = reject).
        action: ``"answer"``, ``"caution"``, ``"refuse"`` or ``"decide"``.
        message: the text forced at the start of the answer in template mode (empty for ``"answer"``).
        type_probs: risk-type label -> probability.
        level_probs: level -> probability.
        profile: the policy profile the action was resolved under.
        subcategory: the predicted sub-category (``"Type/Sub"``) when the head predicts one within ``category``.
        subcategory_prob: its probability.
        assessed: ``False`` when the head's output could not be trusted (non-finite); the action is then
            ``"refuse"`` with the policy's ``unassessed`` message.
        response: the response mode the verdict is enforced in (``"template"`` or ``"guided"``).
        decision: what the model chose for a ``"decide"`` verdict in guided mode (``"caution"`` or ``"refuse"``);
            filled in by ``generate``.
    """

    category: str
    level: int
    action: str
    message: str
    type_probs: dict[str, float] = field(default_factory=dict)
    level_probs: dict[int, float] = field(default_factory=dict)
    profile: str = "default"
    subcategory: str | None = None
    subcategory_prob: float | None = None
    assessed: bool = True
    response: str = "template"
    decision: str | None = None

    @property
    def refused(self) -> bool:
        """Whether the answer is a refusal (a ``"decide"`` verdict counts once the model chose to refuse)."""
        return self.action == "refuse" or (self.action == "decide" and self.decision in (None, "refuse"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_decision(self, decision: str) -> "SafetyVerdict":
        return replace(self, decision=decision)


# ------------------------------------------------------------------------------------------------ validation
def _check_mapping(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise SafetyPolicyError(f"{path}: expected a dict, got {type(value).__name__} ({value!r}).")
    return value


def _check_keys(value: Mapping[str, Any], allowed: Sequence[str], path: str) -> None:
    for key in value:
        if key not in allowed:
            raise SafetyPolicyError(f"{path}.{key}: unknown key; allowed keys are {sorted(allowed)}.")


def _check_template(template: Any, path: str) -> str:
    """A template is a non-empty string with plain `{field}` placeholders only; it must format with sample values."""
    if not isinstance(template, str) or not template.strip():
        raise SafetyPolicyError(f"{path}: a message template must be a non-empty string, got {template!r}.")
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as err:
        raise SafetyPolicyError(f"{path}: malformed template ({err}).") from None
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if name not in TEMPLATE_FIELDS:
            raise SafetyPolicyError(
                f"{path}: unknown placeholder(s) {[name]}; templates may use {sorted(TEMPLATE_FIELDS)}."
            )
        if spec or conversion:
            raise SafetyPolicyError(
                f"{path}: placeholder {{{name}}} has a conversion or format spec ({conversion or ''}{spec or ''}); "
                "use the plain form {" + name + "}."
            )
    try:
        template.format(**_SAMPLE_FIELDS)
    except (ValueError, KeyError, IndexError, AttributeError) as err:
        raise SafetyPolicyError(f"{path}: the template does not format ({err!r}).") from None
    return template


def _normalized_levels(table: Any, path: str, num_levels: int) -> dict[str, Any]:
    """`{" 2": x}` -> `{"2": x}`; two keys naming the same level are an error (the last would silently win)."""
    table = _check_mapping(table, path)
    out: dict[str, Any] = {}
    origin: dict[str, Any] = {}
    for key, value in table.items():
        try:
            level = int(str(key).strip())
        except (TypeError, ValueError):
            raise SafetyPolicyError(
                f"{path}.{key}: level key is not an integer; use '0'..'{num_levels - 1}'."
            ) from None
        if not 0 <= level < num_levels or isinstance(key, bool):
            raise SafetyPolicyError(f"{path}.{key}: unknown level {key!r}; levels are '0'..'{num_levels - 1}'.")
        name = str(level)
        if name in out:
            raise SafetyPolicyError(
                f"{path}: keys {origin[name]!r} and {key!r} both name level {level}; give each level once."
            )
        out[name], origin[name] = value, key
    return out


class SafetyPolicy:
    """A validated, immutable safety policy, bound to a model's label space.

    Build one with :meth:`from_dict` / :meth:`from_json` (or :meth:`default`). ``safety_types``, ``num_levels``,
    ``level_names`` and ``subcategories`` bind the policy to a model's labels; the model binds the policy it is given
    (see :meth:`coerce`), once per call.
    """

    def __init__(
        self,
        policy: Mapping[str, Any] | None = None,
        safety_types: Sequence[str] | None = None,
        num_levels: int | None = None,
        level_names: Sequence[str] | None = None,
        subcategories: Sequence[str] | None = None,
    ) -> None:
        if num_levels is None:
            num_levels = len(level_names) if level_names is not None else len(DEFAULT_SAFETY_LEVELS)
        if level_names is not None and len(level_names) != num_levels:
            raise SafetyPolicyError(f"{len(level_names)} level names given for {num_levels} levels.")
        if policy is None:
            policy = default_safety_policy(safety_types, num_levels, subcategories)
        self.safety_types = tuple(safety_types) if safety_types is not None else None
        self.num_levels = int(num_levels)
        self.level_names = tuple(level_names) if level_names is not None else None
        self.subcategories = tuple(subcategories) if subcategories is not None else None
        self._policy = self._validated(copy.deepcopy(dict(_check_mapping(policy, "safety_policy"))))

    # ----------------------------------------------------------------------------------------------- construction
    @classmethod
    def default(
        cls,
        safety_types: Sequence[str] | None = None,
        num_levels: int | None = None,
        level_names: Sequence[str] | None = None,
        subcategories: Sequence[str] | None = None,
    ) -> "SafetyPolicy":
        return cls(None, safety_types, num_levels, level_names, subcategories)

    @classmethod
    def from_dict(
        cls,
        policy: Mapping[str, Any],
        safety_types: Sequence[str] | None = None,
        num_levels: int | None = None,
        level_names: Sequence[str] | None = None,
        subcategories: Sequence[str] | None = None,
    ) -> "SafetyPolicy":
        return cls(_check_mapping(policy, "safety_policy"), safety_types, num_levels, level_names, subcategories)

    @classmethod
    def from_json(cls, text: str, *labels: Any, **label_kwargs: Any) -> "SafetyPolicy":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise SafetyPolicyError(f"safety_policy: not valid JSON ({err}).") from None
        except RecursionError:
            raise SafetyPolicyError("safety_policy: the JSON nests too deeply.") from None
        return cls.from_dict(data, *labels, **label_kwargs)

    @classmethod
    def coerce(
        cls,
        policy: "SafetyPolicy | Mapping[str, Any] | str | None",
        safety_types: Sequence[str],
        num_levels: int,
        level_names: Sequence[str] | None = None,
        subcategories: Sequence[str] | None = None,
    ) -> "SafetyPolicy":
        """A policy bound to this label space from a policy object, dict, JSON string or ``None`` (the default).

        A policy already bound to the same labels is returned as it is (validated once).
        """
        labels = (
            tuple(safety_types),
            int(num_levels),
            tuple(level_names) if level_names is not None else None,
            tuple(subcategories) if subcategories is not None else None,
        )
        if isinstance(policy, SafetyPolicy):
            if (policy.safety_types, policy.num_levels, policy.level_names, policy.subcategories) == labels:
                return policy
            policy = policy.to_dict()
        if isinstance(policy, str):
            return cls.from_json(policy, *labels)
        return cls(policy, *labels)

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._policy)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self._policy, indent=indent, sort_keys=False)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SafetyPolicy) and self._policy == other._policy

    def __repr__(self) -> str:
        return f"SafetyPolicy(profiles={self.profiles}, default_profile={self.default_profile!r})"

    # ---------------------------------------------------------------------------------------------------- queries
    @property
    def default_profile(self) -> str:
        return self._policy.get("default_profile", "default")

    @property
    def response(self) -> str:
        """The policy's response mode (``"template"`` unless the policy says ``"guided"``)."""
        return self._policy.get("response", "template")

    @property
    def refusal_budget(self) -> int:
        """Guided mode: how many tokens a refusal may take after its lead before EOS is forced."""
        return int(self._policy.get("guided", {}).get("refusal_budget", DEFAULT_REFUSAL_BUDGET))

    @property
    def profiles(self) -> list[str]:
        names = list(self._policy.get("profiles", {}))
        return names if "default" in names else ["default", *names]

    def check_profile(self, profile: str | None) -> str:
        """The profile name to use (``None``: the default profile); raises listing the known ones if unknown."""
        profile = self.default_profile if profile is None else profile
        if profile not in self.profiles:
            raise SafetyPolicyError(f"unknown safety profile {profile!r}; known profiles: {self.profiles}.")
        return profile

    def check_response(self, response: str | None) -> str:
        """The response mode to use (``None``: the policy's); raises naming the modes if unknown."""
        response = self.response if response is None else response
        if response not in RESPONSE_MODES:
            raise SafetyPolicyError(f"unknown safety response mode {response!r}; modes are {list(RESPONSE_MODES)}.")
        return response

    def profile_info(self, profile: str) -> dict[str, Any]:
        """The profile's own entry (description, region, extends, overrides)."""
        return copy.deepcopy(self._policy.get("profiles", {}).get(self.check_profile(profile), {}))

    def action(self, category: str, level: int, profile: str | None = None, subcategory: str | None = None) -> str:
        """Resolve the action for a (risk type, level) pair, or a sub-category of the type, under ``profile``."""
        profile = self.check_profile(profile)
        self._check_type(category, "category")
        if not 0 <= int(level) < self.num_levels:
            raise SafetyPolicyError(f"level {level!r} is out of range; levels are 0..{self.num_levels - 1}.")
        chain = [self._policy, *self._profile_chain(profile)]
        return self._resolve(chain, str(int(level)), category, subcategory)

    def _resolve(self, chain, key: str, category: str, subcategory: str | None) -> str:
        action = None
        for entry in chain:  # generic tables: base then profiles, root first
            action = entry.get("levels", {}).get(key, action)
        names = [category] + ([subcategory] if self._in_type(subcategory, category) else [])
        for name in names:  # per-type rules beat generic ones, per-sub-category rules beat per-type ones
            specific = None
            for entry in chain:
                specific = entry.get("types", {}).get(name, {}).get(key, specific)
            action = specific if specific is not None else action
        return action

    def action_table(
        self, profile: str | None = None, safety_types: Sequence[str] | None = None
    ) -> dict[str, list[str]]:
        """``{risk type or sub-category: [action at level 0, 1, ...]}`` for documentation and model cards."""
        types = list(safety_types or self.safety_types or DEFAULT_SAFETY_TYPES)
        rows = {t: [self.action(t, lvl, profile) for lvl in range(self.num_levels)] for t in types}
        for sub in self.subcategories or ():
            parent = sub.split(SUBCATEGORY_SEPARATOR, 1)[0]
            if parent in rows:
                rows[sub] = [self.action(parent, lvl, profile, sub) for lvl in range(self.num_levels)]
        return rows

    def reason(self, category: str, subcategory: str | None = None) -> str:
        """The sentence that says why a request of this type (or sub-category of it) is risky."""
        reasons = self._policy.get("messages", {}).get("reasons", {})
        defaults = _DEFAULT_POLICY["messages"]["reasons"]
        named = subcategory if self._in_type(subcategory, category) else None
        return (
            (reasons.get(named) if named else None)
            or reasons.get(category)
            or (defaults.get(named) if named else None)
            or defaults.get(category)
            or f"It was assessed as {category} content."
        )

    def _fields(self, category: str, level: int, level_name: str, profile: str | None, subcategory: str | None):
        named = subcategory if self._in_type(subcategory, category) else None
        return {
            "category": named or category,
            "level": int(level),
            "level_name": level_name,
            "reason": self.reason(category, subcategory),
            "profile": self.default_profile if profile is None else profile,
        }

    def message(
        self,
        action: str,
        category: str,
        level: int,
        level_name: str = "",
        profile: str | None = None,
        subcategory: str | None = None,
    ) -> str:
        """The text template mode forces for ``action`` (empty for ``"answer"``), with the reason spelled out.

        ``"decide"`` is enforced as a refusal in template mode.
        """
        if action == "answer":
            return ""
        if action not in ACTIONS:
            raise SafetyPolicyError(f"action {action!r} is unknown; actions are {list(ACTIONS)}.")
        action = "refuse" if action == "decide" else action
        table = self._policy.get("messages", {}).get(action, {})
        typed = {}
        for name in (category, subcategory if self._in_type(subcategory, category) else None):
            if name is not None and name in table.get("types", {}):
                typed = table["types"][name]
        template = typed.get("levels", {}).get(str(int(level))) or typed.get("default") or table.get("default")
        template = template or _DEFAULT_POLICY["messages"][action]["default"]
        return template.format(**self._fields(category, level, level_name, profile, subcategory))

    def hint(
        self,
        action: str,
        category: str,
        level: int,
        level_name: str = "",
        profile: str | None = None,
        subcategory: str | None = None,
    ) -> str:
        """Guided mode: the hint put into the model's context for ``action`` (empty for ``"answer"``).

        Hints and leads are stripped: the model reads the hint, a space, then the lead (as Stage II renders them).
        """
        if action == "answer":
            return ""
        hints = self._policy.get("messages", {}).get("hint", {})
        template = hints.get(action) or _DEFAULT_POLICY["messages"]["hint"][action]
        return template.format(**self._fields(category, level, level_name, profile, subcategory)).strip()

    def lead(
        self,
        action: str,
        category: str,
        level: int,
        level_name: str = "",
        profile: str | None = None,
        subcategory: str | None = None,
    ) -> str:
        """Guided mode: the short lead the gate forces for ``"refuse"`` or ``"caution"``."""
        if action not in MESSAGE_ACTIONS:
            raise SafetyPolicyError(f"only {list(MESSAGE_ACTIONS)} have a lead, not {action!r}.")
        leads = self._policy.get("messages", {}).get("lead", {})
        template = leads.get(action) or _DEFAULT_POLICY["messages"]["lead"][action]
        return template.format(**self._fields(category, level, level_name, profile, subcategory)).strip()

    def decide(
        self,
        type_probs: Sequence[float],
        level_probs: Sequence[float],
        profile: str | None = None,
        subcategory_probs: Sequence[float] | None = None,
        response: str | None = None,
    ) -> SafetyVerdict:
        """Turn one row of head probabilities into a :class:`SafetyVerdict` (argmax type, argmax level).

        ``subcategory_probs`` has one entry per bound sub-category plus a leading "none"; the predicted sub-category
        counts only when it belongs to the predicted type. Non-finite or out-of-range probabilities give an
        unassessed verdict: a refusal, never an answer.
        """
        profile = self.check_profile(profile)
        response = self.check_response(response)
        types, levels = self._bound_labels()
        if len(type_probs) != len(types) or len(level_probs) != len(levels):
            raise SafetyPolicyError(
                f"head outputs ({len(type_probs)} types, {len(level_probs)} levels) do not match the label lists "
                f"({len(types)} types, {len(levels)} levels)."
            )
        subs = list(self.subcategories or ())
        if subcategory_probs is not None and len(subcategory_probs) != len(subs) + 1:
            raise SafetyPolicyError(
                f"head outputs {len(subcategory_probs)} sub-category probabilities for {len(subs)} sub-categories "
                "(plus 'none')."
            )
        values = [*type_probs, *level_probs, *(subcategory_probs or ())]
        if not all(isinstance(p, (int, float)) and math.isfinite(p) and -1e-6 <= p <= 1 + 1e-6 for p in values):
            return self.unassessed(profile, response)
        type_index = max(range(len(type_probs)), key=lambda i: type_probs[i])
        level = max(range(len(level_probs)), key=lambda i: level_probs[i])
        category = types[type_index]
        subcategory = subcategory_prob = None
        if subcategory_probs is not None:
            index = max(range(len(subcategory_probs)), key=lambda i: subcategory_probs[i])
            if index > 0 and self._in_type(subs[index - 1], category):
                subcategory, subcategory_prob = subs[index - 1], float(subcategory_probs[index])
        action = self.action(category, level, profile, subcategory)
        return SafetyVerdict(
            category=category,
            level=level,
            action=action,
            message=self.message(action, category, level, levels[level], profile, subcategory),
            type_probs={name: float(p) for name, p in zip(types, type_probs)},
            level_probs={i: float(p) for i, p in enumerate(level_probs)},
            profile=profile,
            subcategory=subcategory,
            subcategory_prob=subcategory_prob,
            response=response,
        )

    def unassessed(self, profile: str | None = None, response: str | None = None) -> SafetyVerdict:
        """The verdict when the head's output cannot be trusted: a refusal at the top level, never an answer."""
        profile = self.check_profile(profile)
        message = self._policy.get("messages", {}).get("unassessed") or _DEFAULT_POLICY["messages"]["unassessed"]
        return SafetyVerdict(
            category=UNASSESSED_CATEGORY,
            level=self.num_levels - 1,
            action="refuse",
            message=message,
            profile=profile,
            assessed=False,
            response="template" if response is None else self.check_response(response),
        )

    # ------------------------------------------------------------------------------------------------- internals
    def _bound_labels(self) -> tuple[Sequence[str], Sequence[str]]:
        types = self.safety_types or DEFAULT_SAFETY_TYPES
        levels = self.level_names or (
            DEFAULT_SAFETY_LEVELS
            if self.num_levels == len(DEFAULT_SAFETY_LEVELS)
            else tuple(str(i) for i in range(self.num_levels))
        )
        return types, levels

    @staticmethod
    def _in_type(subcategory: str | None, category: str) -> bool:
        return bool(subcategory) and subcategory.split(SUBCATEGORY_SEPARATOR, 1)[0] == category

    def _check_type(self, name: str, path: str) -> None:
        if self.safety_types is not None and name not in self.safety_types:
            raise SafetyPolicyError(f"{path}: unknown risk type {name!r}; known types: {list(self.safety_types)}.")

    def _check_label(self, name: Any, path: str) -> None:
        """A rule's key: a risk type, or a sub-category `Type/Sub` of a known type."""
        if not isinstance(name, str):
            raise SafetyPolicyError(f"{path}: a risk type must be a string, got {name!r}.")
        if SUBCATEGORY_SEPARATOR not in name:
            self._check_type(name, path)
            return
        parent, sub = (part.strip() for part in name.split(SUBCATEGORY_SEPARATOR, 1))
        if not parent or not sub:
            raise SafetyPolicyError(f"{path}: a sub-category is written 'Type/Sub-category', got {name!r}.")
        self._check_type(parent, path)
        if self.subcategories is not None and name not in self.subcategories:
            raise SafetyPolicyError(
                f"{path}: unknown sub-category {name!r}; the model predicts {list(self.subcategories)}."
            )

    def _profile_chain(self, profile: str) -> list[Mapping[str, Any]]:
        profiles = self._policy.get("profiles", {})
        chain, seen, name = [], [], profile
        while name is not None:
            if name in seen:
                raise SafetyPolicyError(f"safety_policy.profiles.{profile}: 'extends' cycle {seen + [name]}.")
            seen.append(name)
            entry = profiles.get(name, {})
            chain.append(entry)
            name = entry.get("extends")
        return chain[::-1]

    def _level_table(self, table: Any, path: str, full: bool = False) -> dict[str, str]:
        table = _normalized_levels(table, path, self.num_levels)
        top = str(self.num_levels - 1)
        for key, action in table.items():
            if action not in ACTIONS:
                raise SafetyPolicyError(f"{path}.{key}: unknown action {action!r}; actions are {list(ACTIONS)}.")
            if key == top and action != "refuse":
                raise SafetyPolicyError(
                    f"{path}.{key}: level {top} is always 'refuse' and cannot be relaxed (got {action!r})."
                )
        if full:
            missing = [str(i) for i in range(self.num_levels) if str(i) not in table]
            if missing:
                raise SafetyPolicyError(f"{path}: missing actions for levels {missing}; give one action per level.")
        return table

    def _type_tables(self, table: Any, path: str) -> dict[str, dict[str, str]]:
        out = {}
        for name, levels in _check_mapping(table, path).items():
            self._check_label(name, f"{path}.{name}")
            out[name] = self._level_table(levels, f"{path}.{name}")
        return out

    def _validated(self, policy: dict[str, Any]) -> dict[str, Any]:
        _check_keys(
            policy,
            ["version", "default_profile", "response", "levels", "types", "profiles", "messages", "guided"],
            "safety_policy",
        )
        if policy.get("version", 1) != 1:
            raise SafetyPolicyError(f"safety_policy.version: unsupported version {policy.get('version')!r}; use 1.")
        if "levels" not in policy:
            raise SafetyPolicyError("safety_policy.levels: missing; give one action per level, e.g. {'0': 'answer'}.")
        if policy.get("response", "template") not in RESPONSE_MODES:
            raise SafetyPolicyError(
                f"safety_policy.response: unknown mode {policy['response']!r}; modes are {list(RESPONSE_MODES)}."
            )
        policy["levels"] = self._level_table(policy["levels"], "safety_policy.levels", full=True)
        policy["types"] = self._type_tables(policy.get("types", {}), "safety_policy.types")

        profiles = dict(_check_mapping(policy.get("profiles", {}), "safety_policy.profiles"))
        for name, entry in profiles.items():
            path = f"safety_policy.profiles.{name}"
            entry = dict(_check_mapping(entry, path))
            _check_keys(entry, ["description", "extends", "region", "audience", "levels", "types"], path)
            if "extends" in entry:
                parent = entry["extends"]
                if not isinstance(parent, str):
                    raise SafetyPolicyError(
                        f"{path}.extends: expected one profile name (a string), got {type(parent).__name__} "
                        f"({parent!r})."
                    )
                if parent not in profiles and parent != "default":
                    raise SafetyPolicyError(
                        f"{path}.extends: unknown profile {parent!r}; known profiles: {sorted(profiles)}."
                    )
            for key in ("description", "region", "audience"):
                if key in entry and not isinstance(entry[key], str):
                    raise SafetyPolicyError(f"{path}.{key}: expected a string, got {entry[key]!r}.")
            entry["levels"] = self._level_table(entry.get("levels", {}), f"{path}.levels")
            entry["types"] = self._type_tables(entry.get("types", {}), f"{path}.types")
            profiles[name] = entry
        policy["profiles"] = profiles
        self._policy = policy  # the chain checks below read it
        for name in profiles:
            self._profile_chain(name)  # detects cycles
        default_profile = policy.get("default_profile", "default")
        if not isinstance(default_profile, str) or default_profile not in self.profiles:
            raise SafetyPolicyError(
                f"safety_policy.default_profile: unknown profile {default_profile!r}; known profiles: {self.profiles}."
            )

        guided = _check_mapping(policy.get("guided", {}), "safety_policy.guided")
        _check_keys(guided, ["refusal_budget"], "safety_policy.guided")
        budget = guided.get("refusal_budget", DEFAULT_REFUSAL_BUDGET)
        if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= 1024:
            raise SafetyPolicyError(
                f"safety_policy.guided.refusal_budget: expected an integer 1..1024, got {budget!r}."
            )

        messages = _check_mapping(policy.get("messages", {}), "safety_policy.messages")
        _check_keys(messages, ["refuse", "caution", "reasons", "unassessed", "hint", "lead"], "safety_policy.messages")
        for action in MESSAGE_ACTIONS:
            path = f"safety_policy.messages.{action}"
            table = _check_mapping(messages.get(action, {}), path)
            _check_keys(table, ["default", "types"], path)
            if "default" in table:
                _check_template(table["default"], f"{path}.default")
            for type_name, typed in _check_mapping(table.get("types", {}), f"{path}.types").items():
                typed_path = f"{path}.types.{type_name}"
                self._check_label(type_name, typed_path)
                typed = _check_mapping(typed, typed_path)
                _check_keys(typed, ["default", "levels"], typed_path)
                if "default" in typed:
                    _check_template(typed["default"], f"{typed_path}.default")
                levels = _normalized_levels(typed.get("levels", {}), f"{typed_path}.levels", self.num_levels)
                for key, template in levels.items():
                    _check_template(template, f"{typed_path}.levels.{key}")
        for type_name, reason in _check_mapping(messages.get("reasons", {}), "safety_policy.messages.reasons").items():
            self._check_label(type_name, f"safety_policy.messages.reasons.{type_name}")
            if not isinstance(reason, str):
                raise SafetyPolicyError(
                    f"safety_policy.messages.reasons.{type_name}: expected a string, got {reason!r}."
                )
        if "unassessed" in messages:
            _check_template(messages["unassessed"], "safety_policy.messages.unassessed")
        for key, allowed in (("hint", ("refuse", "caution", "decide")), ("lead", MESSAGE_ACTIONS)):
            table = _check_mapping(messages.get(key, {}), f"safety_policy.messages.{key}")
            _check_keys(table, list(allowed), f"safety_policy.messages.{key}")
            for action, template in table.items():
                _check_template(template, f"safety_policy.messages.{key}.{action}")
        return policy


__all__ = [
    "ACTIONS",
    "DEFAULT_SAFETY_LEVELS",
    "DEFAULT_SAFETY_SUBCATEGORIES",
    "DEFAULT_SAFETY_TYPES",
    "RESPONSE_MODES",
    "SafetyPolicy",
    "SafetyPolicyError",
    "SafetyVerdict",
    "default_safety_policy",
]
