# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""Paper-style ICET results of several models in one grid: model x layer group (Early / Middle / Late) x metric.

Bachu et al. report the attack success of each model per third of its vision encoder, with and without L-PPO.
:class:`IcetGrid` puts the :class:`~safevlm_hf.layerwise.icet.IcetReport` of several scans (models of different
families, the same model before and after L-PPO, a SafeVLM with gating on and off) side by side: one table per metric
(attack success from a harm judge, or the non-refusal rate from a refusal-only judge such as the string judge; refusal,
safe prompts answered, reward, unparseable answers) with a row per model and a column per group plus the model's
default layer, and one plot with every model's per-layer curves. The groups are those of
:func:`~safevlm_hf.layerwise.icet.layer_groups`, computed on each model's own depth, in the tables and the plot alike.
`safevlm icet --model A --model B ...` writes it (`icet_grid.md`, `icet_grid.json`, `icet_grid.png`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from .icet import (
    GROUPS,
    PLOT_LABELS,
    IcetReport,
    draw_layer_groups,
    format_number,
    format_percent,
    layer_groups,
    layer_span,
)


# (report field, table title, formatter); rates are averaged over a group's layers, counts summed. The grid leads with
# the headline rate of its judge: attack success from a harm judge, the non-refusal rate from a refusal-only judge.
HEADLINE_METRICS: dict[str, tuple[str, str, Callable[[Any], str]]] = {
    "attack_success_rate": (
        "attack_success_rate",
        "Attack success rate (unparseable answers count as attacks)",
        format_percent,
    ),
    "non_refusal_rate": (
        "non_refusal_rate",
        "Non-refusal rate (risky prompts; the judge detects refusals only, not harm)",
        format_percent,
    ),
}
GRID_METRICS: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
    ("refusal_rate", "Refusal rate (risky prompts)", format_percent),
    ("safe_answer_rate", "Answered (safe prompts; 1 - over-refusal)", format_percent),
    ("mean_reward", "Mean reward", format_number),
    ("unparsed", "Unparseable judge answers (count, summed over the group's layers)", lambda value: str(value)),
)
_PLOTTED = (
    ("refusal_rate", "refusal rate (risky prompts)"),
    ("safe_answer_rate", "answered (safe prompts)"),
    ("mean_reward", "mean reward"),
)


class IcetGrid:
    """ICET scans of several models, as one model x group x metric grid.

    Args:
        rows: `(label, report)` pairs, in table order; labels must be unique. The scans must share their judge and
            their prompt count (a grid compares models on the same prompts, judged alike).
    """

    def __init__(self, rows: Sequence[tuple[str, IcetReport]]):
        rows = list(rows)
        if not rows:
            raise ValueError("An ICET grid needs at least one (label, report) row.")
        labels = [label for label, _ in rows]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ValueError(f"ICET grid labels must be unique; {duplicates} appear more than once.")
        judges = {json.dumps(report.judge, sort_keys=True, default=str) for _, report in rows}
        if len(judges) > 1:
            names = {label: report.judge.get("name") for label, report in rows}
            raise ValueError(f"The scans of an ICET grid must share one judge; they were judged by {names}.")
        prompts = {label: report.layers[0].num_prompts for label, report in rows if report.layers}
        if len(set(prompts.values())) > 1:
            raise ValueError(f"The scans of an ICET grid must use the same prompts; prompt counts differ: {prompts}.")
        self.rows = rows

    @property
    def judge(self) -> dict[str, Any]:
        return self.rows[0][1].judge

    @property
    def metrics(self) -> tuple[tuple[str, str, Callable[[Any], str]], ...]:
        """The grid's tables: the judge's headline rate first (every scan shares the judge), then `GRID_METRICS`."""
        return (HEADLINE_METRICS[self.rows[0][1].headline[0][0]], *GRID_METRICS)

    def cell(self, report: IcetReport, metric: str, group: str) -> Any:
        """A metric of one group (`"early"`, `"middle"`, `"late"`) or of `"default"` (the default layer), or `None`
        when no scanned layer falls there."""
        if group == "default":
            scanned = {r.layer: r for r in report.layers}
            result = scanned.get(report.default_layer)
            return None if result is None else getattr(result, metric)
        values = report.group_averages().get(group)
        return None if values is None else values[metric]

    def to_dict(self) -> dict[str, Any]:
        """Everything the tables and the plot show, by model label: groups, default layer and per-layer metrics."""
        models = []
        for label, report in self.rows:
            groups = report.group_averages()
            models.append(
                {
                    "label": label,
                    "model": report.model,
                    "model_type": report.model_type,
                    "gating": report.gating,
                    "num_layers": report.num_layers,
                    "default_layer": report.default_layer,
                    "group_layers": layer_groups(report.num_layers),
                    "groups": groups,
                    "default": {metric: self.cell(report, metric, "default") for metric, _, _ in self.metrics},
                    "layers": [
                        {"layer": r.layer, **{metric: getattr(r, metric) for metric, _, _ in self.metrics}}
                        for r in report.layers
                    ],
                }
            )
        first = self.rows[0][1]
        return {
            "judge": self.judge,
            "metric_sources": first.metric_sources,
            "reward": first.reward,
            "settings": first.settings,
            "num_prompts": first.layers[0].num_prompts if first.layers else 0,
            "definitions": {
                first.headline[0][0]: first.definition,
                "groups": "thirds of each model's vision encoder: layer l of N is in third floor(3 (l - 1) / N); a "
                "group's rate is the mean over its scanned layers, its unparseable count the sum",
            },
            "models": models,
        }

    def to_markdown(self, title: str = "ICET grid") -> str:
        """The grid as Markdown: the models and their layer groups, then one table per metric."""
        first = self.rows[0][1]
        reward = first.reward.get("name", json.dumps(first.reward, sort_keys=True)) if first.reward else None
        lines = [
            f"# {title}",
            "",
            f"- judge: `{self.judge.get('name', '?')}`; {first.definition}",
            f"- reward: {f'`{reward}`' if reward else 'none (give --reward-model to fill the reward table)'}",
            f"- prompts: {first.layers[0].num_prompts if first.layers else 0} per layer; decoding: "
            f"{json.dumps(first.settings, sort_keys=True)}",
            "- groups: thirds of each model's vision encoder (layer l of N is in third floor(3 (l - 1) / N)); a "
            "group's rate is the mean over its scanned layers, its unparseable count the sum; *Default* is the layer "
            "the model's LLM reads without early exit",
            "",
            "| Model | Type | Gating | Encoder layers | Early | Middle | Late | Default layer |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for label, report in self.rows:
            groups = layer_groups(report.num_layers)
            spans = [layer_span(groups[group]) if group in groups else "-" for group in GROUPS]
            gating = {True: "on", False: "off", None: "n/a"}[report.gating]
            lines.append(
                f"| {label} | {report.model_type or '?'} | {gating} | {report.num_layers} | {' | '.join(spans)} | "
                f"{report.default_layer} |"
            )
        for metric, heading, fmt in self.metrics:
            lines += ["", f"## {heading}", "", "| Model | Early | Middle | Late | Default |", "|---|---|---|---|---|"]
            for label, report in self.rows:
                cells = [self.cell(report, metric, group) for group in (*GROUPS, "default")]
                lines.append(f"| {label} | " + " | ".join("-" if c is None else fmt(c) for c in cells) + " |")
        return "\n".join(lines) + "\n"

    def figure(self, title: str = "ICET: per-layer curves of every model") -> Any:
        """One figure with every model's per-layer curves: a column per metric (the reward only when scanned with
        one), a row per encoder depth (models of the same depth share a row), each row shaded with its depth's Early /
        Middle / Late bands (:func:`~safevlm_hf.layerwise.icet.layer_groups`, as in the tables). Each model keeps its
        colour in every panel; its default layer is ringed."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        headline = self.rows[0][1].headline[0][0]
        panels = [
            (metric, name)
            for metric, name in ((headline, PLOT_LABELS[headline]), *_PLOTTED)
            if any(getattr(r, metric) is not None for _, report in self.rows for r in report.layers)
        ]
        depths = sorted({report.num_layers for _, report in self.rows})
        fig, axes = plt.subplots(
            len(depths), len(panels), figsize=(4.2 * len(panels), 3.4 * len(depths) + 0.8), squeeze=False
        )
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        handles = []
        for row, depth in enumerate(depths):
            for column, (metric, name) in enumerate(panels):
                ax = axes[row][column]
                draw_layer_groups(ax, depth)
                for index, (label, report) in enumerate(self.rows):
                    if report.num_layers != depth:
                        continue
                    values = [getattr(r, metric) for r in report.layers]
                    line = ax.plot(
                        [r.layer for r in report.layers],
                        [float("nan") if v is None else v for v in values],
                        "o-",
                        ms=3,
                        color=colors[index % len(colors)],
                        label=label,
                    )
                    if column == 0:
                        handles.append(line[0])
                    at_default = [v for r, v in zip(report.layers, values) if r.layer == report.default_layer]
                    if at_default and at_default[0] is not None:
                        ax.plot([report.default_layer], at_default, "o", ms=9, mfc="none", mec="black", zorder=5)
                ax.set_xlim(0.5, depth + 0.5)
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                if metric != "mean_reward":
                    ax.set_ylim(-0.02, 1.05)
                ax.set_title(name, fontsize=10, pad=14)
                ax.set_xlabel(f"vision layer fed to the LLM (of {depth})", fontsize=9)
        ring = plt.Line2D([], [], marker="o", ms=9, mfc="none", mec="black", linestyle="none", label="default layer")
        handles.append(ring)
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=8, frameon=False)
        fig.suptitle(title, fontsize=11)
        legend_rows = -(-len(handles) // 5)
        fig.tight_layout(rect=(0, 0.05 * legend_rows / len(depths), 1, 1))  # the legend strip, outside every panel
        return fig

    def save(self, out_dir: str | os.PathLike, prefix: str = "icet_grid") -> dict[str, Path]:
        """Write `<prefix>.md`, `<prefix>.json` and `<prefix>.png`."""
        import matplotlib.pyplot as plt

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"markdown": out / f"{prefix}.md", "json": out / f"{prefix}.json", "plot": out / f"{prefix}.png"}
        paths["markdown"].write_text(self.to_markdown(), encoding="utf-8")
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2, default=str), encoding="utf-8")
        fig = self.figure()
        fig.savefig(paths["plot"], dpi=120)
        plt.close(fig)
        return paths


__all__ = ["GRID_METRICS", "HEADLINE_METRICS", "IcetGrid"]
