"""Blinded A/B human evaluation: export with randomized sides and a separate key, import labels, win/tie/loss."""

from __future__ import annotations

import csv
import json

import pytest

from safevlm_hf.evaluation.human_eval import HumanEvalError, export_ab_pairs, import_labels


def _records(model: str, n: int = 8) -> list[dict]:
    return [
        {"id": f"item{i}", "prompt": f"question {i}", "response": f"{model} answer {i}", "image": None}
        for i in range(n)
    ]


def _fill(pairs_csv, labels_by_row):
    with pairs_csv.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row, label in zip(rows, labels_by_row):
        row["label"] = label
    path = pairs_csv.with_name("labelled.csv")
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path, rows


def test_export_blinds_and_randomizes_sides(tmp_path):
    paths = export_ab_pairs(_records("base"), _records("safe"), tmp_path, model_a="base", model_b="safe", seed=3)
    key = json.loads(paths["key"].read_text())
    rows = [json.loads(line) for line in paths["jsonl"].read_text().splitlines()]
    with paths["csv"].open(newline="") as handle:
        assert list(csv.DictReader(handle)) == [{k: str(v) for k, v in row.items()} for row in rows]
    sides = [key["pairs"][row["pair_id"]]["A"] for row in rows]
    assert set(sides) == {"base", "safe"}  # both models appear on side A
    for row in rows:
        entry = key["pairs"][row["pair_id"]]
        assert row["response_A"].startswith(entry["A"]) and row["response_B"].startswith(entry["B"])
        assert "base" not in json.dumps({k: v for k, v in row.items() if not k.startswith("response")})
        assert row["label"] == ""
    again = export_ab_pairs(_records("base"), _records("safe"), tmp_path / "2", model_a="base", model_b="safe", seed=3)
    assert json.loads(again["key"].read_text())["pairs"] == key["pairs"]  # the seed fixes the sides
    other = export_ab_pairs(_records("base"), _records("safe"), tmp_path / "3", model_a="base", model_b="safe", seed=4)
    assert json.loads(other["key"].read_text())["pairs"] != key["pairs"]


def test_import_counts_wins_ties_losses_and_margin(tmp_path):
    paths = export_ab_pairs(_records("base"), _records("safe"), tmp_path, model_a="base", model_b="safe", seed=0)
    key = json.loads(paths["key"].read_text())["pairs"]
    labels = ["A", "b", "tie", "A", "B", "Tie", "", "a"]  # one row left unlabelled
    labelled, rows = _fill(paths["csv"], labels)
    expected = {"base": 0, "safe": 0}
    for row, label in zip(rows, labels):
        if label.upper() in ("A", "B"):
            expected[key[row["pair_id"]][label.upper()]] += 1
    summary = import_labels(labelled, paths["key"])
    assert summary.n_labelled == 7 and summary.n_unlabelled == 1
    base, safe = summary.results["base"], summary.results["safe"]
    assert (base["wins"], safe["wins"]) == (expected["base"], expected["safe"])
    assert base["ties"] == safe["ties"] == 2
    assert base["losses"] == safe["wins"] and safe["losses"] == base["wins"]
    assert base["win_rate"] == pytest.approx(expected["base"] / 7)
    assert summary.win_margin == pytest.approx((expected["base"] - expected["safe"]) / 7)

    jsonl = tmp_path / "labels.jsonl"
    jsonl.write_text("".join(json.dumps({"pair_id": r["pair_id"], "label": l}) + "\n" for r, l in zip(rows, labels)))
    assert import_labels(jsonl, paths["key"]).to_dict() == summary.to_dict()


def test_bad_labels_name_the_row(tmp_path):
    paths = export_ab_pairs(_records("base", 3), _records("safe", 3), tmp_path, model_a="base", model_b="safe")
    labelled, _ = _fill(paths["csv"], ["A", "C", "B"])
    with pytest.raises(HumanEvalError, match=r"labelled\.csv:3 \(pair pair-00002\): label 'C' is not A, B or tie"):
        import_labels(labelled, paths["key"])
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text('{"pair_id": "pair-00001", "label": "A"}\n{"pair_id": "pair-09999", "label": "B"}\n')
    with pytest.raises(HumanEvalError, match=r"unknown\.jsonl:2: pair_id 'pair-09999' is not in the key"):
        import_labels(unknown, paths["key"])


def test_export_rejects_mismatched_inputs(tmp_path):
    with pytest.raises(HumanEvalError, match="no item ids in common"):
        export_ab_pairs(
            _records("a"), [{"id": "x", "prompt": "p", "response": "r"}], tmp_path, model_a="a", model_b="b"
        )
    changed = _records("b")
    changed[0]["prompt"] = "another question"
    with pytest.raises(HumanEvalError, match="'item0': the two models were given different prompts"):
        export_ab_pairs(_records("a"), changed, tmp_path, model_a="a", model_b="b")
    with pytest.raises(HumanEvalError, match="different names"):
        export_ab_pairs(_records("a"), _records("a"), tmp_path, model_a="a", model_b="a")
