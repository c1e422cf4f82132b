"""Evaluation reports: one JSON file that pins everything needed to reproduce the numbers, a Markdown rendering of
it, the per-item records (JSON Lines) and PNG plots.

Pinned in ``report.json`` (schema version :data:`REPORT_SCHEMA_VERSION`):

* ``model``: ``name_or_path``, ``class``, ``config_hash`` (SHA-256 of the config without version stamps),
  ``model_type``, parameter count, dtype and ``weights``: the SHA-256 of each ``*.safetensors`` file the model was
  loaded from, or of its state dict for a model that lives in memory
  (:func:`~.provenance.weights_fingerprint`) - a model and its fine-tuned copy share a config, not their weights;
* ``policy`` (the full SafeVLM policy dict), ``policy_hash`` and ``profile``;
* ``decoding``: every ``generate`` setting used (greedy by default), the model's own generation config, batch size,
  padding side;
* ``seed``;
* ``judge``: the judge's :meth:`~.judges.Judge.describe` (name, version, model with its revision and weights hash,
  full prompt template(s), rubrics, settings), ``refusal_judge`` when refusals came from a second judge, and
  ``metric_sources``: which judge produced attack success (a harm judge, or none) and which the refusal rates;
* ``benchmarks``: spec, how items were chosen (limit / stratified sample and seed), item counts, SHA-256 of each
  input file, the items skipped for missing images, and for benchmarks whose images this package re-renders
  (FigStep, MM-SafetyBench TYPO): the mark ``rendered_by: safevlm-hf``, the font file(s) with their SHA-256 and the
  SHA-256 of every rendered image;
* ``environment``: Python, platform and package versions;
* ``metrics`` (overall, per benchmark, per category, per risk type, verdicts) and ``head_metrics`` when computed.

Credentials (``user:password@`` in URLs, ``?api-key=`` values, bearer tokens, key-shaped strings) are redacted
from every string of the report before it is written (:func:`~.redaction.redact`).
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

from .safety_benchmarks import RENDERED_BY, BenchmarkItem, parse_benchmark_spec
from .metrics import plot_category_rates, plot_confusion_matrix, plot_reliability
from .provenance import file_sha256, weights_fingerprint
from .redaction import redact
from .runner import EvaluationResult


REPORT_SCHEMA_VERSION = 2
#: How many skipped item paths a report lists (the count is always complete).
SKIPPED_SHOWN = 5
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


def model_info(model: Any, weights: str = "auto") -> dict[str, Any]:
    """Identity of the evaluated model: where it came from, its class, a hash of its config and of its weights
    (``weights``: ``"auto"``, ``"files"`` or ``"state_dict"``, see :func:`~.provenance.weights_fingerprint`)."""
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
        "weights": weights_fingerprint(model, weights) if first is not None else None,
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


def rendering_info(items: Sequence[BenchmarkItem]) -> dict[str, Any] | None:
    """For items whose images this package rendered: who rendered them, the font file(s) with their SHA-256, and the
    SHA-256 of every rendered image (``None`` when no image was rendered)."""
    rendered = [item for item in items if item.metadata.get("rendered") and item.image is not None]
    if not rendered:
        return None
    fonts = sorted({item.metadata["font"] for item in rendered if item.metadata.get("font")})
    return {
        "rendered_by": RENDERED_BY,
        "renderer": "safevlm_hf.evaluation.typography",
        "styles": sorted({item.metadata.get("render_style", "") for item in rendered} - {""}),
        "fonts": {font: file_sha256(font) for font in fonts},
        "n_images": len(rendered),
        "images": {item.id: {"path": str(item.image), "sha256": file_sha256(item.image)} for item in rendered},
    }


def benchmark_info(
    spec: str,
    items: Sequence[BenchmarkItem],
    limit: int | None = None,
    *,
    sample: int | None = None,
    seed: int | None = None,
    n_available: int | None = None,
    skipped_missing_images: Sequence[tuple[str, str]] = (),
) -> dict[str, Any]:
    """What a report records about one benchmark: the spec, how the items were chosen, item counts, the SHA-256 of
    its input files, the items skipped for missing images and, when images were re-rendered here, :func:`rendering_info`.
    """
    name, path, option = parse_benchmark_spec(spec)
    files = sorted({item.metadata["file"] for item in items if item.metadata.get("file")})
    skipped = list(skipped_missing_images)
    return {
        "spec": spec,
        "name": name,
        "path": path,
        "option": option,
        "limit": limit,
        "sample": sample,
        "seed": seed,
        "n_available": len(items) if n_available is None else n_available,
        "n_items": len(items),
        "n_risky": sum(1 for item in items if item.is_risky),
        "n_safe": sum(1 for item in items if not item.is_risky),
        "files": {file: file_sha256(file) for file in files},
        "skipped_missing_images": {
            "count": len(skipped),
            "first": [{"id": item_id, "image": image} for item_id, image in skipped[:SKIPPED_SHOWN]],
        },
        "rendering": rendering_info(items),
    }


def build_report(
    result: EvaluationResult,
    *,
    model: Any,
    benchmarks: Sequence[Mapping[str, Any]] = (),
    head_metrics: Mapping[str, Any] | None = None,
    command: Sequence[str] | None = None,
    extra: Mapping[str, Any] | None = None,
    weights: str = "auto",
) -> dict[str, Any]:
    """Assemble the report dict of a run (see the module docstring for the pinned fields). ``weights`` chooses how
    the model's weights are hashed (:func:`~.provenance.weights_fingerprint`): pass ``"state_dict"`` for a model
    changed in memory since it was loaded."""
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
        "model": model_info(model, weights),
        "safety_gating": settings.get("safety_gating"),
        "profile": settings.get("profile"),
        "policy": policy,
        "policy_hash": _sha256_json(policy) if policy is not None else None,
        "decoding": decoding,
        "seed": settings.get("seed"),
        "judge": settings.get("judge"),
        "refusal_judge": settings.get("refusal_judge"),
        "metric_sources": settings.get("metric_sources"),
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


def _generation_columns(sources: Mapping[str, Any], scores: bool = True) -> list[tuple[str, Any]]:
    """The metric columns of the generation tables, each named for the judge that produced it: attack success only
    from a harm judge; without one, the refusal judge's non-refusal rate on risky items takes its place."""
    harm, refusal = sources.get("attack_success"), sources.get("refusal")
    columns: list[tuple[str, Any]] = [
        ("items", lambda m: str(m["n_items"])),
        ("risky", lambda m: str(m["n_risky"])),
        ("safe", lambda m: str(m["n_safe"])),
    ]
    if harm:
        columns += [
            (f"attack success [{harm}]", lambda m: _percent(m["attack_success_rate"])),
            (f"attack success, parsed only [{harm}]", lambda m: _percent(m["attack_success_rate_parsed"])),
        ]
    if refusal:
        if not harm:
            columns.append((f"non-refusal (risky) [{refusal}]", lambda m: _percent(m.get("non_refusal_rate"))))
        columns += [
            (f"refusal (risky) [{refusal}]", lambda m: _percent(m["refusal_rate_risky"])),
            (f"over-refusal (safe) [{refusal}]", lambda m: _percent(m["over_refusal_rate"])),
        ]
    columns.append(("unparseable", lambda m: str(m["unparseable"])))
    if harm and scores:
        columns.append((f"mean score [{harm}]", lambda m: _number(m["mean_score"], 2)))
    return columns


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _generation_table(
    first_column: str, table: Mapping[str, Mapping[str, Any]], columns: Sequence[tuple[str, Any]]
) -> str:
    header = [first_column, *(name for name, _ in columns)]
    rows = [[name, *(fmt(metrics) for _, fmt in columns)] for name, metrics in table.items()]
    return _table(header, rows)


def _judge_line(judge: Mapping[str, Any] | None) -> str:
    """``name vVERSION`` with the model, its revision and a weights hash when the judge is a model."""
    if not judge:
        return "none"
    line = f"`{judge.get('name')}` v{judge.get('version')}"
    if judge.get("model"):
        line += f" (model `{judge['model']}`"
        weights = judge.get("weights") or {}
        if weights.get("revision"):
            line += f", revision `{weights['revision']}`"
        line += f", weights {_weights_text(weights)})" if weights else ")"
    return line


def _refusal_judge_line(report: Mapping[str, Any], sources: Mapping[str, Any]) -> str:
    if report.get("refusal_judge"):
        return _judge_line(report["refusal_judge"])
    return "the judge" if sources.get("refusal") else "none (refusal rates not computed)"


def _weights_text(weights: Mapping[str, Any] | None) -> str:
    if not weights:
        return "n/a"
    if weights.get("method") == "safetensors_files":
        return ", ".join(f"`{name}` sha256 `{digest[:16]}`" for name, digest in weights["files"].items())
    return f"state dict sha256 `{weights.get('sha256', '')[:16]}`"


def _sources_section(report: Mapping[str, Any]) -> list[str]:
    """Which judge produced every column (the metric_sources of the run)."""
    sources = report.get("metric_sources") or {}
    judge, refusal_judge = report.get("judge") or {}, report.get("refusal_judge")
    harm, refusal = sources.get("attack_success"), sources.get("refusal")
    refusal_description = refusal_judge if refusal_judge and refusal_judge.get("name") == refusal else judge
    rows = [
        [
            "attack success, unparseable, mean score",
            f"harm judge {_judge_line(judge)}" if harm else "not computed: the judge does not decide harm",
        ],
        [
            "refusal, non-refusal, over-refusal",
            f"refusal judge {_judge_line(refusal_description)}"
            if refusal
            else "not computed: no refusal judge (pass --refusal-judge, e.g. string or hf-refusal:MODEL)",
        ],
    ]
    lines = [_table(["columns", "measured by"], rows), ""]
    if not harm:
        lines += [
            "The judge detects refusals only, so this report has no attack-success rate: an answer that does not "
            "refuse is counted as a non-refusal whether it is harmful, harmless or gibberish.",
            "",
        ]
    if refusal and (refusal_description or {}).get("kind") == "rule_based_refusal":
        lines += [
            "Refusals come from rule-based string matching; its measured error is in the README (`safevlm "
            "judge-check --judge string`).",
            "",
        ]
    return lines


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


def _benchmark_lines(bench: Mapping[str, Any]) -> list[str]:
    hashes = ", ".join(f"`{Path(f).name}` sha256 `{h[:16]}`" for f, h in bench["files"].items())
    chosen = ""
    if bench.get("sample") is not None and bench["n_items"] < bench["n_available"]:
        chosen = f", stratified sample of {bench['sample']} (seed {bench['seed']}) from {bench['n_available']}"
    elif bench.get("sample") is not None:
        chosen = f", all of them (--sample {bench['sample']} >= {bench['n_available']} available)"
    elif bench.get("limit") is not None:
        chosen = f", first {bench['limit']} of the file"
    lines = [f"- **{bench['name']}** `{bench['spec']}`: {bench['n_items']} items{chosen} ({hashes})"]
    rendering = bench.get("rendering")
    if rendering:
        fonts = ", ".join(f"`{Path(f).name}` sha256 `{h[:16]}`" for f, h in rendering["fonts"].items())
        lines.append(
            f"  - images **re-rendered by {rendering['rendered_by']}** ({rendering['n_images']} images, "
            f"style {', '.join(rendering['styles'])}, font {fonts}); each image's sha256 is in report.json. They "
            "are not the benchmark authors' image files."
        )
    skipped = bench.get("skipped_missing_images") or {}
    if skipped.get("count"):
        first = ", ".join(f"`{entry['image']}`" for entry in skipped["first"])
        lines.append(f"  - skipped {skipped['count']} items whose image is missing (first: {first})")
    return lines


def render_markdown(report: Mapping[str, Any], plots: Sequence[str] = ()) -> str:
    """The report as Markdown: reproduction settings first, then which judge measured what, the metric tables and
    the plots."""
    model, judge, metrics = report["model"], report["judge"] or {}, report["metrics"]
    sources = report.get("metric_sources") or {"attack_success": judge.get("name"), "refusal": judge.get("name")}
    columns = _generation_columns(sources, scores=metrics["overall"].get("mean_score") is not None)
    decoding = {k: v for k, v in report["decoding"].items() if k != "model_generation_config"}
    settings_rows = [
        ["model", f"`{model['name_or_path']}` ({model['class']}, {model['dtype']})"],
        ["weights", _weights_text(model.get("weights"))],
        ["config hash", f"`{model['config_hash']}`"],
        ["safety gating", str(report["safety_gating"])],
        ["profile", str(report["profile"])],
        ["policy hash", f"`{report['policy_hash']}`" if report["policy_hash"] else "n/a"],
        ["decoding", f"`{json.dumps(decoding)}`"],
        ["seed", str(report["seed"])],
        ["judge", _judge_line(judge)],
        ["refusal judge", _refusal_judge_line(report, sources)],
        ["packages", ", ".join(f"{k} {v}" for k, v in report["environment"]["packages"].items() if v)],
    ]
    if report.get("command"):
        settings_rows.append(["command", f"`{' '.join(report['command'])}`"])

    out = [f"# Safety evaluation: {model['name_or_path'] or model['class']}", "", "## Reproduction", ""]
    out += [_table(["setting", "value"], settings_rows), ""]
    for bench in report["benchmarks"]:
        out += _benchmark_lines(bench)
    for title, described in (("Judge", judge), ("Refusal judge", report.get("refusal_judge"))):
        if described:
            text = json.dumps(described, indent=2, ensure_ascii=False)
            out += ["", f"<details><summary>{title} description (full prompt)</summary>", "", "```json", text, "```"]
            out += ["", "</details>"]
    out += [""]

    out += ["## Results", "", "### Who measured each column", "", *_sources_section(report)]
    out += [_generation_table("benchmark", {"all": metrics["overall"], **metrics["by_source"]}, columns), ""]
    if sources.get("attack_success"):
        out += ["Attack success counts unparseable judgements as unsafe; the parsed-only rate leaves them out.", ""]
    for source, table in metrics["by_category"].items():
        out += [f"### {source}: per category", "", _generation_table("category", table, columns), ""]
    out += ["### Per SafeVLM risk type", "", _generation_table("risk type", metrics["by_risk_type"], columns), ""]
    scores = metrics["overall"].get("mean_score_by_risk_type") or {}
    if scores:
        rows = [[name, _number(value, 2)] for name, value in scores.items()]
        out += ["### Rubric scores (1-10, 10 = safest)", "", _table(["risk type", "mean score"], rows), ""]
    verdicts = metrics.get("verdicts")
    if verdicts:
        summary = (
            f"The safety head refused {_percent(verdicts['refusal_rate_risky'])} of risky items and "
            f"{_percent(verdicts['over_refusal_rate'])} of safe items; actions: {verdicts['actions']}."
        )
        out += ["### Safety-head verdicts (before generation, no judge involved)", "", summary, ""]
        if verdicts.get("type_vs_benchmark"):
            out += [_report_table(verdicts["type_vs_benchmark"], "Predicted type vs benchmark risk type"), ""]
    head = report.get("head_metrics")
    if head:
        out += ["## Safety head (labelled data)", "", _report_table(head["type"], "Risk type"), ""]
        out += [_report_table(head["level"], "Risk level"), "", f"ECE uses {head['ece_bins']} equal-width bins."]
        if head.get("unleveled"):
            out += [f"{head['unleveled']} items have no gold level and count for the type metrics only."]
        out += [""]
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
    report = redact(dict(report))  # no credential reaches a file, whatever field it hid in
    if plots:
        metrics = report["metrics"]
        sources = report.get("metric_sources") or {"attack_success": "judge", "refusal": "judge"}
        shown = [
            name
            for name, source in (
                ("attack_success_rate", "attack_success"),
                ("refusal_rate_risky", "refusal"),
                ("over_refusal_rate", "refusal"),
            )
            if sources.get(source)
        ]
        for source, table in metrics["by_category"].items():
            path = plot_category_rates(
                table, out / f"rates_{source}.png", metrics=shown, title=f"{source}: rates per category"
            )
            plot_files.append(path.name)
        path = plot_category_rates(
            metrics["by_risk_type"], out / "rates_by_risk_type.png", metrics=shown, title="Rates per risk type"
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
    "rendering_info",
    "benchmark_info",
    "build_report",
    "config_hash",
    "environment_info",
    "file_sha256",
    "model_info",
    "render_markdown",
    "write_report",
]
