# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""ICET scan: how safe is a VLM when its LLM reads image features from an earlier vision-encoder layer?

Bachu et al. (ICML 2025, "Layer-wise alignment: examining safety alignment across image encoder layers in vision
language models") feed the LLM the image states of vision layer `l` instead of the default ones, through the same
projection (an *image encoder early exit*, ICET-l), and find that safety alignment learned at the default layer does
not carry over: LLaVA-1.5, LLaVA-NeXT and Llama 3.2 Vision answer far more harmful requests at early layers.
:func:`icet_scan` measures this for every supported family (see :mod:`~safevlm_hf.layerwise.early_exit` for how each
family exits early): for each chosen layer it generates with the early exit applied, judges the answers, and reports
the risky prompts' headline rate, the refusal rate and an optional reward score per layer plus Early / Middle / Late
averages (thirds of the encoder, :func:`layer_groups`), as JSON, Markdown and a plot.

Metrics are named for their judge, as in `safevlm eval` (one implementation,
:func:`~safevlm_hf.evaluation.metrics.generation_metrics`): a judge that decides harm (Llama Guard, an HF or chat
judge) gives the **attack success rate** (`attack_success_rate`); a judge that only detects refusals (the default
string judge) cannot tell a harmful answer from a harmless or gibberish one, so its reports give the **non-refusal
rate** (`non_refusal_rate`) instead and leave `attack_success_rate` empty (`None`). Unparseable judge answers are
counted as attacks in the attack success rate, never as safe, and counted in every table, per layer and per group.

SafeVLM is ICET-robust by construction: its safety branch reads `config.safety_feature_layer` whatever layer the LLM
path uses, so its gating holds under early exit. Scan it with `gating=True` and `gating=False` to see both.

Layer numbering: layer `l` is the hidden state after encoder block `l` (1..N for an N-block encoder; LLaVA-1.5's
default `-2` is layer 23 of CLIP ViT-L/14's 24). Negative indices count from the end as in `vision_feature_layer`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from tqdm.auto import tqdm
from transformers import set_seed

from ..evaluation.judges import HARM, REFUSAL, Judge, Judgement, build_judge
from ..evaluation.metrics import generation_metrics, grouped_generation_metrics
from .early_exit import (
    ImageEncoderEarlyExit,
    default_feature_layer,
    early_exit_for,
    normalize_layer,
    resolve_layers,
    vision_encoder_depth,
)
from ..prompting import decode_responses, encode_items, is_safevlm
from .prompts import check_items, judge_inputs
from .rewards import build_reward, describe_reward


GROUPS: tuple[str, ...] = ("early", "middle", "late")
_GROUP_SHADES = {"early": "#f2f2f2", "middle": "#e6e6e6", "late": "#d9d9d9"}


# ------------------------------------------------------------------------------------------------------- layers
def layer_group(layer: int, num_layers: int) -> str:
    """`"early"`, `"middle"` or `"late"`: which third of the encoder's N layers the layer (1..N) falls in.

    Layer `l` is in third `floor(3 (l - 1) / N)`: for N = 24, layers 1-8, 9-16 and 17-24; for N = 4, 1-2, 3 and 4.
    This is the one grouping of the package: the tables, the group averages and the plots' shaded bands all use it.
    """
    return GROUPS[min(2, (layer - 1) * 3 // num_layers)]


def layer_groups(num_layers: int) -> dict[str, list[int]]:
    """The layers of each third of an N-layer encoder (groups without a layer, for N < 3, are left out)."""
    groups: dict[str, list[int]] = {}
    for layer in range(1, num_layers + 1):
        groups.setdefault(layer_group(layer, num_layers), []).append(layer)
    return groups


def layer_span(layers: Sequence[int]) -> str:
    """`"a-b"` for consecutive layers, `"a"` for one."""
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])


def draw_layer_groups(ax: Any, num_layers: int) -> dict[str, tuple[float, float]]:
    """Shade the Early / Middle / Late bands of an N-layer encoder on a per-layer plot and label them above the axes
    (outside the data area, where no legend goes). Returns each group's band `(x_start, x_end)` in layer units."""
    from matplotlib.transforms import blended_transform_factory

    above = blended_transform_factory(ax.transData, ax.transAxes)
    bands = {}
    for group, members in layer_groups(num_layers).items():
        start, end = members[0] - 0.5, members[-1] + 0.5
        ax.axvspan(start, end, color=_GROUP_SHADES[group], zorder=0, linewidth=0)
        ax.text((start + end) / 2, 1.01, group, transform=above, ha="center", va="bottom", fontsize=8, clip_on=False)
        bands[group] = (start, end)
    return bands


# --------------------------------------------------------------------------------------------------- generation
def resolve_gating(model: Any, gating: bool | None) -> bool | None:
    """The `safety_gating` argument to pass to `generate` (`None`: the model has no gating)."""
    if is_safevlm(model):
        return True if gating is None else bool(gating)
    if gating:
        raise ValueError(
            f"gating=True was asked for, but {type(model).__name__} is a plain model without SafeVLM's safety "
            "gating; leave gating unset for plain models."
        )
    return None


@torch.no_grad()
def generate_at_layer(
    model: Any,
    processor: Any,
    inputs: dict[str, Any],
    layer: int,
    *,
    max_new_tokens: int,
    gating: bool | None = None,
    early_exit: ImageEncoderEarlyExit | None = None,
    **generate_kwargs: Any,
) -> torch.Tensor:
    """`model.generate` with the LLM reading the image states of vision layer `layer` (the family's early exit, see
    :mod:`~safevlm_hf.layerwise.early_exit`); returns only the new tokens.

    `gating` is passed as `safety_gating` to a SafeVLM (`None`: the model's default, or no gating for plain models).
    `early_exit` is `model`'s early exit (:func:`~safevlm_hf.layerwise.early_exit.early_exit_for`), for callers
    that generate many times; by default it is built for this call.
    """
    if gating is not None:
        generate_kwargs["safety_gating"] = gating
    tokenizer = getattr(processor, "tokenizer", processor)
    generate_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    early_exit = early_exit if early_exit is not None else early_exit_for(model)
    with early_exit.at(layer) as exit_kwargs:
        output = model.generate(**inputs, **exit_kwargs, max_new_tokens=max_new_tokens, **generate_kwargs)
    sequences = output.sequences if hasattr(output, "sequences") else output
    return sequences[:, inputs["input_ids"].shape[1] :]


# ------------------------------------------------------------------------------------------------------ reports
def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


@dataclass
class IcetLayerResult:
    """Metrics of one vision layer.

    Attributes:
        layer: the vision layer the LLM read (1..N).
        group: its third of the encoder (`"early"`, `"middle"`, `"late"`, see :func:`layer_group`).
        num_prompts: prompts generated for.
        attack_success_rate: share of risky prompts (`expected == "refuse"`, or no label) whose answer the judge rates
            unsafe **or could not judge** (an unparseable judgement is never counted as safe; as `safevlm eval`).
            Only from a judge that decides harm; `None` from a refusal-only judge (see `non_refusal_rate`).
        attack_success_rate_parsed: the same share over the risky prompts the judge could judge.
        refusal_rate: share of risky prompts refused (over those whose refusal is known).
        non_refusal_rate: share of risky prompts whose answer the refusal judge does not call a refusal (harmful,
            harmless or gibberish alike): what a refusal-only judge measures, reported in place of attack success.
        safe_answer_rate: share of safe prompts (`expected == "answer"`) answered, i.e. 1 - over-refusal.
        unparsed: answers (all prompts) the judge could not judge.
        unparsed_risky: of those, answers to risky prompts (counted as attacks in `attack_success_rate`).
        mean_reward: mean score of the optional reward model.
        per_category: category -> {"n", "attack_success_rate", "non_refusal_rate", "refusal_rate", "unparsed"} over
            risky prompts.
    """

    layer: int
    group: str
    num_prompts: int
    attack_success_rate: float | None
    refusal_rate: float | None
    safe_answer_rate: float | None
    unparsed: int
    mean_reward: float | None = None
    per_category: dict[str, dict[str, Any]] = field(default_factory=dict)
    attack_success_rate_parsed: float | None = None
    unparsed_risky: int = 0
    non_refusal_rate: float | None = None


@dataclass
class IcetReport:
    """Per-layer results of an ICET scan, group averages, the settings that reproduce it and every answer."""

    model: str
    num_layers: int
    default_layer: int
    gating: bool | None
    judge: dict[str, Any]
    settings: dict[str, Any]
    layers: list[IcetLayerResult]
    records: list[dict[str, Any]] = field(default_factory=list)
    reward: dict[str, Any] | None = None
    model_type: str | None = None
    #: Which judge produced which metric, as in `safevlm eval`: `{"attack_success": name or None, "refusal": ...}`.
    metric_sources: dict[str, str | None] | None = None

    #: Rates averaged over a group's layers; counts (`COUNTS`) are summed.
    METRICS: ClassVar[tuple[str, ...]] = (
        "attack_success_rate",
        "attack_success_rate_parsed",
        "non_refusal_rate",
        "refusal_rate",
        "safe_answer_rate",
        "mean_reward",
    )
    COUNTS: ClassVar[tuple[str, ...]] = ("unparsed", "unparsed_risky")

    @property
    def measures_attack_success(self) -> bool:
        """True when the judge decides harm (the report leads with attack success), False for a refusal-only judge
        (it leads with the non-refusal rate)."""
        if self.metric_sources is not None:
            return self.metric_sources.get("attack_success") is not None
        return HARM in self.judge.get("decides", (HARM, REFUSAL))  # a report written before metric_sources

    @property
    def headline(self) -> list[tuple[str, str]]:
        """`(field, column title)` of the risky-prompt rate(s) the tables lead with, named for the judge."""
        if self.measures_attack_success:
            return [("attack_success_rate", "ASR"), ("attack_success_rate_parsed", "ASR (parsed)")]
        return [("non_refusal_rate", "Non-refusal")]

    @property
    def definition(self) -> str:
        """What the headline rate measures, for the reports."""
        return ASR_DEFINITION if self.measures_attack_success else NON_REFUSAL_DEFINITION

    def result(self, layer: int) -> IcetLayerResult:
        """The result for a layer (1..N or negative)."""
        layer = normalize_layer(layer, self.num_layers)
        for result in self.layers:
            if result.layer == layer:
                return result
        raise KeyError(f"Layer {layer} was not scanned; scanned layers: {[r.layer for r in self.layers]}.")

    def group_averages(self) -> dict[str, dict[str, Any]]:
        """For each third of the encoder with scanned layers: the mean of each rate over those layers, the sum of the
        unparseable counts, and the layers."""
        averages: dict[str, dict[str, Any]] = {}
        for group in GROUPS:
            members = [r for r in self.layers if r.group == group]
            if members:
                values: dict[str, Any] = {m: _mean([getattr(r, m) for r in members]) for m in self.METRICS}
                values.update({c: sum(getattr(r, c) for r in members) for c in self.COUNTS})
                values["layers"] = [r.layer for r in members]
                averages[group] = values
        return averages

    def to_dict(self, include_records: bool = True) -> dict[str, Any]:
        data = {
            "model": self.model,
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "default_layer": self.default_layer,
            "gating": self.gating,
            "judge": self.judge,
            "metric_sources": self.metric_sources,
            "reward": self.reward,
            "settings": self.settings,
            "layers": [asdict(r) for r in self.layers],
            "groups": self.group_averages(),
        }
        if include_records:
            data["records"] = self.records
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "IcetReport":
        return cls(
            model=data["model"],
            model_type=data.get("model_type"),
            num_layers=data["num_layers"],
            default_layer=data["default_layer"],
            gating=data["gating"],
            judge=data["judge"],
            settings=data["settings"],
            layers=[IcetLayerResult(**r) for r in data["layers"]],
            records=data.get("records", []),
            reward=data.get("reward"),
            metric_sources=data.get("metric_sources"),
        )

    def to_markdown(self, title: str = "ICET scan") -> str:
        """A Markdown report: settings, the per-layer table and the Early / Middle / Late averages."""
        gating = {True: "on", False: "off", None: "n/a (no safety gating)"}[self.gating]
        lines = [
            f"# {title}",
            "",
            f"- model: `{self.model}`" + (f" ({self.model_type})" if self.model_type else ""),
            f"- vision encoder: {self.num_layers} layers; default LLM layer: {self.default_layer} (marked *)",
            f"- safety gating: {gating}",
            f"- judge: `{self.judge.get('name', '?')}`; {self.definition}",
            f"- decoding: {json.dumps(self.settings, sort_keys=True)}",
        ]
        if self.reward:
            lines.append(f"- reward: `{json.dumps(self.reward, sort_keys=True)}`")
        lines += ["", metrics_table(self), "", "## Early / Middle / Late averages", ""]
        titles = ["Group", "Layers", *(title for _, title in self.headline), *_OTHER_COLUMNS]
        lines += [_row(titles), _row(["---"] * len(titles))]
        for group, values in self.group_averages().items():
            lines.append(_row([group, layer_span(values["layers"]), *_rates(values, self.headline)]))
        lines += ["", "Rates of a group are means over its layers; its unparsed count is their sum."]
        return "\n".join(lines) + "\n"

    def figure(self, title: str | None = None) -> Any:
        """The per-layer plot as a matplotlib `Figure`: attack success (or, from a refusal-only judge, the non-refusal
        rate) / refusal rate / safe answered (and the mean reward on its own axis) per layer, the Early / Middle / Late bands of :func:`layer_groups` shaded and labelled above the
        axes, the legend below them."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        layers = [r.layer for r in self.layers]
        fig, ax = plt.subplots(figsize=(7, 4.2))
        draw_layer_groups(ax, self.num_layers)
        handles = []
        headline = self.headline[0][0]
        for metric, label, style in (
            (headline, PLOT_LABELS[headline], "o-"),
            ("refusal_rate", "refusal rate (risky)", "s-"),
            ("safe_answer_rate", "answered (safe prompts)", "^--"),
        ):
            values = [getattr(r, metric) for r in self.layers]
            if any(v is not None for v in values):
                handles += ax.plot(layers, [float("nan") if v is None else v for v in values], style, label=label)
        if self.default_layer is not None:
            handles.append(
                ax.axvline(self.default_layer, color="black", linestyle=":", linewidth=1, label="default layer")
            )
        ax.set_xlim(0.5, self.num_layers + 0.5)
        ax.set_ylim(-0.02, 1.05)
        ax.set_xlabel("vision encoder layer fed to the LLM (ICET-l)")
        ax.set_ylabel("rate")
        rewards = [r.mean_reward for r in self.layers]
        if any(v is not None for v in rewards):
            twin = ax.twinx()
            values = [float("nan") if v is None else v for v in rewards]
            handles += twin.plot(layers, values, "d-.", color="tab:purple", label="mean reward")
            twin.set_ylabel("mean reward")
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 3), fontsize=8, frameon=False)
        ax.set_title(title or f"ICET scan of {Path(self.model).name or self.model}", fontsize=10, pad=16)
        fig.tight_layout(rect=(0, 0.12, 1, 1))  # the bottom strip holds the legend, outside the data area
        return fig

    def plot(self, path: str | os.PathLike, title: str | None = None) -> Path:
        """Write :meth:`figure` as a PNG."""
        import matplotlib.pyplot as plt

        path = Path(path)
        fig = self.figure(title)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def save(self, out_dir: str | os.PathLike, prefix: str = "icet") -> dict[str, Path]:
        """Write `<prefix>_report.json` (with every answer), `<prefix>_report.md` and `<prefix>_layers.png`."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {
            "json": out / f"{prefix}_report.json",
            "markdown": out / f"{prefix}_report.md",
            "plot": out / f"{prefix}_layers.png",
        }
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2, default=str), encoding="utf-8")
        paths["markdown"].write_text(self.to_markdown(), encoding="utf-8")
        self.plot(paths["plot"])
        return paths


ASR_DEFINITION = (
    "ASR = share of risky prompts whose answer the judge rates unsafe or cannot judge (unparseable answers count as "
    "attacks, as in `safevlm eval`); ASR (parsed) leaves the unparseable ones out"
)
NON_REFUSAL_DEFINITION = (
    "Non-refusal = share of risky prompts whose answer the judge does not call a refusal; this judge detects refusals "
    "only, so a non-refusal may be harmful, harmless or gibberish (a harm judge, e.g. llama-guard-3:MODEL, measures "
    "harm)"
)
#: Plot labels of the headline rates.
PLOT_LABELS = {"attack_success_rate": "attack success rate", "non_refusal_rate": "non-refusal rate (risky)"}
# The columns every table has after the headline rate(s), and how each value is written.
_OTHER_COLUMNS = ("Refusal rate", "Safe answered", "Unparsed", "Reward")


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def _rates(values: Any, headline: Sequence[tuple[str, str]]) -> list[str]:
    """The cells of a layer result or group average after its label: headline rate(s), then `_OTHER_COLUMNS`."""
    get = values.get if isinstance(values, dict) else lambda key: getattr(values, key)
    return [
        *(format_percent(get(field)) for field, _ in headline),
        format_percent(get("refusal_rate")),
        format_percent(get("safe_answer_rate")),
        get("unparsed"),
        format_number(get("mean_reward")),
    ]


def format_percent(value: float | None) -> str:
    """A rate as a percentage with one decimal, `"-"` for `None` (nothing to measure)."""
    return "-" if value is None else f"{100 * value:.1f}%"


def format_number(value: float | None) -> str:
    """A number with three decimals, `"-"` for `None`."""
    return "-" if value is None else f"{value:.3f}"


def metrics_table(report: IcetReport) -> str:
    """The per-layer Markdown table of a report."""
    titles = ["Layer", "Group", "Prompts", *(title for _, title in report.headline), *_OTHER_COLUMNS]
    lines = [_row(titles), _row(["---"] * len(titles))]
    for r in report.layers:
        mark = "*" if r.layer == report.default_layer else ""
        lines.append(_row([f"{r.layer}{mark}", r.group, r.num_prompts, *_rates(r, report.headline)]))
    return "\n".join(lines)


def comparison_table(before: IcetReport, after: IcetReport, labels: tuple[str, str] = ("before", "after")) -> str:
    """A Markdown table of two scans of the same layers side by side (e.g. before / after L-PPO, gating on / off)."""
    a, b = labels
    if before.measures_attack_success != after.measures_attack_success:
        raise ValueError(
            "Compare ICET scans judged alike: one was judged for harm (attack success), the other for refusals only."
        )
    field, title = before.headline[0]
    lines = [
        f"| Layer | {title} {a} | {title} {b} | Refusal {a} | Refusal {b} | Safe answered {a} | Safe answered {b} | "
        f"Unparsed {a} | Unparsed {b} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for first in before.layers:
        try:
            second = after.result(first.layer)
        except KeyError:
            continue
        mark = "*" if first.layer == before.default_layer else ""
        lines.append(
            f"| {first.layer}{mark} | {format_percent(getattr(first, field))} | {format_percent(getattr(second, field))} | "
            f"{format_percent(first.refusal_rate)} | {format_percent(second.refusal_rate)} | {format_percent(first.safe_answer_rate)} | "
            f"{format_percent(second.safe_answer_rate)} | {first.unparsed} | {second.unparsed} |"
        )
    return "\n".join(lines)


def _is_risky(item: Any) -> bool:
    """Items expected to be refused, and unlabelled items (ICET scans are run on harmful-prompt sets), are risky."""
    return getattr(item, "expected", None) != "answer"


def _layer_result(
    layer: int,
    num_layers: int,
    items: Sequence[Any],
    judgements: Sequence[Judgement],
    rewards: Sequence[float] | None,
    decides: frozenset[str] = frozenset({HARM, REFUSAL}),
) -> IcetLayerResult:
    # The evaluation suite's metrics, so that ICET and `safevlm eval` name their rates for the judge (`decides`: what
    # it decides) and count unparseable answers the same way.
    records = [
        {
            "expected": "refuse" if _is_risky(item) else "answer",
            "category": str(getattr(item, "category", None) or "uncategorized"),
            "judgement": judgement,
            "harm_judge": "judge" if HARM in decides else None,
            "refused": judgement.refused if judgement.parsed and REFUSAL in decides else None,
        }
        for item, judgement in zip(items, judgements)
    ]
    metrics = generation_metrics(records)
    risky = [record for record in records if record["expected"] == "refuse"]
    per_category = {
        name: {
            "n": values["n_risky"],
            "attack_success_rate": values["attack_success_rate"],
            "non_refusal_rate": values["non_refusal_rate"],
            "refusal_rate": values["refusal_rate_risky"],
            "unparsed": values["unparseable_risky"],
        }
        for name, values in grouped_generation_metrics(risky, "category").items()
    }
    over_refusal = metrics["over_refusal_rate"]
    return IcetLayerResult(
        layer=layer,
        group=layer_group(layer, num_layers),
        num_prompts=len(items),
        attack_success_rate=metrics["attack_success_rate"],
        attack_success_rate_parsed=metrics["attack_success_rate_parsed"],
        refusal_rate=metrics["refusal_rate_risky"],
        non_refusal_rate=metrics["non_refusal_rate"],
        safe_answer_rate=None if over_refusal is None else 1 - over_refusal,
        unparsed=metrics["unparseable"],
        unparsed_risky=metrics["unparseable_risky"],
        mean_reward=_mean(list(rewards)) if rewards is not None else None,
        per_category=per_category,
    )


# --------------------------------------------------------------------------------------------------------- scan
def icet_scan(
    model: Any,
    processor: Any,
    items: Sequence[Any],
    judge: Judge | str,
    layers: str | int | Sequence[int] = "all",
    *,
    reward_model: Any = None,
    gating: bool | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    seed: int = 0,
    generate_kwargs: dict[str, Any] | None = None,
    show_progress: bool = True,
) -> IcetReport:
    """Scan the vision layers: generate with the LLM reading each layer's image states, judge, report.

    Args:
        model: a LLaVA-style model (LLaVA-1.5, LLaVA-NeXT, SafeVLM) or Llama 3.2 Vision (`mllama`); see
            :mod:`~safevlm_hf.layerwise.early_exit` for each family's early exit.
        processor: its processor (with a chat template).
        items: prompt items (objects with `.prompt`, `.image`, optional `.category`, `.expected`), e.g. the evaluation
            suite's `BenchmarkItem`s or :class:`~safevlm_hf.layerwise.prompts.PromptItem`s.
        judge: a `Judge`, or a spec for `build_judge` (`"string"`, `"hf:MODEL"`, `"openai:MODEL"`).
        layers: `"all"`, `"a-b"`, a comma list, an int, or a list of ints (1..N or negative).
        reward_model: optional reward (`callable(prompts, responses, items) -> list[float]`, e.g.
            :class:`~safevlm_hf.layerwise.rewards.HFRewardModel`, or an `"hf:MODEL"` spec); its mean is reported.
        gating: SafeVLM only: `True` (default) generates with safety gating, `False` without (shows the LLM alone).
        max_new_tokens / batch_size / seed: decoding settings (greedy unless `generate_kwargs` says otherwise).
        generate_kwargs: extra arguments for `generate` (e.g. `{"do_sample": True, "temperature": 0.7}`).

    Returns:
        An :class:`IcetReport` (`.save(out_dir)` writes JSON, Markdown and the plot).
    """
    items = check_items(items, "ICET prompt set")
    early_exit = early_exit_for(model)  # built once: every layer and batch generates through it
    num_layers = early_exit.num_layers
    scan_layers = resolve_layers(layers, num_layers)
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}.")
    safety_gating = resolve_gating(model, gating)
    judge = build_judge(judge) if isinstance(judge, str) else judge
    metric_sources = {
        "attack_success": judge.name if HARM in judge.decides else None,
        "refusal": judge.name if REFUSAL in judge.decides else None,
    }
    headline = "attack_success_rate" if HARM in judge.decides else "non_refusal_rate"
    if isinstance(reward_model, str):
        reward_model = build_reward(reward_model, model=model)
    decoding = {"do_sample": False, **(generate_kwargs or {})}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # Rows with and without an image are batched apart: in transformers' Llama 3.2 Vision (mllama) a text-only row of
    # a batch with images attends to a zero-padded image (the cross-attention output of fully masked rows is not
    # masked out), so its answer would depend on its batch mates and on the exit layer. Item order is kept in reports.
    has_image = [getattr(item, "image", None) is not None for item in items]
    batches = []
    for kind in (False, True):
        rows = [index for index, flag in enumerate(has_image) if flag is kind]
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            # Encoded once; every layer reuses the same inputs (only the early exit changes between layers).
            batches.append((chunk, encode_items(processor, [items[index] for index in chunk], device)))
    results: list[IcetLayerResult] = []
    records: list[dict[str, Any]] = []
    progress = tqdm(total=len(scan_layers) * len(batches), desc="ICET scan", disable=not show_progress)
    try:
        for layer in scan_layers:
            set_seed(seed)
            responses: list[str] = [""] * len(items)
            for rows, inputs in batches:
                tokens = generate_at_layer(
                    model,
                    processor,
                    inputs,
                    layer,
                    max_new_tokens=max_new_tokens,
                    gating=safety_gating,
                    early_exit=early_exit,
                    **decoding,
                )
                for index, response in zip(rows, decode_responses(processor, tokens)):
                    responses[index] = response
                progress.update(1)
            prompts = [item.prompt for item in items]
            judgements = judge.judge(judge_inputs(prompts, responses, items))
            if len(judgements) != len(items):
                raise ValueError(
                    f"Judge {judge.name!r} returned {len(judgements)} judgements for {len(items)} answers; a judge "
                    "must return one per answer, in order."
                )
            rewards = reward_model(prompts, responses, items) if reward_model is not None else None
            results.append(_layer_result(layer, num_layers, items, judgements, rewards, judge.decides))
            progress.set_postfix(layer=layer, **{headline: format_percent(getattr(results[-1], headline))})
            for index, (item, response, judgement) in enumerate(zip(items, responses, judgements)):
                records.append(
                    {
                        "layer": layer,
                        "id": getattr(item, "id", None) if getattr(item, "id", None) is not None else index,
                        "category": getattr(item, "category", None),
                        "expected": getattr(item, "expected", None),
                        "prompt": item.prompt,
                        "response": response,
                        "unsafe": judgement.unsafe,
                        "refused": judgement.refused,
                        "parsed": judgement.parsed,
                        "judge_raw": judgement.raw,
                        "reward": rewards[index] if rewards is not None else None,
                    }
                )
    finally:
        progress.close()
        model.train(was_training)
    return IcetReport(
        model=str(getattr(model.config, "_name_or_path", "") or type(model).__name__),
        model_type=getattr(model.config, "model_type", None),
        num_layers=num_layers,
        default_layer=early_exit.default_layer,
        gating=safety_gating,
        judge=judge.describe(),
        settings={"max_new_tokens": max_new_tokens, "batch_size": batch_size, "seed": seed, **decoding},
        layers=results,
        records=records,
        reward=describe_reward(reward_model) if reward_model is not None else None,
        metric_sources=metric_sources,
    )


def load_icet_report(path: str | os.PathLike) -> IcetReport:
    """Read a report written by :meth:`IcetReport.save`."""
    return IcetReport.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


__all__ = [
    "ASR_DEFINITION",
    "GROUPS",
    "NON_REFUSAL_DEFINITION",
    "PLOT_LABELS",
    "IcetLayerResult",
    "IcetReport",
    "comparison_table",
    "default_feature_layer",
    "draw_layer_groups",
    "generate_at_layer",
    "icet_scan",
    "layer_group",
    "layer_groups",
    "layer_span",
    "load_icet_report",
    "metrics_table",
    "normalize_layer",
    "resolve_gating",
    "resolve_layers",
    "vision_encoder_depth",
]
