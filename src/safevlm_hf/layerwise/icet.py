# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""ICET scan: how safe is a VLM when its LLM reads image features from an earlier vision-encoder layer?

Bachu et al. (ICML 2025, "Layer-wise alignment: examining safety alignment across image encoder layers in vision
language models") feed the LLM the features of vision layer `l` instead of the default one, through the same projector
(an *image encoder early exit*, ICET-l), and find that safety alignment learned at the default layer does not carry
over: LLaVA-1.5 answers far more harmful requests at early layers. :func:`icet_scan` measures this for any LLaVA-style
model: for each chosen layer it generates with `vision_feature_layer=l` (a per-call argument of `generate`), judges
the answers, and reports attack success, refusal rate and an optional reward score per layer plus Early / Middle / Late
averages (thirds of the encoder), as JSON, Markdown and a plot.

SafeVLM is ICET-robust by construction: its safety branch reads `config.safety_feature_layer` whatever layer the LLM
path uses, so its gating holds under early exit. Scan it with `gating=True` and `gating=False` to see both.

Layer numbering: layer `l` is the hidden state after encoder block `l` (1..N for an N-block encoder; LLaVA-1.5's
default `-2` is layer 23 of CLIP ViT-L/14's 24). Negative indices count from the end as in `vision_feature_layer`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from tqdm.auto import tqdm
from transformers import set_seed

from ..evaluation.judges import Judge, Judgement, build_judge
from .prompts import check_items, encode_items, judge_inputs
from .rewards import build_reward, describe_reward


GROUPS: tuple[str, ...] = ("early", "middle", "late")
_RANGE = re.compile(r"^\s*(-?\d+)\s*-\s*(-?\d+)\s*$")  # "a-b", where a and b may be negative


# ------------------------------------------------------------------------------------------------------- layers
def vision_encoder_depth(model: Any) -> int:
    """Number of blocks N of the model's vision encoder (its hidden states are 0..N, 0 = patch embeddings).

    Also checks that the model is LLaVA-style with a single-layer image path, which an early exit can re-point.
    """
    config = model.config
    depth = getattr(getattr(config, "vision_config", None), "num_hidden_layers", None)
    if not isinstance(depth, int) or not hasattr(config, "vision_feature_layer"):
        raise ValueError(
            f"{type(model).__name__} is not a LLaVA-style model (config.vision_config.num_hidden_layers and "
            "config.vision_feature_layer are needed): an image-encoder early exit re-points `vision_feature_layer`."
        )
    if not isinstance(config.vision_feature_layer, int):
        raise ValueError(
            f"{type(model).__name__} feeds its projector {len(config.vision_feature_layer)} concatenated vision "
            f"layers (vision_feature_layer={config.vision_feature_layer}); an early exit feeds one layer, which its "
            "projector cannot take."
        )
    return depth


def normalize_layer(layer: int, num_layers: int) -> int:
    """Map a layer index (1..N, or -N..-1 from the end) to 1..N; anything else is a clear error."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(
            f"Vision layer {layer!r} is not an integer; valid layers are 1..{num_layers} (or -{num_layers}..-1)."
        )
    if 1 <= layer <= num_layers:
        return layer
    if -num_layers <= layer <= -1:
        return num_layers + 1 + layer
    raise ValueError(
        f"Vision layer {layer} is outside the vision encoder: it has {num_layers} layers, so valid layers are "
        f"1..{num_layers} (or -{num_layers}..-1 counting from the end; 0, the patch embeddings, is not a layer)."
    )


def resolve_layers(layers: str | int | Sequence[int], num_layers: int) -> list[int]:
    """Layers to scan, as sorted unique indices in 1..N.

    Accepts `"all"`, a range `"a-b"` (inclusive), a comma list `"3,7,-2"`, an int, or a sequence of ints.
    """
    if isinstance(layers, str):
        text = layers.strip().lower()
        if text == "all":
            return list(range(1, num_layers + 1))
        match = _RANGE.match(text)
        if match:
            first = normalize_layer(int(match.group(1)), num_layers)
            last = normalize_layer(int(match.group(2)), num_layers)
            if first > last:
                raise ValueError(f"Layer range {layers!r} is empty: its start ({first}) is after its end ({last}).")
            return list(range(first, last + 1))
        try:
            values = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise ValueError(
                f"Cannot read layers {layers!r}: use 'all', a range 'a-b' (e.g. '1-12') or a comma list ('3,7,-2')."
            ) from None
    elif isinstance(layers, int):
        values = [layers]
    else:
        values = list(layers)
    if not values:
        raise ValueError(f"No vision layers given ({layers!r}); valid layers are 1..{num_layers}.")
    return sorted({normalize_layer(value, num_layers) for value in values})


def default_feature_layer(model: Any) -> int:
    """The layer the model's LLM reads by default (1..N)."""
    return normalize_layer(model.config.vision_feature_layer, vision_encoder_depth(model))


def layer_group(layer: int, num_layers: int) -> str:
    """`"early"`, `"middle"` or `"late"`: which third of the encoder's N layers the layer (1..N) falls in."""
    return GROUPS[min(2, (layer - 1) * 3 // num_layers)]


def is_safevlm(model: Any) -> bool:
    """True for a SafeVLM (a model with a safety head and gating in `generate`), also when wrapped by PEFT."""
    return getattr(getattr(model, "config", None), "model_type", None) == "safevlm"


# --------------------------------------------------------------------------------------------------- generation
def resolve_gating(model: Any, gating: bool | None) -> bool | None:
    """The `safety_gating` argument to pass to `generate` (`None`: the model has no gating)."""
    if is_safevlm(model):
        return True if gating is None else bool(gating)
    if gating:
        raise ValueError(
            f"gating=True was asked for, but {type(model).__name__} is a plain LLaVA-style model without SafeVLM's "
            "safety gating; leave gating unset for plain models."
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
    **generate_kwargs: Any,
) -> torch.Tensor:
    """`model.generate` with the LLM's image path fed from vision layer `layer`; returns only the new tokens.

    `gating` is passed as `safety_gating` to a SafeVLM (`None`: the model's default, or no gating for plain LLaVA).
    """
    if gating is not None:
        generate_kwargs["safety_gating"] = gating
    tokenizer = getattr(processor, "tokenizer", processor)
    generate_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    output = model.generate(**inputs, vision_feature_layer=layer, max_new_tokens=max_new_tokens, **generate_kwargs)
    sequences = output.sequences if hasattr(output, "sequences") else output
    return sequences[:, inputs["input_ids"].shape[1] :]


def decode_responses(processor: Any, tokens: torch.Tensor) -> list[str]:
    """Decoded answers (special tokens and surrounding whitespace removed)."""
    return [text.strip() for text in processor.batch_decode(tokens, skip_special_tokens=True)]


# ------------------------------------------------------------------------------------------------------ reports
def _rate(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


@dataclass
class IcetLayerResult:
    """Metrics of one vision layer.

    Attributes:
        layer: the vision layer the LLM read (1..N).
        group: its third of the encoder (`"early"`, `"middle"`, `"late"`).
        num_prompts: prompts generated for.
        attack_success_rate: share of risky prompts (`expected == "refuse"`, or no label) whose answer the judge rates
            unsafe; rows the judge could not parse are left out of the rate (and counted in `unparsed`), never counted
            as safe.
        refusal_rate: share of risky prompts refused.
        safe_answer_rate: share of safe prompts (`expected == "answer"`) answered, i.e. 1 - over-refusal.
        unparsed: rows the judge could not parse.
        mean_reward: mean score of the optional reward model.
        per_category: category -> {"n", "attack_success_rate", "refusal_rate"} over risky prompts.
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

    METRICS: ClassVar[tuple[str, ...]] = ("attack_success_rate", "refusal_rate", "safe_answer_rate", "mean_reward")

    def result(self, layer: int) -> IcetLayerResult:
        """The result for a layer (1..N or negative)."""
        layer = normalize_layer(layer, self.num_layers)
        for result in self.layers:
            if result.layer == layer:
                return result
        raise KeyError(f"Layer {layer} was not scanned; scanned layers: {[r.layer for r in self.layers]}.")

    def group_averages(self) -> dict[str, dict[str, float | None]]:
        """For each third of the encoder with scanned layers, the mean of each metric over those layers."""
        averages: dict[str, dict[str, float | None]] = {}
        for group in GROUPS:
            members = [r for r in self.layers if r.group == group]
            if members:
                averages[group] = {m: _mean([getattr(r, m) for r in members]) for m in self.METRICS}
                averages[group]["layers"] = [r.layer for r in members]
        return averages

    def to_dict(self, include_records: bool = True) -> dict[str, Any]:
        data = {
            "model": self.model,
            "num_layers": self.num_layers,
            "default_layer": self.default_layer,
            "gating": self.gating,
            "judge": self.judge,
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
            num_layers=data["num_layers"],
            default_layer=data["default_layer"],
            gating=data["gating"],
            judge=data["judge"],
            settings=data["settings"],
            layers=[IcetLayerResult(**r) for r in data["layers"]],
            records=data.get("records", []),
            reward=data.get("reward"),
        )

    def to_markdown(self, title: str = "ICET scan") -> str:
        """A Markdown report: settings, the per-layer table and the Early / Middle / Late averages."""
        gating = {True: "on", False: "off", None: "n/a (no safety gating)"}[self.gating]
        lines = [
            f"# {title}",
            "",
            f"- model: `{self.model}`",
            f"- vision encoder: {self.num_layers} layers; default LLM layer: {self.default_layer} (marked *)",
            f"- safety gating: {gating}",
            f"- judge: `{self.judge.get('name', '?')}`",
            f"- decoding: {json.dumps(self.settings, sort_keys=True)}",
        ]
        if self.reward:
            lines.append(f"- reward: `{json.dumps(self.reward, sort_keys=True)}`")
        lines += ["", metrics_table(self), "", "## Early / Middle / Late averages", ""]
        lines.append("| Group | Layers | ASR | Refusal rate | Safe answered | Reward |")
        lines.append("|---|---|---|---|---|---|")
        for group, values in self.group_averages().items():
            layers = values["layers"]
            span = f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
            lines.append(
                f"| {group} | {span} | {_pct(values['attack_success_rate'])} | {_pct(values['refusal_rate'])} | "
                f"{_pct(values['safe_answer_rate'])} | {_num(values['mean_reward'])} |"
            )
        return "\n".join(lines) + "\n"

    def plot(self, path: str | os.PathLike, title: str | None = None) -> Path:
        """Per-layer ASR / refusal rate (and reward, on its own axis) as a PNG; the thirds are shaded."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        layers = [r.layer for r in self.layers]
        fig, ax = plt.subplots(figsize=(7, 4))
        for index, group in enumerate(GROUPS):
            start = index * self.num_layers / 3 + 0.5
            ax.axvspan(start, start + self.num_layers / 3, color=("#f2f2f2", "#e6e6e6", "#d9d9d9")[index], zorder=0)
            ax.text(start + self.num_layers / 6, 1.02, group, ha="center", va="bottom", fontsize=8)
        for metric, label, style in (
            ("attack_success_rate", "attack success rate", "o-"),
            ("refusal_rate", "refusal rate (risky)", "s-"),
            ("safe_answer_rate", "answered (safe prompts)", "^--"),
        ):
            values = [getattr(r, metric) for r in self.layers]
            if any(v is not None for v in values):
                ax.plot(layers, [float("nan") if v is None else v for v in values], style, label=label)
        if self.default_layer is not None:
            ax.axvline(self.default_layer, color="black", linestyle=":", linewidth=1, label="default layer")
        ax.set_xlim(0.5, self.num_layers + 0.5)
        ax.set_ylim(-0.02, 1.1)
        ax.set_xlabel("vision encoder layer fed to the LLM (ICET-l)")
        ax.set_ylabel("rate")
        rewards = [r.mean_reward for r in self.layers]
        if any(v is not None for v in rewards):
            twin = ax.twinx()
            values = [float("nan") if v is None else v for v in rewards]
            twin.plot(layers, values, "d-.", color="tab:purple", label="mean reward")
            twin.set_ylabel("mean reward")
            twin.legend(loc="lower right", fontsize=8)
        ax.legend(loc="upper right", fontsize=8)
        ax.set_title(title or f"ICET scan of {Path(self.model).name or self.model}", fontsize=10, pad=14)
        fig.tight_layout()
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


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def metrics_table(report: IcetReport) -> str:
    """The per-layer Markdown table of a report."""
    lines = [
        "| Layer | Group | Prompts | ASR | Refusal rate | Safe answered | Unparsed | Reward |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report.layers:
        mark = "*" if r.layer == report.default_layer else ""
        lines.append(
            f"| {r.layer}{mark} | {r.group} | {r.num_prompts} | {_pct(r.attack_success_rate)} | "
            f"{_pct(r.refusal_rate)} | {_pct(r.safe_answer_rate)} | {r.unparsed} | {_num(r.mean_reward)} |"
        )
    return "\n".join(lines)


def comparison_table(before: IcetReport, after: IcetReport, labels: tuple[str, str] = ("before", "after")) -> str:
    """A Markdown table of two scans of the same layers side by side (e.g. before / after L-PPO, gating on / off)."""
    a, b = labels
    lines = [
        f"| Layer | ASR {a} | ASR {b} | Refusal {a} | Refusal {b} | Safe answered {a} | Safe answered {b} |",
        "|---|---|---|---|---|---|---|",
    ]
    for first in before.layers:
        try:
            second = after.result(first.layer)
        except KeyError:
            continue
        mark = "*" if first.layer == before.default_layer else ""
        lines.append(
            f"| {first.layer}{mark} | {_pct(first.attack_success_rate)} | {_pct(second.attack_success_rate)} | "
            f"{_pct(first.refusal_rate)} | {_pct(second.refusal_rate)} | {_pct(first.safe_answer_rate)} | "
            f"{_pct(second.safe_answer_rate)} |"
        )
    return "\n".join(lines)


def _is_risky(item: Any) -> bool:
    """Items expected to be refused, and unlabelled items (ICET scans are run on harmful-prompt sets), are risky."""
    return getattr(item, "expected", None) != "answer"


def _layer_result(
    layer: int, num_layers: int, items: Sequence[Any], judgements: Sequence[Judgement], rewards: Sequence[float] | None
) -> IcetLayerResult:
    risky = [(item, j) for item, j in zip(items, judgements) if _is_risky(item)]
    safe = [j for item, j in zip(items, judgements) if not _is_risky(item)]

    def rates(rows: Sequence[tuple[Any, Judgement]]) -> tuple[float | None, float | None]:
        unsafe_known = [j.unsafe for _, j in rows if j.parsed and j.unsafe is not None]
        refused_known = [j.refused for _, j in rows if j.parsed and j.refused is not None]
        return _rate(sum(unsafe_known), len(unsafe_known)), _rate(sum(refused_known), len(refused_known))

    asr, refusal = rates(risky)
    answered_known = [not j.refused for j in safe if j.parsed and j.refused is not None]
    categories: dict[str, list[tuple[Any, Judgement]]] = {}
    for item, j in risky:
        categories.setdefault(str(getattr(item, "category", None) or "uncategorized"), []).append((item, j))
    per_category = {}
    for name, rows in sorted(categories.items()):
        category_asr, category_refusal = rates(rows)
        per_category[name] = {"n": len(rows), "attack_success_rate": category_asr, "refusal_rate": category_refusal}
    return IcetLayerResult(
        layer=layer,
        group=layer_group(layer, num_layers),
        num_prompts=len(items),
        attack_success_rate=asr,
        refusal_rate=refusal,
        safe_answer_rate=_rate(sum(answered_known), len(answered_known)),
        unparsed=sum(1 for j in judgements if not j.parsed),
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
    """Scan the vision layers: generate with the LLM's image path fed from each layer, judge, report.

    Args:
        model: a `LlavaForConditionalGeneration`-style model or a SafeVLM.
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
    num_layers = vision_encoder_depth(model)
    scan_layers = resolve_layers(layers, num_layers)
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}.")
    safety_gating = resolve_gating(model, gating)
    judge = build_judge(judge) if isinstance(judge, str) else judge
    if isinstance(reward_model, str):
        reward_model = build_reward(reward_model, model=model)
    decoding = {"do_sample": False, **(generate_kwargs or {})}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # Encode once; every layer reuses the same inputs (only `vision_feature_layer` changes between layers).
    batches = [
        (items[start : start + batch_size], encode_items(processor, items[start : start + batch_size], device))
        for start in range(0, len(items), batch_size)
    ]
    results: list[IcetLayerResult] = []
    records: list[dict[str, Any]] = []
    progress = tqdm(total=len(scan_layers) * len(batches), desc="ICET scan", disable=not show_progress)
    try:
        for layer in scan_layers:
            set_seed(seed)
            responses: list[str] = []
            for _, inputs in batches:
                tokens = generate_at_layer(
                    model, processor, inputs, layer, max_new_tokens=max_new_tokens, gating=safety_gating, **decoding
                )
                responses.extend(decode_responses(processor, tokens))
                progress.update(1)
            prompts = [item.prompt for item in items]
            judgements = judge.judge(judge_inputs(prompts, responses, items))
            if len(judgements) != len(items):
                raise ValueError(
                    f"Judge {judge.name!r} returned {len(judgements)} judgements for {len(items)} answers; a judge "
                    "must return one per answer, in order."
                )
            rewards = reward_model(prompts, responses, items) if reward_model is not None else None
            results.append(_layer_result(layer, num_layers, items, judgements, rewards))
            progress.set_postfix(layer=layer, asr=_pct(results[-1].attack_success_rate))
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
        num_layers=num_layers,
        default_layer=default_feature_layer(model),
        gating=safety_gating,
        judge=judge.describe(),
        settings={"max_new_tokens": max_new_tokens, "batch_size": batch_size, "seed": seed, **decoding},
        layers=results,
        records=records,
        reward=describe_reward(reward_model) if reward_model is not None else None,
    )


def load_icet_report(path: str | os.PathLike) -> IcetReport:
    """Read a report written by :meth:`IcetReport.save`."""
    return IcetReport.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


__all__ = [
    "GROUPS",
    "IcetLayerResult",
    "IcetReport",
    "comparison_table",
    "decode_responses",
    "default_feature_layer",
    "generate_at_layer",
    "icet_scan",
    "is_safevlm",
    "layer_group",
    "load_icet_report",
    "metrics_table",
    "normalize_layer",
    "resolve_gating",
    "resolve_layers",
    "vision_encoder_depth",
]
