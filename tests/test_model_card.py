"""The generated model card: Hub-valid metadata, a policy table that matches the config, and user cards kept."""

from __future__ import annotations

import copy
import logging

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.errors import EntryNotFoundError
from transformers.pipelines import SUPPORTED_TASKS

from safevlm_hf import SafeVLMConfig
from safevlm_hf.hub.model_card import (
    GENERATED_MARKER,
    REPO_ID_PLACEHOLDER,
    fill_model_card_repo_id,
    model_card_origin,
    render_model_card,
    write_model_card,
)


CARD_LOGGER = "safevlm_hf.hub.model_card"

REPORT = {
    "results": [
        {
            "dataset": {"name": "VLGuard test", "type": "vlguard", "split": "test"},
            "metrics": {"attack_success_rate": 0.031, "refusal_rate": 0.962, "per_type": {"Privacy": 0.9}},
        },
        {"dataset": "XSTest", "metrics": {"over_refusal_rate": 0.08, "judge_answer": "string-match"}},
    ],
    "judge": {"name": "string", "version": "1"},
    "decoding": {"do_sample": False, "max_new_tokens": 128},
    "seed": 0,
}


def save_checkpoint_with_card(model, processor, path, **save_kwargs) -> None:
    """`save_pretrained` of model and processor (the package's save hook writes the card)."""
    model.save_pretrained(path, **save_kwargs)
    processor.save_pretrained(path)


def _config(tiny_llava_pair, **overrides) -> SafeVLMConfig:
    return SafeVLMConfig.from_llava_config(tiny_llava_pair[0].config, num_safety_tokens=4, **overrides)


def _cells(line: str) -> list[str]:
    """The cells of one Markdown table row, with `\\|` and `\\\\` unescaped."""
    cells, current, i, line = [], [], 0, line.strip()[1:]
    while i < len(line):
        char = line[i]
        if char == "\\" and i + 1 < len(line):
            current.append(line[i + 1])
            i += 2
            continue
        if char == "|":
            cells.append("".join(current).strip())
            current = []
        else:
            current.append(char)
        i += 1
    return cells


def _markdown_table(card: str, anchor: str) -> list[list[str]]:
    """Rows (header first, separator dropped) of the first table at or after `anchor`."""
    rows: list[list[str]] = []
    for line in card[card.index(anchor) :].splitlines():
        if line.startswith("|"):
            rows.append(_cells(line))
        elif rows:
            break
    return [row for row in rows if not all(cell and set(cell) <= {"-"} for cell in row)]


# ------------------------------------------------------------------------------------------------- metadata
def test_card_metadata_validates_with_huggingface_hub(tiny_llava_pair):
    config = _config(tiny_llava_pair, safety_base_model="llava-hf/llava-1.5-7b-hf")
    text = render_model_card(config, eval_results=REPORT, repo_id="acme/safevlm-tiny", license="apache-2.0")
    card = ModelCard(text)  # raises on a malformed front matter or model-index
    data = card.data
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "image-text-to-text" and data.pipeline_tag in SUPPORTED_TASKS
    assert {"safety", "safevlm", "llava", "vision-language-model"} <= set(data.tags)
    assert data.base_model == "llava-hf/llava-1.5-7b-hf"
    assert data.license == "apache-2.0"
    # model-index round-trips through huggingface_hub's parser: numbers only, grouped metrics flattened
    results = {(r.dataset_name, r.dataset_split, r.metric_type): r.metric_value for r in data.eval_results}
    assert results == {
        ("VLGuard test", "test", "attack_success_rate"): 0.031,
        ("VLGuard test", "test", "refusal_rate"): 0.962,
        ("VLGuard test", "test", "per_type/Privacy"): 0.9,
        ("XSTest", None, "over_refusal_rate"): 0.08,
    }
    assert data.model_name == "safevlm-tiny"
    assert ModelCard(str(card)).data.to_dict() == data.to_dict()  # stable under a re-dump
    # every value (numbers and text) is in the Markdown table; the settings that pin the run are shown
    evaluation = text.split("## Evaluation", 1)[1]
    assert "| XSTest |  | judge_answer | string-match |" in evaluation
    assert '"max_new_tokens": 128' in evaluation and '"seed": 0' in evaluation


@pytest.mark.parametrize(
    "base, local_folder, expected",
    [
        ("llava-hf/llava-1.5-7b-hf", False, "llava-hf/llava-1.5-7b-hf"),
        ("/home/alice/checkpoints/llava", False, None),
        ("./llava", False, None),
        ("runs/llava", True, None),  # owner/name-shaped, but a folder that exists here: a local path
        (None, False, None),
    ],
)
def test_base_model_is_set_only_for_a_hub_id(tiny_llava_pair, tmp_path, monkeypatch, base, local_folder, expected):
    monkeypatch.chdir(tmp_path)
    if local_folder:
        (tmp_path / base).mkdir(parents=True)
    text = render_model_card(_config(tiny_llava_pair, safety_base_model=base))
    assert ModelCard(text).data.base_model == expected
    if base and expected is None:
        assert base not in text  # a local path never leaks into a card meant for the Hub


def test_an_explicit_base_model_must_be_a_hub_id(tiny_llava_pair):
    with pytest.raises(ValueError, match="base_model must be a Hub model id"):
        render_model_card(_config(tiny_llava_pair), base_model="/tmp/llava")
    text = render_model_card(_config(tiny_llava_pair), base_model="llava-hf/bakLlava-v1-hf")
    assert ModelCard(text).data.base_model == "llava-hf/bakLlava-v1-hf"


# --------------------------------------------------------------------------------------------- policy tables
CUSTOM_POLICY = {
    "default_profile": "teen",
    "levels": {"0": "answer", "1": "caution", "2": "refuse"},
    "types": {"Scam": {"1": "refuse"}},
    "profiles": {
        "teen": {"description": "Ages 13-17 | school deployments", "levels": {"1": "refuse"}},
        "research": {"description": "Red-team research", "region": "EU", "audience": "adults", "levels": {}},
        "research_strict": {"extends": "research", "types": {"Hate": {"0": "caution"}}},
    },
    "messages": {"reasons": {"Scam": "It looks like a scam."}},
}


@pytest.mark.parametrize("taxonomy", ["default", "custom"])
def test_policy_tables_match_the_config(tiny_llava_pair, taxonomy):
    if taxonomy == "default":
        config = _config(tiny_llava_pair)
    else:
        config = _config(
            tiny_llava_pair,
            safety_types=["Hate", "Scam", "Safe"],
            safety_levels=["fine", "careful", "never"],
            safety_policy=CUSTOM_POLICY,
        )
    policy = config.bound_safety_policy()  # bound to the config's labels, sub-categories included
    card = render_model_card(config)

    types = _markdown_table(card, "## Safety taxonomy")
    assert types[0] == ["Index", "Risk type"] and [row[1] for row in types[1:]] == list(config.safety_types)
    levels = _markdown_table(card, "| Level | Meaning |")
    assert [row[1] for row in levels[1:]] == list(config.safety_levels)

    actions = _markdown_table(card, "### Actions by profile")
    header, rows = actions[0], actions[1:]
    assert header == ["Profile", "Risk type", *(f"Level {i}: {n}" for i, n in enumerate(config.safety_levels))]
    parsed = {(row[0], row[1]): row[2:] for row in rows}
    expected = {
        (profile, risk_type): actions
        for profile in policy.profiles
        for risk_type, actions in policy.action_table(profile, config.safety_types).items()
    }
    assert parsed == expected and len(rows) == len(expected)
    if taxonomy != "custom":  # a sub-category has its own row: the PEGI adult profile relaxes it, and nothing else
        assert parsed[("adult_eu_pegi", "Illegal Risk/Sexual content")] == ["answer", "caution", "caution", "refuse"]
        assert parsed[("adult_eu_pegi", "Illegal Risk")] == ["answer", "refuse", "refuse", "refuse"]
        assert parsed[("default", "Illegal Risk/Sexual content")] == ["answer", "refuse", "refuse", "refuse"]

    profiles = _markdown_table(card, "### Profiles")[1:]
    assert [row[0].split()[0].strip("`") for row in profiles] == policy.profiles
    default_rows = [row for row in profiles if row[0].endswith("(default)")]
    assert len(default_rows) == 1 and default_rows[0][0].startswith(f"`{policy.default_profile}`")
    if taxonomy == "custom":
        research = next(row for row in profiles if row[0] == "`research`")
        assert research[2:] == ["EU", "adults", "Red-team research"]
        assert "Ages 13-17 | school deployments" in [row[4] for row in profiles]  # a pipe in a cell survives
        assert parsed[("teen", "Hate")] == ["answer", "refuse", "refuse"]
        assert parsed[("research_strict", "Hate")] == ["caution", "caution", "refuse"]
        reasons = dict(_markdown_table(card, "| Risk type | Reason given |")[1:])
        assert reasons["Scam"] == "It looks like a scam."


def test_card_documents_gating_opt_out_and_safe_loading(tiny_llava_pair):
    card = render_model_card(_config(tiny_llava_pair), repo_id="acme/safevlm-tiny")
    for needle in (
        "safety_gating=False",
        'safety_profile="adult"',
        "AutoModelForImageTextToText.from_pretrained(repo_id, trust_remote_code=True, revision=revision)",
        "AutoModel.from_pretrained(repo_id, trust_remote_code=True, revision=revision)",
        'pipeline("image-text-to-text", model=repo_id, trust_remote_code=True, revision=revision)',
        'repo_id = "acme/safevlm-tiny"',
        "## What the remote code does and does not do",
        "overwrite_model_card=True",
    ):
        assert needle in card, needle
    assert REPO_ID_PLACEHOLDER not in card


# --------------------------------------------------------------------------------------- training stages
def test_training_stages_come_from_the_config_or_the_argument(tiny_llava_pair):
    config = _config(tiny_llava_pair)
    assert "No training stages are recorded" in render_model_card(config)
    config.safety_training_stages = [
        {"stage": "I", "data": "demo.jsonl", "steps": 120, "metrics": {"type_accuracy": 0.9512}, "lr": 2e-4},
        {"stage": "II", "data": {"name": "conditioning", "rows": 800}, "steps": 60, "metrics": {"loss": 0.41}},
    ]
    rows = _markdown_table(render_model_card(config), "## Training")
    assert rows == [
        ["Stage", "Data", "Steps", "Metrics", "Details"],
        ["I", "demo.jsonl", "120", "type_accuracy=0.9512", "lr=0.0002"],
        ["II", '{"name": "conditioning", "rows": 800}', "60", "loss=0.41", ""],
    ]
    override = [{"stage": "merge", "steps": 0}]
    rows = _markdown_table(render_model_card(config, training_stages=override), "## Training")
    assert rows[1:] == [["merge", "", "0", "", ""]]
    with pytest.raises(ValueError, match=r"training_stages\[1\] must be a dict"):
        render_model_card(config, training_stages=[{"stage": 1}, "stage two"])
    config.safety_training_stages = [{"stage": 1, "metrics": [0.9]}]
    with pytest.raises(ValueError, match=r"config.safety_training_stages\[0\].metrics"):
        render_model_card(config)


@pytest.mark.parametrize(
    "report, match",
    [
        ({"accuracy": 0.9}, "neither 'results' nor 'metrics'"),
        ({"results": []}, "non-empty list"),
        ({"results": [{"metrics": {"asr": 0.1}}]}, r"\['results'\]\[0\]: missing 'dataset'"),
        ({"dataset": "VLGuard", "metrics": [0.1]}, r"eval_results\['metrics'\]: metrics must be a dict"),
    ],
)
def test_malformed_evaluation_reports_name_the_key(tiny_llava_pair, report, match):
    with pytest.raises(ValueError, match=match):
        render_model_card(_config(tiny_llava_pair), eval_results=report)


def test_a_safevlm_eval_report_json_becomes_results_and_pinned_settings(tiny_llava_pair):
    # The shape `safevlm eval` writes to report.json (schema_version 1), trimmed to what the card reads.
    generation = {
        "n_items": 40,
        "attack_success_rate": 0.05,
        "attack_success_rate_parsed": 0.025,
        "refusal_rate_risky": 0.95,
        "over_refusal_rate": 0.1,
        "unparseable_rate": 0.0,
        "mean_score": None,
        "mean_score_by_risk_type": {},
    }
    report = {
        "schema_version": 1,
        "created_at": "2026-01-01T00:00:00+00:00",
        "model": {
            "name_or_path": "out/demo",
            "class": "SafeVLMForConditionalGeneration",
            "config_hash": "ab12",
            "dtype": "float32",
            "num_parameters": 10,
        },
        "safety_gating": True,
        "profile": "minor",
        "policy": {"levels": {}},
        "policy_hash": "cd34",
        "decoding": {"do_sample": False, "max_new_tokens": 64, "model_generation_config": {"eos_token_id": 2}},
        "seed": 7,
        "judge": {"name": "string", "version": "1.0", "model": None, "prompt": "a very long prompt"},
        "refusal_judge": None,
        "benchmarks": [
            {
                "spec": "figstep:data/safebench.csv",
                "name": "figstep",
                "n_items": 40,
                "files": {"data/safebench.csv": "ef56"},
            }
        ],
        "environment": {"python": "3.11"},
        "metrics": {
            "overall": generation,
            "by_source": {"figstep": generation, "xstest": {**generation, "over_refusal_rate": 0.2}},
            "by_category": {},
            "by_risk_type": {},
            "verdicts": None,
        },
        "head_metrics": {
            "type": {"accuracy": 0.9, "macro_f1": 0.85, "ece": 0.04},
            "level": {"accuracy": 0.8, "macro_f1": 0.7, "mean_absolute_error": 0.25, "ece": None},
        },
    }
    text = render_model_card(_config(tiny_llava_pair), eval_results=report)
    results = {(r.dataset_name, r.metric_type): r.metric_value for r in ModelCard(text).data.eval_results}
    assert results[("figstep", "attack_success_rate")] == 0.05 and results[("xstest", "over_refusal_rate")] == 0.2
    assert ("figstep", "mean_score") not in results  # None (no rubric judge) is not a result
    assert results[("labelled safety set", "type_accuracy")] == 0.9
    assert results[("labelled safety set", "level_mean_absolute_error")] == 0.25
    settings = text.split("Settings pinned by the evaluation report", 1)[1]
    for pinned in (
        '"seed": 7',
        '"profile": "minor"',
        '"policy_hash": "cd34"',
        '"config_hash": "ab12"',
        '"spec": "figstep:data/safebench.csv"',
        '"max_new_tokens": 64',
        '"version": "1.0"',
    ):
        assert pinned in settings, pinned
    assert "a very long prompt" not in text and "model_generation_config" not in text


def test_a_single_entry_report_is_accepted(tiny_llava_pair):
    text = render_model_card(
        _config(tiny_llava_pair), eval_results={"dataset": "FigStep", "metrics": {"asr": 0.12}, "profile": "minor"}
    )
    card = ModelCard(text)
    results = [(r.dataset_name, r.metric_type, r.metric_value) for r in card.data.eval_results]
    assert results == [("FigStep", "asr", 0.12)]
    assert '"profile": "minor"' in text


# ------------------------------------------------------------------------------------ existing README.md
def test_a_user_written_card_survives_a_resave(tiny_safevlm, tmp_path, caplog):
    model, processor = tiny_safevlm
    save_checkpoint_with_card(model, processor, tmp_path)
    assert model_card_origin((tmp_path / "README.md").read_text()) == "generated"
    user_card = "---\nlicense: mit\n---\n# My model\n\nHand-written notes.\n"
    (tmp_path / "README.md").write_text(user_card)
    with caplog.at_level(logging.WARNING, logger=CARD_LOGGER):
        save_checkpoint_with_card(model, processor, tmp_path)
        assert write_model_card(tmp_path, model.config) is False
    assert (tmp_path / "README.md").read_text() == user_card
    assert "overwrite_model_card=True" in caplog.text and "README.md" in caplog.text
    # overwriting is explicit
    model.save_pretrained(tmp_path, overwrite_model_card=True)
    assert GENERATED_MARKER in (tmp_path / "README.md").read_text()


def test_an_edited_generated_card_is_kept_and_an_unedited_one_is_refreshed(tiny_llava_pair, tmp_path, caplog):
    config = _config(tiny_llava_pair)
    assert write_model_card(tmp_path, config) is True
    readme = tmp_path / "README.md"
    first = readme.read_text()
    assert model_card_origin(first) == "generated"

    # unedited: a changed policy shows up on the next save
    stricter = copy.deepcopy(config.safety_policy)
    stricter["profiles"]["minor"]["levels"]["0"] = "refuse"
    config.safety_policy = stricter
    assert write_model_card(tmp_path, config) is True
    rows = {(r[0], r[1]): r[2:] for r in _markdown_table(readme.read_text(), "### Actions by profile")[1:]}
    assert rows[("minor", "Politics")][0] == "refuse"

    # metadata added on the Hub (front matter only) is merged into the regenerated card
    text = readme.read_text().replace("library_name: transformers", "language: en\nlibrary_name: transformers")
    text = text.replace("- safety\n", "- safety\n- my-team\n", 1)
    readme.write_text(text)
    assert model_card_origin(text) == "generated"
    assert write_model_card(tmp_path, config) is True
    data = ModelCard(readme.read_text()).data
    assert data.language == "en" and "my-team" in data.tags and "safevlm" in data.tags

    # evaluation results describe the weights they were measured on: a later save drops them, and says so
    assert write_model_card(tmp_path, config, eval_results=REPORT) is True
    assert ModelCard(readme.read_text()).data.eval_results
    with caplog.at_level(logging.WARNING, logger=CARD_LOGGER):
        assert write_model_card(tmp_path, config) is True
    assert "evaluation results of the previous" in caplog.text
    assert ModelCard(readme.read_text()).data.eval_results is None

    # one edited character in the body makes it the user's card
    edited = readme.read_text().replace("## Quick start", "## Quick start (read me)")
    readme.write_text(edited)
    assert model_card_origin(edited) == "edited"
    assert write_model_card(tmp_path, config) is False and readme.read_text() == edited


def test_transformers_push_stub_is_replaced_and_its_tags_kept(tiny_llava_pair, tmp_path, monkeypatch):
    # What transformers' push_to_hub writes into README.md when the Hub repo has no card yet.
    from transformers.utils import hub as transformers_hub

    def no_card_on_the_hub(*args, **kwargs):
        raise EntryNotFoundError("README.md not found")

    monkeypatch.setattr(transformers_hub.ModelCard, "load", no_card_on_the_hub)
    stub = transformers_hub.create_and_tag_model_card("acme/safevlm-tiny", tags=["pushed-tag"])
    stub.save(tmp_path / "README.md")
    assert model_card_origin((tmp_path / "README.md").read_text()) == "transformers-stub"
    assert write_model_card(tmp_path, _config(tiny_llava_pair), repo_id="acme/safevlm-tiny") is True
    card = ModelCard((tmp_path / "README.md").read_text())
    assert "pushed-tag" in card.data.tags and "## Safety policy" in card.text
    # the stub with one line filled in by a person is theirs
    person = str(stub).replace("[More Information Needed]", "Acme Inc.", 1)
    assert model_card_origin(person) == "user"


def test_fill_repo_id_only_touches_our_unedited_card(tiny_llava_pair):
    card = render_model_card(_config(tiny_llava_pair))
    assert REPO_ID_PLACEHOLDER in card
    filled = fill_model_card_repo_id(card, "acme/safevlm-tiny")
    assert 'repo_id = "acme/safevlm-tiny"' in filled and REPO_ID_PLACEHOLDER not in filled
    assert model_card_origin(filled) == "generated"
    user = "# mine\n" + REPO_ID_PLACEHOLDER
    assert fill_model_card_repo_id(user, "acme/x") == user


def test_save_pretrained_writes_the_card_on_the_main_process_only(tiny_safevlm, tmp_path):
    model, _ = tiny_safevlm
    model.save_pretrained(tmp_path / "main")
    assert model_card_origin((tmp_path / "main" / "README.md").read_text()) == "generated"
    # The generator ships with the package (a save hook), not inside the checkpoint's remote code.
    assert not any("def render_model_card" in p.read_text() for p in (tmp_path / "main").glob("*.py"))
    model.save_pretrained(tmp_path / "worker", is_main_process=False)
    assert not (tmp_path / "worker" / "README.md").exists()
