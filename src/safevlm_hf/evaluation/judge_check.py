"""Measure a refusal judge on the labelled refusal set: ``safevlm judge-check --judge SPEC``.

The set (``evaluation/data/refusal_judge/responses.jsonl``, documented in the README next to it) holds model
responses to XSTest and FigStep prompts, each labelled ``refusal`` or ``not_refusal``, split into ``dev`` (the rules
were developed on it) and ``heldout`` (written after the rules were frozen, measured once). The command prints
precision, recall, F1 and the confusion counts of the ``refusal`` class per split, and optionally writes them, with
every misjudged response, to a JSON file.

A judgement whose refusal is unknown (an unparseable model-judge answer) counts as wrong whatever the gold label is:
as a missed refusal on a refusal, as a false alarm on a compliant answer.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..cli_support import fail
from .judges import MODEL_JUDGE_KINDS, REFUSAL, Judge, JudgeError, JudgeInput, build_judge, judge_kind
from .metrics import classification_report


#: The labelled refusal set shipped with the package.
REFUSAL_SET_PATH = Path(__file__).parent / "data" / "refusal_judge" / "responses.jsonl"
LABELS = ("not_refusal", "refusal")
SPLITS = ("dev", "heldout")
_FIELDS = ("id", "split", "prompt", "response", "label")


class RefusalSetError(ValueError):
    """The labelled refusal set is malformed; the message names the file and line."""


@dataclass(frozen=True)
class RefusalExample:
    """One labelled response of the refusal set."""

    id: str
    split: str
    prompt: str
    response: str
    refusal: bool
    kind: str = ""
    tags: tuple[str, ...] = ()
    prompt_source: str = ""


def load_refusal_set(path: str | Path | None = None) -> list[RefusalExample]:
    """Read the labelled refusal set (JSON Lines; default :data:`REFUSAL_SET_PATH`)."""
    path = Path(path) if path is not None else REFUSAL_SET_PATH
    if not path.is_file():
        raise RefusalSetError(f"{path}: refusal set not found.")
    examples, seen = [], set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise RefusalSetError(f"{where}: not valid JSON ({err.msg}).") from None
        missing = [key for key in _FIELDS if not isinstance(row.get(key), str)]
        if missing:
            raise RefusalSetError(f"{where}: missing or non-string field(s) {missing}.")
        if row["label"] not in LABELS or row["split"] not in SPLITS:
            raise RefusalSetError(
                f"{where}: label must be one of {list(LABELS)} and split one of {list(SPLITS)}, got "
                f"{row['label']!r} / {row['split']!r}."
            )
        if row["id"] in seen:
            raise RefusalSetError(f"{where}: id {row['id']!r} appears twice.")
        seen.add(row["id"])
        examples.append(
            RefusalExample(
                id=row["id"],
                split=row["split"],
                prompt=row["prompt"],
                response=row["response"],
                refusal=row["label"] == "refusal",
                kind=row.get("kind", ""),
                tags=tuple(row.get("tags", ())),
                prompt_source=row.get("prompt_source", ""),
            )
        )
    if not examples:
        raise RefusalSetError(f"{path}: the refusal set is empty.")
    return examples


def refusal_scores(gold: Sequence[bool], predicted: Sequence[bool | None]) -> dict[str, Any]:
    """Precision, recall and F1 of the ``refusal`` class, accuracy and the confusion counts; an unknown prediction
    (``None``) counts as the wrong answer."""
    resolved = [(not g) if p is None else p for g, p in zip(gold, predicted)]
    report = classification_report([int(g) for g in gold], [int(p) for p in resolved], list(LABELS))
    (tn, fp), (fn, tp) = report["confusion_matrix"]
    refusal = report["per_class"]["refusal"]
    return {
        "n": len(gold),
        "n_refusal": sum(gold),
        "n_not_refusal": len(gold) - sum(gold),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "unknown": sum(1 for p in predicted if p is None),
        "precision": refusal["precision"],
        "recall": refusal["recall"],
        "f1": refusal["f1"],
        "accuracy": report["accuracy"],
    }


def measure_refusal_judge(judge: Judge, examples: Sequence[RefusalExample]) -> dict[str, Any]:
    """Run ``judge`` on every example; scores per split, over all examples, per response kind, and the errors."""
    if REFUSAL not in judge.decides:
        raise JudgeError(f"Judge {judge.name!r} does not decide refusal (it decides {sorted(judge.decides)}).")
    judgements = judge.judge([JudgeInput(e.prompt, e.response) for e in examples])
    predicted = [j.refused for j in judgements]

    def scores(selected: list[int]) -> dict[str, Any]:
        return refusal_scores([examples[i].refusal for i in selected], [predicted[i] for i in selected])

    everything = list(range(len(examples)))
    by_split = {split: scores([i for i in everything if examples[i].split == split]) for split in SPLITS}
    kinds = sorted({e.kind for e in examples})
    by_kind = {}
    for kind in kinds:
        selected = [i for i in everything if examples[i].kind == kind]
        by_kind[kind] = {"n": len(selected), "correct": sum(predicted[i] == examples[i].refusal for i in selected)}
    errors = [
        {
            "id": examples[i].id,
            "split": examples[i].split,
            "kind": examples[i].kind,
            "label": "refusal" if examples[i].refusal else "not_refusal",
            "predicted": None if predicted[i] is None else ("refusal" if predicted[i] else "not_refusal"),
            "judge_raw": judgements[i].raw,
            "prompt": examples[i].prompt,
            "response": examples[i].response,
        }
        for i in everything
        if predicted[i] != examples[i].refusal
    ]
    return {
        "judge": judge.describe(),
        "splits": by_split,
        "all": scores(everything),
        "by_kind": by_kind,
        "errors": errors,
    }


def format_scores(result: dict[str, Any]) -> str:
    """The score table printed by ``safevlm judge-check``."""
    header = f"{'split':<8} {'n':>4} {'TP':>4} {'FP':>4} {'FN':>4} {'TN':>4} {'unk':>4}  precision  recall     F1"
    lines = [header]
    for name, row in [*result["splits"].items(), ("all", result["all"])]:
        if not row["n"]:
            continue
        lines.append(
            f"{name:<8} {row['n']:>4} {row['tp']:>4} {row['fp']:>4} {row['fn']:>4} {row['tn']:>4} {row['unknown']:>4}"
            f"  {row['precision']:>9.3f}  {row['recall']:>6.3f}  {row['f1']:>5.3f}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------- CLI
def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``judge-check`` subcommand to ``subparsers``."""
    parser = subparsers.add_parser(
        "judge-check",
        help="Measure a refusal judge (precision/recall/F1) on the labelled refusal set.",
        description=(
            "Measure a refusal judge on the labelled refusal set (dev and held-out splits): precision, recall and F1 "
            "of the 'refusal' class and the confusion counts."
        ),
    )
    parser.add_argument(
        "--judge",
        default="string",
        help="Refusal judge spec: string (default), string:xstest, string:gcg, hf-refusal:MODEL, openai:MODEL.",
    )
    parser.add_argument(
        "--refusal-set", default=None, help=f"JSONL set (default: the shipped {REFUSAL_SET_PATH.name})."
    )
    parser.add_argument("--out", default=None, help="Write the scores and every misjudged response to this JSON file.")
    parser.add_argument(
        "--show-errors", type=int, default=0, metavar="N", help="Print the first N misjudged responses."
    )
    parser.add_argument("--device", default=None, help="Device of a model judge (default: as loaded).")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Execute ``safevlm judge-check``; 0 on success, 2 on bad input."""
    try:
        examples = load_refusal_set(args.refusal_set)
        options = {"device": args.device} if judge_kind(args.judge) in MODEL_JUDGE_KINDS and args.device else {}
        judge = build_judge(args.judge, **options)
        result = measure_refusal_judge(judge, examples)
    except (OSError, ValueError, JudgeError) as err:
        return fail("judge-check", str(err))
    described = result["judge"]
    counts = ", ".join(f"{row['n']} {name}" for name, row in result["splits"].items())
    print(f"judge {described['name']} v{described['version']} on {len(examples)} labelled responses ({counts})")
    print(format_scores(result))
    for error in result["errors"][: args.show_errors]:
        print(f"- {error['id']} [{error['label']} judged {error['predicted']}] {error['response'][:160]!r}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"Written: {args.out}")
    return 0


__all__ = [
    "REFUSAL_SET_PATH",
    "RefusalExample",
    "RefusalSetError",
    "format_scores",
    "load_refusal_set",
    "measure_refusal_judge",
    "refusal_scores",
    "register",
    "run",
]
