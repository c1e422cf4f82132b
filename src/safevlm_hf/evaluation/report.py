"""Evaluation reports: one JSON file that pins everything needed to reproduce the numbers, a Markdown rendering of
it, the per-item records (JSON Lines) and PNG plots.

Pinned in ``report.json`` (schema version :data:`REPORT_SCHEMA_VERSION`):

* ``model``: ``name_or_path``, ``class``, ``config_hash`` (SHA-256 of the config without version stamps),
  ``model_type``, parameter count and dtype;
* ``policy`` (the full SafeVLM policy dict), ``policy_hash`` and ``profile``;
* ``decoding``: every ``generate`` setting used (greedy by default), the model's own generation config, batch size,
  padding side;
* ``seed``;
* ``judge``: the judge's :meth:`~.judges.Judge.describe` (name, version, model, full prompt template(s), rubrics,
  settings), and ``refusal_judge`` when refusals came from a second judge;
* ``benchmarks``: spec, item count and SHA-256 of each input file;
* ``environment``: Python, platform and package versions;
* ``metrics`` (overall, per benchmark, per category, per risk type, verdicts) and ``head_metrics`` when computed.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

from .benchmarks import BenchmarkItem, parse_benchmark_spec
from .metrics import plot_category_rates, plot_confusion_matrix, plot_reliability
from .runner import EvaluationResult


REPORT_SCHEMA_VERSION = 1
_PACKAGES = (
    "safevlm-hf",
    "torch",
    "transformers",
    "tokenizers",
    "accelerate",
    "peft",
    "numpy",
    "pillow",
    "matplotlib",
)
# Keys of config.to_dict() that record who saved or loaded the config, not what the model is (the dtype a model was
# loaded in is reported on its own, as model.dtype).
_CONFIG_HASH_EXCLUDED = ("transformers_version", "_name_or_path", "_commit_hash", "dtype", "torch_dtype")


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def config_hash(config: Any) -> str:
    """SHA-256 of a model config (``to_dict()`` without version stamps, path and load dtype; keys sorted)."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in _CONFIG_HASH_EXCLUDED}
        return value

    return _sha256_json(strip(data))


def model_info(model: Any) -> dict[str, Any]:
    """Identity of the evaluated model: where it came from, its class and a hash of its config."""
    config = getattr(model, "config", None)
    first = next(model.parameters(), None) if hasattr(model, "parameters") else None
    return {
        "name_or_path": str(getattr(model, "name_or_path", "") or getattr(config, "_name_or_path", "") or ""),
        "class": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "config_hash": config_hash(config) if config is not None else None,
        "num_parameters": sum(p.numel() for p in model.parameters()) if first is not None else None,
        "dtype": str(first.dtype).replace("torch.", "") if first is not None else None,
        "safety_base_model": getattr(config, "safety_base_model", None),
    }


def environment_info() -> dict[str, Any]:
    """Python, platform and installed package versions (``None`` for a package that is not installed)."""
    versions = {}
    for package in _PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    info: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(), "packages": versions}
    try:
        import torch

        info["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
        info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    return info


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def benchmark_info(spec: str, items: Sequence[BenchmarkItem], limit: int | None = None) -> dict[str, Any]:
    """What a report records about one benchmark: the spec, item counts and the SHA-256 of its input files."""
    name, path, option = parse_benchmark_spec(spec)
    files = sorted({item.metadata["file"] for item in items if item.metadata.get("file")})
    return {
        "spec": spec,
        "name": name,
        "path": path,
        "option": option,
        "limit": limit,
        "n_items": len(items),
        "n_risky": sum(1 for item in items if item.is_risky),
        "n_safe": sum(1 for item in items if not item.is_risky),
        "files": {file: file_sha256(file) for file in files},
    }


def build_report(
    result: EvaluationResult,
    *,
    model: Any,
    benchmarks: Sequence[Mapping[str, Any]] = (),
    head_metrics: Mapping[str, Any] | None = None,
    command: Sequence[str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the report dict of a run (see the module docstring for the pinned fields)."""
    settings = result.settings
    decoding = {
        **settings.get("generation", {}),
        "batch_size": settings.get("batch_size"),
        "padding_side": settings.get("padding_side"),
        "model_generation_config": settings.get("model_generation_config"),
    }
    policy = settings.get("policy")
    report = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": list(command) if command is not None else None,
        "model": model_info(model),
        "safety_gating": settings.get("safety_gating"),
        "profile": settings.get("profile"),
        "policy": policy,
        "policy_hash": _sha256_json(policy) if policy is not None else None,
        "decoding": decoding,
        "seed": settings.get("seed"),
        "judge": settings.get("judge"),
        "refusal_judge": settings.get("refusal_judge"),
        "benchmarks": [dict(b) for b in benchmarks],
        "environment": environment_info(),
        "metrics": result.metrics,
        "head_metrics": dict(head_metrics) if head_metrics is not None else None,
    }
    if extra:
        report["extra"] = dict(extra)
    return report


# ------------------------------------------------------------------------------------------------- markdown
def _percent(value: Any) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _number(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


_GENERATION_COLUMNS = (
    ("items", lambda m: str(m["n_items"])),
    ("risky", lambda m: str(m["n_risky"])),
    ("safe", lambda m: str(m["n_safe"])),
    ("ASR", lambda m: _percent(m["attack_success_rate"])),
    ("ASR (parsed only)", lambda m: _percent(m["attack_success_rate_parsed"])),
    ("refusal (risky)", lambda m: _percent(m["refusal_rate_risky"])),
    ("over-refusal (safe)", lambda m: _percent(m["over_refusal_rate"])),
    ("unparseable", lambda m: str(m["unparseable"])),
    ("mean score", lambda m: _number(m["mean_score"], 2)),
)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _generation_table(first_column: str, table: Mapping[str, Mapping[str, Any]]) -> str:
    header = [first_column, *(name for name, _ in _GENERATION_COLUMNS)]
    rows = [[name, *(fmt(metrics) for _, fmt in _GENERATION_COLUMNS)] for name, metrics in table.items()]
    return _table(header, rows)


def _report_table(report: Mapping[str, Any], title: str) -> str:
    rows = [
        [name, _number(v["precision"]), _number(v["recall"]), _number(v["f1"]), str(v["support"])]
        for name, v in report["per_class"].items()
    ]
    summary = f"accuracy {_percent(report['accuracy'])}, macro-F1 {_number(report['macro_f1'])}"
    if report.get("ece") is not None:
        summary += f", ECE {_number(report['ece'])}"
    if report.get("mean_absolute_error") is not None:
        summary += f", mean absolute level error {_number(report['mean_absolute_error'])}"
    return f"**{title}**: {summary}\n\n" + _table(["label", "precision", "recall", "F1", "support"], rows)


def render_markdown(report: Mapping[str, Any], plots: Sequence[str] = ()) -> str:
    """The report as Markdown: reproduction settings first, then the metric tables and the plots."""
    model, judge, metrics = report["model"], report["judge"] or {}, report["metrics"]
    decoding = {k: v for k, v in report["decoding"].items() if k != "model_generation_config"}
    settings_rows = [
        ["model", f"`{model['name_or_path']}` ({model['class']}, {model['dtype']})"],
        ["config hash", f"`{model['config_hash']}`"],
        ["safety gating", str(report["safety_gating"])],
        ["profile", str(report["profile"])],
        ["policy hash", f"`{report['policy_hash']}`" if report["policy_hash"] else "n/a"],
        ["decoding", f"`{json.dumps(decoding)}`"],
        ["seed", str(report["seed"])],
        ["judge", f"{judge.get('name')} v{judge.get('version')} (model: {judge.get('model')})"],
        ["packages", ", ".join(f"{k} {v}" for k, v in report["environment"]["packages"].items() if v)],
    ]
    if report.get("command"):
        settings_rows.append(["command", f"`{' '.join(report['command'])}`"])

    out = [f"# Safety evaluation: {model['name_or_path'] or model['class']}", "", "## Reproduction", ""]
    out += [_table(["setting", "value"], settings_rows), ""]
    for bench in report["benchmarks"]:
        hashes = ", ".join(f"`{Path(f).name}` sha256 `{h[:16]}`" for f, h in bench["files"].items())
        out.append(f"- **{bench['name']}** `{bench['spec']}`: {bench['n_items']} items ({hashes})")
    judge_json = json.dumps(judge, indent=2, ensure_ascii=False)
    out += ["", "<details><summary>Judge description (full prompt)</summary>", "", "```json", judge_json, "```"]
    out += ["", "</details>", ""]

    out += ["## Results", "", _generation_table("benchmark", {"all": metrics["overall"], **metrics["by_source"]})]
    out += ["", "ASR counts unparseable judgements as unsafe; the parsed-only ASR leaves them out.", ""]
    for source, table in metrics["by_category"].items():
        out += [f"### {source}: per category", "", _generation_table("category", table), ""]
    out += ["### Per SafeVLM risk type", "", _generation_table("risk type", metrics["by_risk_type"]), ""]
    scores = metrics["overall"].get("mean_score_by_risk_type") or {}
    if scores:
        rows = [[name, _number(value, 2)] for name, value in scores.items()]
        out += ["### Rubric scores (1-10, 10 = safest)", "", _table(["risk type", "mean score"], rows), ""]
    verdicts = metrics.get("verdicts")
    if verdicts:
        summary = (
            f"Refused {_percent(verdicts['refusal_rate_risky'])} of risky items and "
            f"{_percent(verdicts['over_refusal_rate'])} of safe items; actions: {verdicts['actions']}."
        )
        out += ["### Safety-head verdicts (before generation)", "", summary, ""]
        if verdicts.get("type_vs_benchmark"):
            out += [_report_table(verdicts["type_vs_benchmark"], "Predicted type vs benchmark risk type"), ""]
    head = report.get("head_metrics")
    if head:
        out += ["## Safety head (labelled data)", "", _report_table(head["type"], "Risk type"), ""]
        out += [_report_table(head["level"], "Risk level"), "", f"ECE uses {head['ece_bins']} equal-width bins.", ""]
    if plots:
        out += ["## Plots", "", *(f"![{Path(p).stem}]({p})" for p in plots), ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------- files
def write_report(
    report: Mapping[str, Any],
    out_dir: str | Path,
    *,
    records: Sequence[Mapping[str, Any]] | None = None,
    plots: bool = True,
) -> dict[str, Path]:
    """Write ``report.json``, ``report.md``, ``records.jsonl`` (when ``records`` are given) and PNG plots to
    ``out_dir``; returns the written paths by role."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    plot_files: list[str] = []
    if plots:
        metrics = report["metrics"]
        for source, table in metrics["by_category"].items():
            path = plot_category_rates(table, out / f"rates_{source}.png", title=f"{source}: rates per category")
            plot_files.append(path.name)
        path = plot_category_rates(
            metrics["by_risk_type"], out / "rates_by_risk_type.png", title="Rates per risk type"
        )
        plot_files.append(path.name)
        verdicts = metrics.get("verdicts")
        if verdicts and verdicts.get("type_vs_benchmark"):
            table = verdicts["type_vs_benchmark"]
            path = plot_confusion_matrix(
                table["confusion_matrix"],
                table["labels"],
                out / "verdict_type_confusion.png",
                title="Head type vs benchmark risk type",
                ylabel="benchmark risk type",
                xlabel="predicted type",
            )
            plot_files.append(path.name)
        head = report.get("head_metrics")
        if head:
            for key, title in (("type", "Risk type"), ("level", "Risk level")):
                labels = head[key].get("names", head[key]["labels"])
                path = plot_confusion_matrix(
                    head[key]["confusion_matrix"], labels, out / f"head_{key}_confusion.png", title=title
                )
                plot_files.append(path.name)
                path = plot_reliability(
                    head["reliability"][key], out / f"head_{key}_reliability.png", title=f"{title} calibration"
                )
                plot_files.append(path.name)
    report = {**report, "files": {"records": "records.jsonl" if records is not None else None, "plots": plot_files}}
    written["json"] = out / "report.json"
    written["json"].write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    written["markdown"] = out / "report.md"
    written["markdown"].write_text(render_markdown(report, plot_files), encoding="utf-8")
    if records is not None:
        written["records"] = out / "records.jsonl"
        with written["records"].open("w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
    for name in plot_files:
        written[f"plot:{name}"] = out / name
    return written


__all__ = [
    "REPORT_SCHEMA_VERSION",
    "benchmark_info",
    "build_report",
    "config_hash",
    "environment_info",
    "file_sha256",
    "model_info",
    "render_markdown",
    "write_report",
]
