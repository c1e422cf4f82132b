"""SafetyPolicy: graded actions, profiles, per-type rules, messages, serialization, validation."""

import json

import pytest

from safevlm_hf import DEFAULT_SAFETY_LEVELS, DEFAULT_SAFETY_TYPES, SafetyPolicy, SafetyPolicyError, SafetyVerdict

TYPES = list(DEFAULT_SAFETY_TYPES)


@pytest.fixture
def policy():
    return SafetyPolicy.default(TYPES, 4, DEFAULT_SAFETY_LEVELS, ["Illegal Risk/Sexual content"])


def test_default_levels(policy):
    for category in ("Politics", "Privacy", "Misleading", "Safe"):
        assert [policy.action(category, lvl) for lvl in range(4)] == ["answer", "caution", "refuse", "refuse"]


def test_illegal_risk_is_strict_by_default_and_not_relaxed_by_generic_profiles(policy):
    assert [policy.action("Illegal Risk", lvl) for lvl in range(4)] == ["answer", "refuse", "refuse", "refuse"]
    # "adult" relaxes level 2 in general, but a per-type rule beats a generic one
    assert policy.action("Privacy", 2, "adult") == "caution"
    assert policy.action("Illegal Risk", 2, "adult") == "refuse"


def test_region_profile_relaxes_sexual_content_and_nothing_else_of_illegal_risk(policy):
    sexual = "Illegal Risk/Sexual content"
    assert policy.action("Illegal Risk", 2, "adult_eu_pegi", sexual) == "caution"
    assert policy.action("Illegal Risk", 1, "adult_eu_pegi", sexual) == "caution"
    assert policy.action("Illegal Risk", 3, "adult_eu_pegi", sexual) == "refuse"
    # crime, violence, drugs: the rest of "Illegal Risk" stays refused in the same profile
    assert [policy.action("Illegal Risk", lvl, "adult_eu_pegi") for lvl in range(4)] == [
        "answer",
        "refuse",
        "refuse",
        "refuse",
    ]
    assert policy.action("Politics", 2, "adult_eu_pegi") == "caution"  # inherited from "adult"
    # sexual content is strict in every other profile
    for profile in ("default", "adult", "minor", "minor_eu_pegi"):
        assert [policy.action("Illegal Risk", lvl, profile, sexual) for lvl in range(4)] == [
            "answer",
            "refuse",
            "refuse",
            "refuse",
        ], profile


def test_minor_profile_refuses_every_risky_level(policy):
    assert [policy.action("Fairness", lvl, "minor") for lvl in range(4)] == ["answer", "refuse", "refuse", "refuse"]
    assert policy.action("Misleading", 1, "minor_eu_pegi") == "refuse"


def test_level_3_can_never_be_relaxed():
    base = {"levels": {"0": "answer", "1": "caution", "2": "refuse", "3": "refuse"}}
    for bad, key in (
        ({**base, "levels": {**base["levels"], "3": "caution"}}, "safety_policy.levels.3"),
        ({**base, "types": {"Politics": {"3": "answer"}}}, "safety_policy.types.Politics.3"),
        ({**base, "profiles": {"adult": {"levels": {"3": "caution"}}}}, "safety_policy.profiles.adult.levels.3"),
        (
            {**base, "profiles": {"x": {"types": {"Privacy": {"3": "answer"}}}}},
            "safety_policy.profiles.x.types.Privacy.3",
        ),
    ):
        with pytest.raises(SafetyPolicyError, match=rf"{key}: level 3 is always 'refuse'"):
            SafetyPolicy.from_dict(bad, TYPES, 4)


def test_a_policy_may_be_stricter_than_default_everywhere():
    strict = SafetyPolicy.from_dict({"levels": {"0": "refuse", "1": "refuse", "2": "refuse", "3": "refuse"}}, TYPES, 4)
    assert {strict.action(t, lvl, "default") for t in TYPES for lvl in range(4)} == {"refuse"}


@pytest.mark.parametrize(
    "policy_dict, match",
    [
        (
            {"levels": {"0": "answer", "1": "caution", "2": "refuse", "3": "refuse"}, "types": {"Nudity": {}}},
            r"safety_policy.types.Nudity: unknown risk type 'Nudity'",
        ),
        (
            {"levels": {"0": "ignore", "1": "caution", "2": "refuse", "3": "refuse"}},
            r"safety_policy.levels.0: unknown action 'ignore'",
        ),
        (
            {"levels": {"0": "answer", "1": "caution", "2": "refuse", "3": "refuse", "4": "refuse"}},
            r"safety_policy.levels.4: unknown level '4'",
        ),
        ({"levels": {"0": "answer", "1": "caution", "3": "refuse"}}, r"missing actions for levels \['2'\]"),
        (
            {
                "levels": {"0": "answer", "1": "caution", "2": "refuse", "3": "refuse"},
                "profiles": {"teen": {"extends": "kid"}},
            },
            r"safety_policy.profiles.teen.extends: unknown profile 'kid'",
        ),
        (
            {
                "levels": {"0": "answer", "1": "caution", "2": "refuse", "3": "refuse"},
                "profiles": {"a": {"extends": "b"}, "b": {"extends": "a"}},
            },
            r"'extends' cycle",
        ),
        (
            {
                "levels": {"0": "answer", "1": "caution", "2": "refuse", "3": "refuse"},
                "messages": {"refuse": {"default": "No. {because}"}},
            },
            r"unknown placeholder\(s\) \['because'\]",
        ),
        (
            {"levels": {"0": "answer", "1": "caution", "2": "refuse", "3": "refuse"}, "colour": "red"},
            r"safety_policy.colour: unknown key",
        ),
        (
            {"levels": {"0": "answer", "1": "caution", "2": "refuse", "3": "refuse"}, "default_profile": "kids"},
            r"safety_policy.default_profile: unknown profile 'kids'",
        ),
    ],
)
def test_invalid_policies_raise_naming_the_key(policy_dict, match):
    with pytest.raises(SafetyPolicyError, match=match):
        SafetyPolicy.from_dict(policy_dict, TYPES, 4)


def test_unknown_profile_lists_the_known_ones(policy):
    with pytest.raises(
        SafetyPolicyError, match=r"unknown safety profile 'teen'; known profiles: \['default', 'adult', "
    ):
        policy.action("Politics", 1, "teen")


def test_json_and_dict_round_trip(policy):
    assert SafetyPolicy.from_json(policy.to_json(), TYPES, 4) == policy
    assert SafetyPolicy.from_dict(json.loads(policy.to_json()), TYPES, 4).to_dict() == policy.to_dict()
    with pytest.raises(SafetyPolicyError, match="not valid JSON"):
        SafetyPolicy.from_json("{levels:", TYPES, 4)


def test_messages_spell_out_the_reason_and_are_overridable():
    policy = SafetyPolicy.from_dict(
        {
            "levels": {"0": "answer", "1": "caution", "2": "refuse", "3": "refuse"},
            "messages": {
                "refuse": {
                    "default": "No: {reason}",
                    "types": {"Privacy": {"levels": {"3": "Never for {category}."}}},
                },
                "reasons": {"Politics": "politics is off-topic here."},
            },
        },
        TYPES,
        4,
    )
    assert policy.message("refuse", "Politics", 2) == "No: politics is off-topic here."
    assert policy.message("refuse", "Privacy", 3) == "Never for Privacy."
    assert policy.message("refuse", "Privacy", 2).startswith("No: It involves someone's personal")
    assert policy.message("answer", "Privacy", 0) == ""
    default = SafetyPolicy.default(TYPES, 4)
    assert "politically sensitive" in default.message("refuse", "Politics", 3, "reject")
    assert default.message("caution", "Privacy", 1).startswith("Note: It involves someone's personal")


def test_decide_builds_a_verdict_from_probabilities(policy):
    verdict = policy.decide([0, 0, 0, 0, 0.9, 0.05, 0.05], [0.1, 0.2, 0.6, 0.1])
    assert isinstance(verdict, SafetyVerdict)
    assert (verdict.category, verdict.level, verdict.action) == ("Privacy", 2, "refuse")
    assert verdict.refused and "personal or private information" in verdict.message
    assert verdict.type_probs["Privacy"] == pytest.approx(0.9) and verdict.level_probs[2] == pytest.approx(0.6)
    adult = policy.decide([0, 0, 0, 0, 0.9, 0.05, 0.05], [0.1, 0.2, 0.6, 0.1], "adult")
    assert adult.action == "caution" and adult.profile == "adult"
    assert verdict.to_dict()["category"] == "Privacy"


def test_action_table_for_cards(policy):
    table = policy.action_table("minor")
    assert table["Privacy"] == ["answer", "refuse", "refuse", "refuse"]
    assert set(table) == {*TYPES, "Illegal Risk/Sexual content"}  # sub-categories get their own row
