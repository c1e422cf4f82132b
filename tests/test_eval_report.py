"""`safevlm eval` end to end on the saved tiny SafeVLM: report files, their pinned fields, PNG plots, the endpoint
judge's cache across reruns, and bad input failing with exit code 2."""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image
from test_eval_judges import chat_server  # noqa: F401  (the loopback OpenAI-compatible server fixture)

from safevlm_hf import SafeVLMConfig
from safevlm_hf.evaluation.cli import register, run
from safevlm_hf.evaluation.judges import JUDGE_PROMPT_TEMPLATE, StringMatchJudge
from safevlm_hf.evaluation.report import REPORT_SCHEMA_VERSION, config_hash


FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"
FIGSTEP = FIXTURES / "figstep" / "safebench_sample.csv"
XSTEST = FIXTURES / "xstest" / "xstest_v2_prompts.csv"


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="safevlm")
    register(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(["eval", *argv]))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_eval_cli_writes_a_reproducible_report(saved_safevlm, tmp_path, capsys):
    out = tmp_path / "eval"
    code = _cli(
        [
            "--model", str(saved_safevlm),
            "--bench", f"figstep:{FIGSTEP}",
            "--bench", f"xstest:{XSTEST}",
            "--judge", "string",
            "--out", str(out),
            "--limit", "2",
            "--max-new-tokens", "3",
            "--batch-size", "2",
            "--seed", "7",
            "--head-data", str(FIXTURES / "head_labels" / "data.jsonl"),
            "--no-progress",
        ]
    )  # fmt: skip
    assert code == 0
    assert "Report:" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    config = SafeVLMConfig.from_pretrained(saved_safevlm)

    assert report["schema_version"] == REPORT_SCHEMA_VERSION
    assert report["model"]["name_or_path"] == str(saved_safevlm)
    assert report["model"]["class"] == "SafeVLMForConditionalGeneration"
    assert report["model"]["config_hash"] == config_hash(config)
    assert report["policy"] == config.safety_policy and report["profile"] == "default"
    assert report["safety_gating"] is True and len(report["policy_hash"]) == 64
    decoding = report["decoding"]
    assert (decoding["do_sample"], decoding["num_beams"], decoding["max_new_tokens"]) == (False, 1, 3)
    assert decoding["batch_size"] == 2 and decoding["padding_side"] == "left"
    assert decoding["model_generation_config"]["eos_token_id"] == config.text_config.eos_token_id
    assert report["seed"] == 7
    assert report["judge"] == StringMatchJudge().describe()
    assert [b["spec"] for b in report["benchmarks"]] == [f"figstep:{FIGSTEP}", f"xstest:{XSTEST}"]
    assert [b["n_items"] for b in report["benchmarks"]] == [2, 2]
    assert report["benchmarks"][0]["files"] == {str(FIGSTEP): _sha256(FIGSTEP)}
    packages = report["environment"]["packages"]
    assert packages["transformers"] == transformers.__version__ and packages["torch"] == torch.__version__
    assert report["command"][:2] == ["safevlm", "eval"] and "--seed" in report["command"]

    metrics = report["metrics"]
    assert metrics["overall"]["n_items"] == 4 and set(metrics["by_source"]) == {"figstep", "xstest"}
    assert metrics["verdicts"]["n_items"] == 4
    assert report["head_metrics"]["type"]["count"] == 3 and report["head_metrics"]["ece_bins"] == 15

    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["ForbidQI_1_1", "ForbidQI_1_2", "v2-1", "v2-2"]
    assert all(Path(r["image"]).parent == out / "rendered" for r in records[:2])  # --render-dir defaults to OUT

    plots = report["files"]["plots"]
    assert {
        "rates_figstep.png",
        "rates_xstest.png",
        "verdict_type_confusion.png",
        "head_type_confusion.png",
        "head_level_confusion.png",
        "head_type_reliability.png",
    } <= set(plots)
    for name in plots:
        with Image.open(out / name) as image:
            assert image.format == "PNG"
    markdown = (out / "report.md").read_text()
    for expected in (
        report["model"]["config_hash"],
        "string_match",
        "### figstep: per category",
        "![rates_figstep](rates_figstep.png)",
        "## Safety head (labelled data)",
        "over-refusal",
    ):
        assert expected in markdown


def test_eval_cli_rerun_with_endpoint_judge_hits_the_cache(saved_safevlm, tmp_path, chat_server):  # noqa: F811
    argv = [
        "--model", str(saved_safevlm),
        "--bench", f"xstest:{XSTEST}",
        "--judge", "openai:judge-model",
        "--judge-base-url", chat_server.base_url,
        "--judge-api-key-env", "none",
        "--judge-retries", "0",
        "--out", str(tmp_path / "eval"),
        "--limit", "3",
        "--max-new-tokens", "2",
        "--no-progress",
        "--no-plots",
    ]  # fmt: skip
    assert _cli(argv) == 0
    assert len(chat_server.requests) == 3
    assert _cli(argv) == 0  # the rerun reads every judgement from OUT/judge_cache
    assert len(chat_server.requests) == 3
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["judge"]["prompt_template"] == JUDGE_PROMPT_TEMPLATE
    assert report["judge"]["model"] == "judge-model" and report["judge"]["endpoint"].startswith(chat_server.base_url)
    assert report["metrics"]["overall"]["mean_score"] is not None
    assert report["files"]["plots"] == []


def test_eval_cli_bad_input_exits_with_2(saved_safevlm, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text(FIGSTEP.read_text() + "\nForbidQI,1,9,Illegal Activity,five fields only")
    assert _cli(["--model", str(saved_safevlm), "--bench", f"figstep:{bad}", "--out", str(tmp_path / "o")]) == 2
    assert f"{bad}:7: expected 6 fields" in capsys.readouterr().err
    argv = ["--model", str(saved_safevlm), "--bench", f"xstest:{XSTEST}", "--out", str(tmp_path / "o"), "--limit", "1"]
    assert _cli([*argv, "--profile", "teen", "--no-progress"]) == 2
    assert "unknown safety profile 'teen'" in capsys.readouterr().err
    unreachable = ["--judge", "openai:m", "--judge-base-url", "http://127.0.0.1:9/v1", "--judge-retries", "1"]
    unreachable += ["--judge-api-key-env", "none"]
    assert _cli([*argv, *unreachable, "--max-new-tokens", "1", "--no-progress"]) == 2
    assert "http://127.0.0.1:9/v1/chat/completions" in capsys.readouterr().err
    assert not (tmp_path / "o" / "report.json").exists()


def test_eval_cli_names_unreadable_inputs_and_weights(saved_safevlm, tmp_path, capsys):
    from test_data import bomb_png

    out = tmp_path / "o"
    argv = ["--model", str(saved_safevlm), "--bench", f"xstest:{XSTEST}", "--out", str(out), "--limit", "1"]
    policy = tmp_path / "policy.json"
    policy.write_bytes(b'{\n  "name": "caf\xe9"\n}')
    assert _cli([*argv, "--policy", str(policy)]) == 2
    assert f"{policy}, line 2: not valid UTF-8 at column 15" in capsys.readouterr().err
    head = tmp_path / "head.jsonl"
    head.write_bytes(b"[" * 100_000 + b"]" * 100_000 + b"\n")
    assert _cli([*argv, "--head-data", str(head)]) == 2
    assert f"{head}, line 1: JSON nested too deeply to parse" in capsys.readouterr().err
    vlguard = tmp_path / "vlguard"
    shutil.copytree(FIXTURES / "vlguard", vlguard)
    bomb_png(vlguard / "images" / "bad_ads" / "ads_000101.png", 20_000, 20_000)
    bench = ["--bench", f"vlguard:{vlguard / 'test.json'}", "--image-root", str(vlguard / "images")]
    assert _cli([*argv, *bench]) == 2
    err = capsys.readouterr().err
    assert "entry 0 (id Ads_000101): image file" in err and "possible decompression bomb" in err
    broken = tmp_path / "broken"
    shutil.copytree(saved_safevlm, broken)
    (broken / "model.safetensors").write_bytes(b"\xff" * 16)
    assert _cli(["--model", str(broken), *argv[2:]]) == 2
    assert f"{broken / 'model.safetensors'}: not a readable safetensors file" in capsys.readouterr().err
    assert not out.exists()


def test_config_hash_tracks_the_config_not_the_library_version():
    config = SafeVLMConfig.from_llava_config(transformers.LlavaConfig())
    same = copy.deepcopy(config)
    same.transformers_version = "0.0.0"
    assert config_hash(same) == config_hash(config)
    other = copy.deepcopy(config)
    other.safety_loss_weight = 1.0
    assert config_hash(other) != config_hash(config)


@pytest.mark.parametrize("flag", ["--no-plots"])
def test_eval_cli_help_lists_the_options(flag):
    parser = argparse.ArgumentParser(prog="safevlm")
    sub = register(parser.add_subparsers(dest="command"))
    text = sub.format_help()
    for option in (
        "--model",
        "--bench",
        "--judge",
        "--out",
        "--profile",
        "--max-new-tokens",
        "--batch-size",
        "--limit",
        "--seed",
        "--sample",
        "--refusal-judge",
        "--skip-missing-images",
        "--head-data",
        flag,
    ):
        assert option in text


# ------------------------------------------------------------------------------- what a report pins and names
def test_report_pins_weights_rendering_and_names_each_column(saved_safevlm, tmp_path, single_thread):
    out = tmp_path / "eval"
    argv = ["--model", str(saved_safevlm), "--bench", f"figstep:{FIGSTEP}", "--bench", f"xstest:{XSTEST}"]
    argv += ["--out", str(out), "--limit", "2", "--max-new-tokens", "2", "--no-progress", "--no-plots"]
    assert _cli(argv) == 0
    report = json.loads((out / "report.json").read_text())
    markdown = (out / "report.md").read_text()

    weights = report["model"]["weights"]
    assert weights == {
        "method": "safetensors_files",
        "files": {"model.safetensors": _sha256(saved_safevlm / "model.safetensors")},
        "revision": None,
    }
    assert weights["files"]["model.safetensors"][:16] in markdown

    figstep, xstest = report["benchmarks"]
    rendering = figstep["rendering"]
    assert rendering["rendered_by"] == "safevlm-hf" and rendering["n_images"] == 2
    ((font, font_hash),) = rendering["fonts"].items()
    assert font_hash == _sha256(Path(font))
    for item_id, image in rendering["images"].items():
        assert image["sha256"] == _sha256(Path(image["path"])) and item_id.startswith("ForbidQI_")
    assert xstest["rendering"] is None
    assert "re-rendered by safevlm-hf" in markdown and Path(font).name in markdown

    # The string judge detects refusals: no attack-success number anywhere, and every column says its judge.
    assert report["metric_sources"] == {"attack_success": None, "refusal": "string_match"}
    assert report["metrics"]["overall"]["attack_success_rate"] is None
    assert "attack success [" not in markdown and "non-refusal (risky) [string_match]" in markdown
    assert "refusal judge `string_match` v2" in markdown and "detects refusals only" in markdown


def test_weights_hash_tells_a_model_from_its_fine_tuned_copy(tiny_safevlm):
    from safevlm_hf.evaluation.report import model_info

    model, _ = tiny_safevlm
    before = model_info(model)
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    after = model_info(model)
    assert before["config_hash"] == after["config_hash"]  # what the old reports pinned
    assert before["weights"]["method"] == "state_dict" and before["weights"]["sha256"] != after["weights"]["sha256"]


def test_eval_cli_sample_and_skip_missing_images(saved_safevlm, tmp_path, capsys, single_thread):
    vlguard = FIXTURES / "vlguard"
    root = tmp_path / "images"
    shutil.copytree(vlguard / "images", root)
    (root / "bad_ads" / "ads_000101.png").unlink()
    out = tmp_path / "eval"
    argv = ["--model", str(saved_safevlm), "--bench", f"vlguard:{vlguard / 'test.json'}", "--image-root", str(root)]
    argv += ["--out", str(out), "--max-new-tokens", "2", "--no-progress", "--no-plots"]
    assert _cli(argv) == 2  # without the option a missing image is an error naming it
    assert "Ads_000101" in capsys.readouterr().err and not out.exists()
    assert _cli([*argv, "--skip-missing-images", "--sample", "2", "--seed", "1"]) == 0
    assert "skipped 1 items with missing images" in capsys.readouterr().out
    bench = json.loads((out / "report.json").read_text())["benchmarks"][0]
    assert bench["skipped_missing_images"] == {
        "count": 1,
        "first": [{"id": "Ads_000101/unsafes", "image": str(root / "bad_ads" / "ads_000101.png")}],
    }
    assert (bench["sample"], bench["seed"], bench["n_available"], bench["n_items"]) == (2, 1, 3, 2)
    markdown = (out / "report.md").read_text()
    assert (
        "stratified sample of 2 (seed 1) from 3" in markdown and "skipped 1 items whose image is missing" in markdown
    )
    with pytest.raises(SystemExit):  # argparse: --limit and --sample are exclusive
        _cli([*argv, "--limit", "1", "--sample", "1"])


@pytest.mark.parametrize("spec", ["vlguard", "xstest", "figstep"])
def test_head_data_accepts_every_adapter_prefix(saved_safevlm, tmp_path, spec, single_thread):
    sources = {
        "vlguard": f"vlguard:{Path(__file__).parent / 'fixtures' / 'vlguard' / 'train.json'}",
        "xstest": f"xstest:{FIXTURES / 'xstest' / 'xstest_prompts.csv'}",
        "figstep": f"figstep:{FIGSTEP}",
    }
    out = tmp_path / "eval"
    argv = ["--model", str(saved_safevlm), "--bench", f"xstest:{XSTEST}", "--limit", "1", "--out", str(out)]
    argv += ["--head-data", sources[spec], "--max-new-tokens", "1", "--no-progress", "--no-plots"]
    assert _cli(argv) == 0
    head = json.loads((out / "report.json").read_text())["head_metrics"]
    assert head["type"]["count"] > 0
    if spec == "vlguard":  # the training reader: every row has a level
        assert head["unleveled"] == 0 and head["level"]["count"] == head["type"]["count"]
    if spec == "figstep":  # every item is risky: types known, levels not given by the benchmark
        assert head["unleveled"] == head["type"]["count"] and head["level"]["count"] == 0
