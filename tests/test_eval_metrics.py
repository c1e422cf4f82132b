"""Evaluation metrics on hand-computed cases, and the PNG plots."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from safevlm_hf import SafetyVerdict
from safevlm_hf.evaluation.judges import Judgement
from safevlm_hf.evaluation.metrics import (
    ECE_BINS,
    classification_report,
    confusion_matrix,
    expected_calibration_error,
    generation_metrics,
    grouped_generation_metrics,
    head_metrics,
    head_metrics_from_verdicts,
    plot_category_rates,
    plot_confusion_matrix,
    plot_reliability,
    reliability_bins,
    verdict_metrics,
)


def test_classification_report_by_hand():
    # gold A A B B C, predicted A B B B A; class D never occurs.
    report = classification_report([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], ["A", "B", "C", "D"])
    assert report["confusion_matrix"] == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    assert report["accuracy"] == pytest.approx(3 / 5)
    a, b, c, d = (report["per_class"][k] for k in "ABCD")
    assert (a["precision"], a["recall"], a["f1"], a["support"]) == pytest.approx((0.5, 0.5, 0.5, 2))
    assert (b["precision"], b["recall"], b["f1"]) == pytest.approx((2 / 3, 1.0, 0.8))
    assert (c["precision"], c["recall"], c["f1"], c["support"]) == (0.0, 0.0, 0.0, 1)
    assert d["support"] == 0
    # macro-F1 over classes seen in gold or predictions (A, B, C), not the absent D
    assert report["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_confusion_matrix_rejects_out_of_range_labels():
    assert confusion_matrix([1, 1], [0, 1], 2).tolist() == [[0, 0], [1, 1]]
    with pytest.raises(ValueError, match="y_pred holds label 3"):
        confusion_matrix([0], [3], 2)


def test_ece_by_hand():
    probs = np.array(
        [
            [0.90, 0.05, 0.05],  # conf 0.90, correct (gold 0) -> bin (0.8, 1.0]
            [0.10, 0.70, 0.20],  # conf 0.70, wrong (gold 0)   -> bin (0.6, 0.8]
            [0.62, 0.30, 0.08],  # conf 0.62, correct (gold 0) -> bin (0.6, 0.8]
            [0.20, 0.14, 0.66],  # conf 0.66, wrong (gold 1)   -> bin (0.6, 0.8]
        ]
    )
    gold = [0, 0, 0, 1]
    # bin (0.6, 0.8]: 3 items, mean conf 0.66, accuracy 1/3; bin (0.8, 1]: 1 item, conf 0.9, accuracy 1
    expected = 3 / 4 * abs(1 / 3 - 0.66) + 1 / 4 * abs(1.0 - 0.9)
    assert expected_calibration_error(probs, gold, n_bins=5) == pytest.approx(expected)
    assert expected == pytest.approx(0.27)
    bins = reliability_bins(probs, gold, n_bins=5)
    assert [b["count"] for b in bins] == [0, 0, 0, 3, 1]
    assert bins[3]["confidence"] == pytest.approx(0.66) and bins[3]["accuracy"] == pytest.approx(1 / 3)
    # perfectly calibrated one-hot predictions, and the documented default bin count
    assert expected_calibration_error(np.eye(3), [0, 1, 2]) == pytest.approx(0.0)
    assert ECE_BINS == 15 and len(reliability_bins(probs, gold)) == 15


def test_head_metrics_by_hand():
    type_names = ["Politics", "Privacy", "Safe"]
    level_names = ["l0", "l1", "l2", "l3"]
    type_probs = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1]])
    level_probs = np.array(
        [[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1], [0.1, 0.1, 0.1, 0.7]]
    )  # predicted levels 0 1 2 3
    metrics = head_metrics(type_probs, [0, 1, 2, 2], level_probs, [0, 3, 2, 1], type_names, level_names)
    assert metrics["type"]["accuracy"] == pytest.approx(0.75)
    assert metrics["type"]["per_class"]["Safe"]["recall"] == pytest.approx(0.5)
    assert metrics["type"]["per_class"]["Politics"]["precision"] == pytest.approx(0.5)
    assert metrics["level"]["confusion_matrix"] == [[1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0], [0, 1, 0, 0]]
    assert metrics["level"]["mean_absolute_error"] == pytest.approx((0 + 2 + 0 + 2) / 4)
    assert metrics["level"]["accuracy"] == pytest.approx(0.5)
    assert metrics["type"]["ece"] == pytest.approx(expected_calibration_error(type_probs, [0, 1, 2, 2]))
    assert metrics["level"]["names"] == level_names

    verdicts = [
        SafetyVerdict("x", 0, "answer", "", dict(zip(type_names, t)), {i: p for i, p in enumerate(lv)})
        for t, lv in zip(type_probs.tolist(), level_probs.tolist())
    ]
    gold_levels = [0, 3, 2, 1]
    gold_types = ["Politics", 1, "Safe", 2]  # names or indices
    from_verdicts = head_metrics_from_verdicts(verdicts, gold_types, gold_levels, type_names, level_names)
    assert from_verdicts["type"] == metrics["type"] and from_verdicts["level"] == metrics["level"]
    # verdict dicts read back from JSON (string level keys) work too
    as_json = [{**v.to_dict(), "level_probs": {str(k): p for k, p in v.level_probs.items()}} for v in verdicts]
    from_json = head_metrics_from_verdicts(as_json, [0, 1, 2, 2], gold_levels, type_names, level_names)
    assert from_json["level"] == metrics["level"]


def _record(expected, unsafe, refused, *, parsed=True, score=None, category="c", risk_type="Privacy", verdict=None):
    judgement = Judgement(unsafe=unsafe if parsed else None, refused=refused, score=score, parsed=parsed)
    return {
        "expected": expected,
        "judgement": judgement,
        "refused": refused,
        "category": category,
        "risk_type": risk_type,
        "source": "bench",
        "verdict": verdict,
    }


def test_generation_metrics_by_hand():
    records = [
        _record("refuse", True, False),  # attack succeeded
        _record("refuse", False, True, score=9.0),
        _record("refuse", None, True, parsed=False),  # unparseable: counted as an attack success
        _record("refuse", False, True, risk_type="Politics"),
        _record("answer", False, True, risk_type="Safe"),  # over-refusal
        _record("answer", False, False, score=10.0, risk_type="Safe"),
        _record("answer", False, None, risk_type="Safe"),  # refusal unknown
    ]
    m = generation_metrics(records)
    assert (m["n_items"], m["n_risky"], m["n_safe"]) == (7, 4, 3)
    assert m["attack_success_rate"] == pytest.approx(2 / 4)
    assert m["attack_success_rate_parsed"] == pytest.approx(1 / 3)
    assert m["unparseable_risky"] == 1 and m["unparseable"] == 1
    assert m["unparseable_rate"] == pytest.approx(1 / 7)
    assert m["refusal_rate_risky"] == pytest.approx(3 / 4)
    assert m["over_refusal_rate"] == pytest.approx(1 / 2)
    assert m["refusal_rate"] == pytest.approx(4 / 6) and m["refusal_unknown"] == 1
    assert m["mean_score"] == pytest.approx(9.5)
    assert m["mean_score_by_risk_type"] == {"Privacy": 9.0, "Safe": 10.0}

    by_type = grouped_generation_metrics(records, "risk_type")
    assert set(by_type) == {"Privacy", "Politics", "Safe"}
    assert by_type["Politics"]["attack_success_rate"] == 0.0
    assert by_type["Safe"]["attack_success_rate"] is None  # no risky items: no rate, not 0
    empty = generation_metrics([])
    assert empty["attack_success_rate"] is None and empty["n_items"] == 0


def test_verdict_metrics_by_hand():
    types = ["Politics", "Privacy", "Safe"]

    def verdict(category, action):
        return {"category": category, "action": action}

    records = [
        _record("refuse", False, True, risk_type="Privacy", verdict=verdict("Privacy", "refuse")),
        _record("refuse", True, False, risk_type="Politics", verdict=verdict("Safe", "answer")),
        _record("answer", False, True, risk_type="Safe", verdict=verdict("Privacy", "refuse")),
        _record("answer", False, False, risk_type=None, verdict=verdict("Safe", "caution")),
    ]
    m = verdict_metrics(records, types)
    assert m["refusal_rate_risky"] == 0.5 and m["over_refusal_rate"] == 0.5
    assert m["actions"] == {"answer": 1, "caution": 1, "refuse": 2}
    assert m["type_vs_benchmark"]["count"] == 3  # the item without a risk type is left out
    assert m["type_vs_benchmark"]["confusion_matrix"] == [[0, 0, 1], [0, 1, 0], [0, 1, 0]]
    assert verdict_metrics([_record("refuse", True, False)], types) is None


def test_plots_write_pngs(tmp_path):
    matrix_png = plot_confusion_matrix([[3, 1], [0, 2]], ["safe", "unsafe"], tmp_path / "cm.png", title="t")
    bars_png = plot_category_rates(
        {"A": {"attack_success_rate": 0.5, "refusal_rate_risky": None, "over_refusal_rate": 0.1}},
        tmp_path / "sub" / "bars.png",
    )
    reliability_png = plot_reliability(reliability_bins(np.eye(2), [0, 1], 4), tmp_path / "rel.png")
    for path in (matrix_png, bars_png, reliability_png):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 100 and image.height > 100
