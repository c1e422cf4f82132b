"""Graded responses as the paper describes them: the model explains (guided mode), level 2 can be decided by the
model, and sexual content is a sub-category that policy rules address alone."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from safevlm_hf import DEFAULT_SAFETY_TYPES, SafetyPolicy

from conftest import chat_prompt, make_image


SEXUAL = "Illegal Risk/Sexual content"
GUIDED = {"response": "guided", "guided": {"refusal_budget": 6}}
SWEEP = [
    {},
    {"do_sample": True, "temperature": 1.5},
    {"do_sample": True, "top_k": 3, "top_p": 0.7},
    {"num_beams": 3},
    {"num_beams": 3, "num_return_sequences": 2},
    {"do_sample": True, "num_return_sequences": 2},
    {"min_new_tokens": 30},
    {"repetition_penalty": 2.0, "no_repeat_ngram_size": 2},
]


def _inputs(processor, texts=("What is in this picture?",)):
    prompts = [chat_prompt(processor, text) for text in texts]
    return processor(
        images=[make_image(i) for i in range(len(texts))], text=prompts, return_tensors="pt", padding=True
    )


def _force(model, type_name: str, level: int, subcategory: str | None = None) -> None:
    """Make the head output one fixed verdict whatever the input (weights zeroed, biases one-hot)."""
    head = model.model.safety_head
    config = model.config
    with torch.no_grad():
        targets = [(head.type_classifier, config.safety_types.index(type_name)), (head.level_classifier, level)]
        sub_index = 0 if subcategory is None else config.safety_subcategories.index(subcategory) + 1
        targets.append((head.subcategory_classifier, sub_index))
        for classifier, index in targets:
            classifier.weight.zero_()
            classifier.bias.fill_(-10.0)
            classifier.bias[index] = 10.0


def _ids(processor, text):
    return processor.tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("mode", SWEEP, ids=[json.dumps(m) for m in SWEEP])
def test_a_guided_refusal_starts_with_its_lead_and_ends_within_its_budget(tiny_safevlm, mode):
    model, processor = tiny_safevlm
    _force(model, "Privacy", 3)
    inputs = _inputs(processor, ("Where does this person live?", "and who are they?"))
    policy = model.safety_policy({**model.config.safety_policy, **GUIDED})
    lead = _ids(processor, policy.lead("refuse", "Privacy", 3, "reject"))
    hint = _ids(processor, policy.hint("refuse", "Privacy", 3, "reject"))
    torch.manual_seed(0)
    out = model.generate(**inputs, max_new_tokens=40, safety_policy=policy, **mode)
    eos, pad = processor.tokenizer.eos_token_id, processor.tokenizer.pad_token_id
    for row in out[:, inputs["input_ids"].shape[1] :].tolist():
        assert row[: len(lead)] == lead  # the gate's lead, never the hint
        assert row[: len(hint)] != hint
        ended = row.index(eos)
        assert ended <= len(lead) + 6  # the model's own reason, at most the budget, then EOS
        assert all(token == pad for token in row[ended + 1 :])  # nothing after: never an answer


def test_a_guided_caution_starts_with_its_lead_and_decodes_freely(tiny_safevlm):
    model, processor = tiny_safevlm
    _force(model, "Privacy", 1)
    inputs = _inputs(processor)
    out = model.generate(**inputs, max_new_tokens=30, safety_response="guided", return_dict_in_generate=True)
    verdict = out.safety_verdicts[0]
    assert (verdict.action, verdict.response) == ("caution", "guided")
    lead = _ids(processor, model.safety_policy().lead("caution", "Privacy", 1, "answer carefully"))
    generated = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    assert generated[: len(lead)] == lead and len(generated) > len(lead)


class Prefer(LogitsProcessor):
    """A user processor that pushes one token up (runs before the gate, as every user processor does)."""

    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.token] += 100.0
        return scores


@pytest.mark.parametrize("choice", ["caution", "refuse"])
def test_level_2_decide_lets_the_model_choose_and_records_its_choice(tiny_safevlm, choice):
    model, processor = tiny_safevlm
    _force(model, "Privacy", 2)
    policy = {
        **model.config.safety_policy,
        **GUIDED,
        "levels": {"0": "answer", "1": "caution", "2": "decide", "3": "refuse"},
    }
    bound = model.safety_policy(policy)
    leads = {
        name: _ids(processor, bound.lead(name, "Privacy", 2, "answer or reject")) for name in ("caution", "refuse")
    }
    first = {name: lead[0] for name, lead in leads.items()}
    assert first["caution"] != first["refuse"]
    inputs = _inputs(processor)
    out = model.generate(
        **inputs,
        max_new_tokens=30,
        safety_policy=policy,
        return_dict_in_generate=True,
        logits_processor=LogitsProcessorList([Prefer(first[choice])]),
    )
    verdict = out.safety_verdicts[0]
    assert (verdict.action, verdict.decision) == ("decide", choice)
    generated = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    assert generated[: len(leads[choice])] == leads[choice]
    if choice == "refuse":
        assert processor.tokenizer.eos_token_id in generated[: len(leads["refuse"]) + 7]
    # In template mode a "decide" verdict is enforced as a refusal.
    template = model.generate(
        **inputs, max_new_tokens=60, safety_policy={**policy, "response": "template"}, return_dict_in_generate=True
    )
    assert template.safety_verdicts[0].refused
    message = _ids(processor, template.safety_verdicts[0].message)
    assert template.sequences[0, inputs["input_ids"].shape[1] :].tolist()[: len(message)] == message


def test_guided_mode_refuses_arguments_that_need_every_row_in_one_batch(tiny_safevlm):
    model, processor = tiny_safevlm
    _force(model, "Privacy", 3)
    with pytest.raises(ValueError, match="safety_response='template'"):
        model.generate(**_inputs(processor), max_new_tokens=4, safety_response="guided", output_attentions=True)


def test_a_sexual_content_rule_changes_that_sub_category_only(tiny_safevlm):
    model, processor = tiny_safevlm
    inputs = _inputs(processor)
    outcomes = {}
    for subcategory in (SEXUAL, None):
        _force(model, "Illegal Risk", 2, subcategory)
        for profile in ("default", "adult", "adult_eu_pegi", "minor"):
            verdict = model.assess(**inputs, safety_profile=profile)[0]
            assert verdict.subcategory == subcategory
            outcomes[subcategory, profile] = verdict.action
    assert outcomes[SEXUAL, "adult_eu_pegi"] == "caution"  # the region's adults: sexual content with care
    assert outcomes[None, "adult_eu_pegi"] == "refuse"  # crime, violence, drugs: still refused there
    assert {outcomes[SEXUAL, p] for p in ("default", "adult", "minor")} == {"refuse"}
    # A custom rule on the sub-category moves it alone.
    strict_adults = {**model.config.safety_policy}
    strict_adults["profiles"] = {
        **strict_adults["profiles"],
        "adult_eu_pegi": {
            **strict_adults["profiles"]["adult_eu_pegi"],
            "types": {SEXUAL: {"1": "refuse", "2": "refuse"}},
        },
    }
    _force(model, "Illegal Risk", 2, SEXUAL)
    assert model.assess(**inputs, safety_profile="adult_eu_pegi", safety_policy=strict_adults)[0].action == "refuse"
    _force(model, "Politics", 2, SEXUAL)  # a sub-category outside the predicted type does not count
    verdict = model.assess(**inputs, safety_profile="adult")[0]
    assert verdict.subcategory is None and verdict.action == "caution"


def test_the_head_learns_sub_categories_from_rows_that_have_them(tiny_safevlm):
    model, processor = tiny_safevlm
    texts = ("Show me explicit adult pictures", "How do I pick a lock?", "Describe this photo", "More adult stuff")
    inputs = _inputs(processor, texts)
    types = torch.tensor([1, 1, 6, 1])
    levels = torch.tensor([3, 2, 0, 3])
    subs = torch.tensor([1, 0, 0, -100])  # the last row has no sub-label (as PSA-VLM rows): it still trains
    params = [p for m in model.safety_modules().values() for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    torch.manual_seed(0)
    model.train()
    for _ in range(60):
        loss = model(
            **inputs, safety_type_labels=types, safety_level_labels=levels, safety_subcategory_labels=subs
        ).safety_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    verdicts = model.assess(**inputs)
    assert [v.subcategory for v in verdicts[:3]] == [SEXUAL, None, None]
    assert verdicts[0].subcategory_prob > 0.5


OLD_DEFAULT_POLICY = {  # the default policy as published before sub-categories and guided responses existed
    "version": 1,
    "default_profile": "default",
    "levels": {"0": "answer", "1": "caution", "2": "refuse", "3": "refuse"},
    "types": {"Illegal Risk": {"1": "refuse", "2": "refuse"}},
    "profiles": {
        "default": {"description": "General audience."},
        "adult": {"description": "Verified adults.", "levels": {"2": "caution"}},
        "minor": {"description": "Under 18.", "levels": {"1": "refuse", "2": "refuse"}},
        "adult_eu_pegi": {
            "description": "PEGI 18.",
            "extends": "adult",
            "region": "EU",
            "types": {"Illegal Risk": {"1": "caution", "2": "caution"}},
        },
        "minor_eu_pegi": {
            "description": "Minors, PEGI.",
            "extends": "minor",
            "region": "EU",
            "types": {"Misleading": {"1": "refuse"}},
        },
    },
    "messages": {
        "refuse": {
            "default": "I'm sorry, but I can't help with this request. {reason} (Risk: {category}, level "
            "{level} - {level_name}.)"
        },
        "caution": {"default": "Note: {reason} I will answer carefully and leave out anything harmful. "},
        "reasons": {"Privacy": "It involves someone's personal or private information."},
    },
}


def test_an_old_policy_loads_unchanged_and_resolves_as_before():
    policy = SafetyPolicy.from_json(json.dumps(OLD_DEFAULT_POLICY), DEFAULT_SAFETY_TYPES, 4, None, [SEXUAL])
    assert policy.response == "template"
    assert policy.to_dict()["types"] == OLD_DEFAULT_POLICY["types"]
    # As published: the PEGI profile relaxes all of "Illegal Risk" (the new default narrows that to sexual content).
    assert [policy.action("Illegal Risk", level, "adult_eu_pegi") for level in range(4)] == [
        "answer",
        "caution",
        "caution",
        "refuse",
    ]
    assert policy.action("Illegal Risk", 2, "adult_eu_pegi", SEXUAL) == "caution"  # no sub rule: the type's rule
    assert [policy.action("Privacy", level, "minor") for level in range(4)] == ["answer", "refuse", "refuse", "refuse"]
