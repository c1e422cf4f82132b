"""Smoke test of the performance suite: `python benchmarks/run.py --quick` runs every section on the tiny model.

Timings are never asserted (the machine is shared); the structure of the results, the forward-pass counts that
prove gating adds no LLM pass, the forced verdicts of the mixed batch and the counted FLOPs are.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "run.py"
SECTIONS = (
    "prefill_verdict",
    "decode",
    "decode_steps",
    "gate",
    "memory",
    "external_guard",
    "mixed_batch",
    "training",
    "parameters",
    "floors",
    "targets",
    "table",
    "meta",
    "markdown_table",
)


def _reject_constant(name: str):
    raise ValueError(f"results.json contains {name}, which is not valid JSON")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("benchmarks") / "results.json"
    # A subprocess, as users run it: the script pins malloc thresholds and thread counts for its own process.
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    results = json.loads(out.read_text(), parse_constant=_reject_constant)
    return results, completed.stdout


def test_writes_every_section_and_prints_the_table(quick_run):
    results, stdout = quick_run
    assert set(SECTIONS) <= set(results)
    assert results["meta"]["shape"]["name"] == "quick"
    header = results["markdown_table"].splitlines()[0]
    assert header.startswith("| Figure |") and header in stdout
    assert len(results["table"]) == len(results["markdown_table"].splitlines()) - 2
    for row in results["table"]:
        assert set(row) == {"figure", "measured", "ratio", "flops", "floor", "target"}
    for name, check in results["targets"].items():
        assert isinstance(check["met"], bool), name
        assert check["text"].endswith("met") or check["text"].endswith("MISSED"), name


def test_ratios_are_medians_of_paired_rounds(quick_run):
    results, _ = quick_run
    stats = [
        results["prefill_verdict"]["prefill_ratio"],
        results["prefill_verdict"]["assess_vs_prefill"],
        results["decode"]["step_ratio_gated_vs_llava"],
        results["decode_steps"]["batch_1"]["step_ratio"],
        results["decode_steps"]["batch_4"]["step_ratio"],
        results["decode"]["step_ratio_gated_vs_ungated"],
        results["external_guard"]["speedup_ttft"],
        results["mixed_batch"]["wall_ratio_half_refused_vs_llava"],
        results["training"]["step_ratio_stage1_vs_full"],
    ]
    for ratio in stats:
        assert 0 < ratio["q1"] <= ratio["median"] <= ratio["q3"]
        assert ratio["min_ratio"] > 0 and ratio["rounds"] >= 1
    # Interleaved decoding pairs every step of one model with the adjacent step of the other.
    settings = results["meta"]["settings"]
    for label in ("batch_1", "batch_4"):
        steps = results["decode_steps"][label]
        assert steps["steps"] == steps["step_ratio"]["rounds"] == settings["new_tokens"] * settings["step_rounds"]


def test_gating_adds_no_llm_forward_pass(quick_run):
    results, _ = quick_run
    new_tokens = results["decode"]["new_tokens"]
    calls = results["decode"]["forward_calls_per_generate"]
    # One LLM pass per generated token (prefill + new_tokens - 1 steps) and one vision pass, with or without gating.
    for variant in ("llava", "safevlm_gated", "safevlm_ungated"):
        assert calls[variant] == {"llm": new_tokens, "vision": 1}, variant
    for path in ("safevlm_assess", "safevlm_predict_safety"):
        assert results["prefill_verdict"]["forward_calls"][path] == {"llm": 0, "vision": 1}, path
    breakdown = results["prefill_verdict"]["breakdown_s"]
    assert breakdown["safevlm_assess"]["language_model"] == 0.0  # no time inside the LLM on the verdict path
    assert breakdown["safevlm_prefill"]["language_model"] > 0 and breakdown["safevlm_assess"]["vision_tower"] > 0
    guard = results["external_guard"]["forward_calls"]
    assert guard["guard_pattern"]["guard"]["llm"] == results["external_guard"]["guard_tokens"]
    assert guard["guard_pattern"]["llava"]["llm"] == new_tokens
    assert guard["safevlm"]["llm"] == new_tokens
    targets = results["targets"]["llm_forward_calls"]
    assert targets["met"] and targets["value"] == 0


def test_gate_adds_no_matrix_work_and_safevlm_counts_its_extra_tokens(quick_run):
    results, _ = quick_run
    step = results["decode"]["step_flops"]
    assert step["safevlm_gated"] == step["safevlm_ungated"]  # the gate is indexing only
    assert step["safevlm_gated"] > step["llava"]  # attention over the safety tokens in the KV cache
    flops = results["prefill_verdict"]["flops"]
    assert flops["safevlm_prefill"] > flops["llava_prefill"]
    assert 0 < flops["safevlm_assess"] < flops["safevlm_prefill"]
    training = results["training"]["flops"]
    assert 0 < training["stage1"] < training["full"]


def test_mixed_batch_gates_each_row_by_its_forced_verdict(quick_run):
    results, _ = quick_run
    batch = results["mixed_batch"]
    assert batch["levels"] == [3, 0, 3, 0]
    assert batch["safevlm_half_refused"]["actions"] == ["refuse", "answer", "refuse", "answer"]
    assert batch["safevlm_all_refused"]["actions"] == ["refuse"] * 4
    answered = [t for t, a in zip(batch["safevlm_half_refused"]["delivered_tokens"], batch["levels"]) if a == 0]
    assert answered == [batch["max_new_tokens"]] * 2
    assert batch["llava"]["delivered_tokens"] == [batch["max_new_tokens"]] * 4


def test_training_trains_only_the_safety_modules_in_stage1(quick_run):
    results, _ = quick_run
    training, params = results["training"], results["parameters"]["mid"]
    assert training["trainable_params"]["stage1"] == params["safety_params"]
    assert training["trainable_params"]["full"] == params["safety_params"] + params["base_params"]
    moments = training["adamw_moment_bytes"]  # two fp32 moments per trainable parameter
    assert moments["stage1"] == 2 * 4 * params["safety_params"]
    # Full fine-tuning: every parameter that gets a gradient (not the vision layers after the feature layer).
    assert moments["stage1"] < moments["full"] <= 2 * 4 * (params["safety_params"] + params["base_params"])


def test_real_shape_overhead_and_floors(quick_run):
    results, _ = quick_run
    seven = results["parameters"]["llava-1.5-7b"]["parameters"]
    assert abs(seven["base_params"] - 7.06e9) / 7.06e9 < 0.01
    assert seven["safety_fraction"] <= 0.02 and results["targets"]["safety_params"]["met"]
    floors = results["floors"]["llava-1.5-7b"]
    # 64 safety tokens beside 576 image tokens and 40 text tokens: about 10 % more LLM prefill work, and the
    # verdict (vision tower + safety branch) a small fraction of the prefill.
    assert 0.08 < floors["prefill_overhead"] < 0.14
    assert floors["verdict_fraction"] < 0.1
    assert 0 < floors["decode_overhead"] < 0.01
