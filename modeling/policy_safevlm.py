# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""Graded safety policies and verdicts for SafeVLM.

A policy maps (risk type, risk level, profile) to one of three actions:

* ``"answer"``  - the model answers freely;
* ``"caution"`` - a short explanatory prefix is forced, then the model continues freely;
* ``"refuse"``  - a refusal message that spells out the reason is forced, then EOS.

This file travels inside every checkpoint (it is imported by the configuration and modeling files), so it imports
only the standard library.

Policy dict schema (``config.safety_policy``)::

    {
      "version": 1,
      "default_profile": "default",
      "levels": {"0": "answer", "1": "caution", "2": "refuse", "3": "refuse"},   # one action per level
      "types": {"Illegal Risk": {"1": "refuse", "2": "refuse"}},                # per-type overrides
      "profiles": {
        "adult": {"description": "...", "levels": {"2": "caution"}},
        "adult_eu": {"extends": "adult", "region": "EU", "types": {"Illegal Risk": {"2": "caution"}}},
      },
      "messages": {
        "refuse":  {"default": "...{reason}...", "types": {"Privacy": {"default": "...", "levels": {"3": "..."}}}},
        "caution": {"default": "...{reason}..."},
        "reasons": {"Politics": "...", ...},
      },
    }

Resolution of an action, most specific wins: the generic ``levels`` table (base, then each profile from the root of
its ``extends`` chain to the profile itself), then the per-type ``types`` overrides in the same order. A per-type rule
always beats a generic one, so relaxing level 2 for adults does not relax a type kept strict at the base; a region
profile relaxes such a type explicitly. The highest level (3 by default) is always ``"refuse"``: no table may say
otherwise. A policy may be stricter than the default anywhere, down to refusing at level 0.
"""

from __future__ import annotations

import copy
import json
import string
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence


ACTIONS: tuple[str, ...] = ("answer", "caution", "refuse")
MESSAGE_ACTIONS: tuple[str, ...] = ("caution", "refuse")
TEMPLATE_FIELDS: frozenset[str] = frozenset({"category", "level", "level_name", "reason", "profile"})

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
SAFE_TYPE = "Safe"

_DEFAULT_POLICY: dict[str, Any] = {
    "version": 1,
    "default_profile": "default",
    "levels": {"0": "answer", "1": "caution", "2": "refuse", "3": "refuse"},
    # "Illegal Risk" covers sexual content: strict by default, relaxable only by an explicit region profile.
    "types": {"Illegal Risk": {"1": "refuse", "2": "refuse"}},
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
                "Adults in a region with an age-rating system (PEGI 18): mature content that the rating "
                "allows is answered with care at levels 1-2."
            ),
            "extends": "adult",
            "region": "EU",
            "types": {"Illegal Risk": {"1": "caution", "2": "caution"}},
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
            "Illegal Risk": "It involves illegal content, such as sexual or violent material.",
            "Insults & Bullying": "It involves insults, bullying or hateful content.",
            "Fairness": "It involves prejudice or discrimination.",
            "Privacy": "It involves someone's personal or private information.",
            "Misleading": "It involves false rumors or misleading content.",
            "Safe": "This deployment's policy does not allow answering at this risk level.",
        },
    },
}


def default_safety_policy(safety_types: Sequence[str] | None = None, num_levels: int | None = None) -> dict[str, Any]:
    """Return a fresh copy of the default policy dict (safe to mutate).

    With a custom taxonomy (``safety_types``), per-type rules and reasons for types it lacks are dropped; with another
    number of levels, level 0 answers, level 1 is answered with caution and every higher level is refused. Either
    way the default stays valid for the label space.
    """
    policy = copy.deepcopy(_DEFAULT_POLICY)
    if num_levels is not None and num_levels != len(DEFAULT_SAFETY_LEVELS):
        policy["levels"] = {str(i): ACTIONS[min(i, 2)] for i in range(num_levels)}
        policy["levels"][str(num_levels - 1)] = "refuse"

        def keep(table: dict[str, str]) -> dict[str, str]:
            return {k: v for k, v in table.items() if int(k) < num_levels - 1}

        policy["types"] = {t: keep(v) for t, v in policy["types"].items()}
        for entry in policy["profiles"].values():
            if "levels" in entry:
                entry["levels"] = keep(entry["levels"])
            if "types" in entry:
                entry["types"] = {t: keep(v) for t, v in entry["types"].items()}
    if safety_types is not None:
        known = set(safety_types)
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
        category: the most probable risk type label (one of ``config.safety_types``).
        level: the most probable risk level (0 = safe to answer ... 3 = reject).
        action: ``"answer"``, ``"caution"`` or ``"refuse"``.
        message: the text forced at the start of the answer (empty for ``"answer"``).
        type_probs: risk-type label -> probability.
        level_probs: level -> probability.
        profile: the policy profile the action was resolved under.
    """

    category: str
    level: int
    action: str
    message: str
    type_probs: dict[str, float] = field(default_factory=dict)
    level_probs: dict[int, float] = field(default_factory=dict)
    profile: str = "default"

    @property
    def refused(self) -> bool:
        return self.action == "refuse"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _level_key(value: Any, path: str, num_levels: int) -> int:
    try:
        level = int(value)
    except (TypeError, ValueError):
        raise SafetyPolicyError(f"{path}.{value}: level key is not an integer; use '0'..'{num_levels - 1}'.") from None
    if str(level) != str(value).strip() or not 0 <= level < num_levels:
        raise SafetyPolicyError(f"{path}.{value}: unknown level {value!r}; levels are '0'..'{num_levels - 1}'.")
    return level


def _check_mapping(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise SafetyPolicyError(f"{path}: expected a dict, got {type(value).__name__} ({value!r}).")
    return value


def _check_keys(value: Mapping[str, Any], allowed: Sequence[str], path: str) -> None:
    for key in value:
        if key not in allowed:
            raise SafetyPolicyError(f"{path}.{key}: unknown key; allowed keys are {sorted(allowed)}.")


class SafetyPolicy:
    """A validated, immutable safety policy.

    Build one with :meth:`from_dict` / :meth:`from_json` (or :meth:`default`). ``safety_types`` and ``num_levels``
    bind the policy to a model's label space; a policy validated without them is checked again (with them) by the
    model before use.
    """

    def __init__(
        self,
        policy: Mapping[str, Any] | None = None,
        safety_types: Sequence[str] | None = None,
        num_levels: int | None = None,
    ) -> None:
        if policy is None:
            policy = default_safety_policy(safety_types, num_levels)
        self._policy = copy.deepcopy(dict(policy))
        self.safety_types = tuple(safety_types) if safety_types is not None else None
        self.num_levels = int(num_levels) if num_levels is not None else len(DEFAULT_SAFETY_LEVELS)
        self._validate()

    # ----------------------------------------------------------------------------------------------- construction
    @classmethod
    def default(cls, safety_types: Sequence[str] | None = None, num_levels: int | None = None) -> "SafetyPolicy":
        return cls(None, safety_types=safety_types, num_levels=num_levels)

    @classmethod
    def from_dict(
        cls, policy: Mapping[str, Any], safety_types: Sequence[str] | None = None, num_levels: int | None = None
    ) -> "SafetyPolicy":
        return cls(_check_mapping(policy, "safety_policy"), safety_types=safety_types, num_levels=num_levels)

    @classmethod
    def from_json(
        cls, text: str, safety_types: Sequence[str] | None = None, num_levels: int | None = None
    ) -> "SafetyPolicy":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise SafetyPolicyError(f"safety_policy: not valid JSON ({err}).") from None
        return cls.from_dict(data, safety_types=safety_types, num_levels=num_levels)

    @classmethod
    def coerce(
        cls, policy: "SafetyPolicy | Mapping[str, Any] | str | None", safety_types: Sequence[str], num_levels: int
    ) -> "SafetyPolicy":
        """Turn a policy object, dict, JSON string or ``None`` (default) into a policy bound to a label space."""
        if isinstance(policy, str):
            return cls.from_json(policy, safety_types=safety_types, num_levels=num_levels)
        if isinstance(policy, SafetyPolicy):
            policy = policy.to_dict()
        elif policy is not None:
            policy = _check_mapping(policy, "safety_policy")
        return cls(policy, safety_types=safety_types, num_levels=num_levels)

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
    def profiles(self) -> list[str]:
        names = list(self._policy.get("profiles", {}))
        return names if "default" in names else ["default", *names]

    def profile_info(self, profile: str) -> dict[str, Any]:
        """The profile's own entry (description, region, extends, overrides)."""
        self._check_profile(profile)
        return copy.deepcopy(self._policy.get("profiles", {}).get(profile, {}))

    def action(self, category: str, level: int, profile: str | None = None) -> str:
        """Resolve the action for a (risk type, level) pair under ``profile`` (the default profile if ``None``)."""
        profile = self.default_profile if profile is None else profile
        self._check_profile(profile)
        self._check_type(category, "category")
        if not 0 <= int(level) < self.num_levels:
            raise SafetyPolicyError(f"level {level!r} is out of range; levels are 0..{self.num_levels - 1}.")
        key = str(int(level))
        chain = self._profile_chain(profile)
        action = self._policy["levels"][key]
        for entry in chain:
            action = entry.get("levels", {}).get(key, action)
        typed = self._policy.get("types", {}).get(category, {}).get(key)
        for entry in chain:
            typed = entry.get("types", {}).get(category, {}).get(key, typed)
        return typed if typed is not None else action

    def action_table(
        self, profile: str | None = None, safety_types: Sequence[str] | None = None
    ) -> dict[str, list[str]]:
        """``{risk type: [action at level 0, 1, ...]}`` for a profile, for documentation and model cards."""
        types = safety_types or self.safety_types or DEFAULT_SAFETY_TYPES
        return {t: [self.action(t, lvl, profile) for lvl in range(self.num_levels)] for t in types}

    def message(self, action: str, category: str, level: int, level_name: str = "", profile: str | None = None) -> str:
        """The text forced for ``action`` (empty for ``"answer"``), with the reason spelled out."""
        if action == "answer":
            return ""
        if action not in MESSAGE_ACTIONS:
            raise SafetyPolicyError(f"action {action!r} is unknown; actions are {list(ACTIONS)}.")
        messages = self._policy.get("messages", {})
        table = messages.get(action, {})
        typed = table.get("types", {}).get(category, {})
        template = typed.get("levels", {}).get(str(int(level))) or typed.get("default") or table.get("default")
        if not template:
            template = _DEFAULT_POLICY["messages"][action]["default"]
        reasons = messages.get("reasons", {})
        reason = (
            reasons.get(category)
            or _DEFAULT_POLICY["messages"]["reasons"].get(category)
            or (f"It was assessed as {category} content.")
        )
        return template.format(
            category=category,
            level=int(level),
            level_name=level_name,
            reason=reason,
            profile=self.default_profile if profile is None else profile,
        )

    def decide(
        self,
        type_probs: Sequence[float],
        level_probs: Sequence[float],
        safety_types: Sequence[str],
        level_names: Sequence[str],
        profile: str | None = None,
    ) -> SafetyVerdict:
        """Turn one row of head probabilities into a :class:`SafetyVerdict` (argmax type, argmax level)."""
        profile = self.default_profile if profile is None else profile
        if len(type_probs) != len(safety_types) or len(level_probs) != len(level_names):
            raise SafetyPolicyError(
                f"head outputs ({len(type_probs)} types, {len(level_probs)} levels) do not match the label lists "
                f"({len(safety_types)} types, {len(level_names)} levels)."
            )
        type_index = max(range(len(type_probs)), key=lambda i: type_probs[i])
        level = max(range(len(level_probs)), key=lambda i: level_probs[i])
        category = safety_types[type_index]
        action = self.action(category, level, profile)
        return SafetyVerdict(
            category=category,
            level=level,
            action=action,
            message=self.message(action, category, level, level_names[level], profile),
            type_probs={name: float(p) for name, p in zip(safety_types, type_probs)},
            level_probs={i: float(p) for i, p in enumerate(level_probs)},
            profile=profile,
        )

    # ------------------------------------------------------------------------------------------------- validation
    def _check_profile(self, profile: str) -> None:
        if profile not in self.profiles:
            raise SafetyPolicyError(f"unknown safety profile {profile!r}; known profiles: {self.profiles}.")

    def _check_type(self, name: str, path: str) -> None:
        known = self.safety_types or DEFAULT_SAFETY_TYPES
        if self.safety_types is not None and name not in known:
            raise SafetyPolicyError(f"{path}: unknown risk type {name!r}; known types: {list(known)}.")

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

    def _check_level_table(self, table: Any, path: str, full: bool = False) -> None:
        table = _check_mapping(table, path)
        top = self.num_levels - 1
        for key, action in table.items():
            level = _level_key(key, path, self.num_levels)
            if action not in ACTIONS:
                raise SafetyPolicyError(f"{path}.{key}: unknown action {action!r}; actions are {list(ACTIONS)}.")
            if level == top and action != "refuse":
                raise SafetyPolicyError(
                    f"{path}.{key}: level {top} is always 'refuse' and cannot be relaxed (got {action!r})."
                )
        if full:
            missing = [str(i) for i in range(self.num_levels) if str(i) not in {str(int(k)) for k in table}]
            if missing:
                raise SafetyPolicyError(f"{path}: missing actions for levels {missing}; give one action per level.")

    def _check_type_table(self, table: Any, path: str) -> None:
        for name, levels in _check_mapping(table, path).items():
            self._check_type(name, f"{path}.{name}")
            self._check_level_table(levels, f"{path}.{name}")

    def _check_template(self, template: Any, path: str) -> None:
        if not isinstance(template, str) or not template.strip():
            raise SafetyPolicyError(f"{path}: a message template must be a non-empty string, got {template!r}.")
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        except ValueError as err:
            raise SafetyPolicyError(f"{path}: malformed template ({err}).") from None
        unknown = fields - TEMPLATE_FIELDS
        if unknown:
            raise SafetyPolicyError(
                f"{path}: unknown placeholder(s) {sorted(unknown)}; templates may use {sorted(TEMPLATE_FIELDS)}."
            )

    def _validate(self) -> None:
        policy = _check_mapping(self._policy, "safety_policy")
        _check_keys(policy, ["version", "default_profile", "levels", "types", "profiles", "messages"], "safety_policy")
        if policy.get("version", 1) != 1:
            raise SafetyPolicyError(f"safety_policy.version: unsupported version {policy.get('version')!r}; use 1.")
        if "levels" not in policy:
            raise SafetyPolicyError("safety_policy.levels: missing; give one action per level, e.g. {'0': 'answer'}.")
        self._check_level_table(policy["levels"], "safety_policy.levels", full=True)
        # normalise level keys to canonical strings so lookups by str(int(level)) always work
        policy["levels"] = {str(int(k)): v for k, v in policy["levels"].items()}
        self._check_type_table(policy.get("types", {}), "safety_policy.types")
        policy["types"] = {t: {str(int(k)): v for k, v in lv.items()} for t, lv in policy.get("types", {}).items()}

        profiles = _check_mapping(policy.get("profiles", {}), "safety_policy.profiles")
        for name, entry in profiles.items():
            path = f"safety_policy.profiles.{name}"
            entry = _check_mapping(entry, path)
            _check_keys(entry, ["description", "extends", "region", "audience", "levels", "types"], path)
            if "extends" in entry and entry["extends"] not in profiles and entry["extends"] != "default":
                raise SafetyPolicyError(
                    f"{path}.extends: unknown profile {entry['extends']!r}; known profiles: {sorted(profiles)}."
                )
            self._check_level_table(entry.get("levels", {}), f"{path}.levels")
            self._check_type_table(entry.get("types", {}), f"{path}.types")
            entry_levels = {str(int(k)): v for k, v in entry.get("levels", {}).items()}
            entry_types = {t: {str(int(k)): v for k, v in lv.items()} for t, lv in entry.get("types", {}).items()}
            profiles[name] = {**entry, "levels": entry_levels, "types": entry_types}
            self._profile_chain(name)  # detects cycles
        default_profile = policy.get("default_profile", "default")
        if default_profile not in self.profiles:
            raise SafetyPolicyError(
                f"safety_policy.default_profile: unknown profile {default_profile!r}; known profiles: {self.profiles}."
            )

        messages = _check_mapping(policy.get("messages", {}), "safety_policy.messages")
        _check_keys(messages, ["refuse", "caution", "reasons"], "safety_policy.messages")
        for action in MESSAGE_ACTIONS:
            path = f"safety_policy.messages.{action}"
            table = _check_mapping(messages.get(action, {}), path)
            _check_keys(table, ["default", "types"], path)
            if "default" in table:
                self._check_template(table["default"], f"{path}.default")
            for type_name, typed in _check_mapping(table.get("types", {}), f"{path}.types").items():
                typed_path = f"{path}.types.{type_name}"
                self._check_type(type_name, typed_path)
                typed = _check_mapping(typed, typed_path)
                _check_keys(typed, ["default", "levels"], typed_path)
                if "default" in typed:
                    self._check_template(typed["default"], f"{typed_path}.default")
                for key, template in _check_mapping(typed.get("levels", {}), f"{typed_path}.levels").items():
                    _level_key(key, f"{typed_path}.levels", self.num_levels)
                    self._check_template(template, f"{typed_path}.levels.{key}")
        for type_name, reason in _check_mapping(messages.get("reasons", {}), "safety_policy.messages.reasons").items():
            self._check_type(type_name, f"safety_policy.messages.reasons.{type_name}")
            if not isinstance(reason, str):
                raise SafetyPolicyError(
                    f"safety_policy.messages.reasons.{type_name}: expected a string, got {reason!r}."
                )


__all__ = [
    "ACTIONS",
    "DEFAULT_SAFETY_LEVELS",
    "DEFAULT_SAFETY_TYPES",
    "SafetyPolicy",
    "SafetyPolicyError",
    "SafetyVerdict",
    "default_safety_policy",
]
