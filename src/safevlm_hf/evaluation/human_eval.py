"""Blinded A/B human evaluation of two models' answers.

1. :func:`export_ab_pairs` writes, for the items both models answered, ``pairs.csv`` and ``pairs.jsonl`` for
   annotators: the prompt, the image reference and the two answers as ``response_A`` / ``response_B``, with an empty
   ``label`` column. Which model is A is drawn per pair from ``random.Random(seed)``; the mapping is written to a
   separate ``key.json`` that annotators must not see.
2. Annotators fill ``label`` with ``A``, ``B`` or ``tie`` (case-insensitive; empty = not yet labelled).
3. :func:`import_labels` reads the labelled CSV or JSONL with the key and returns win/tie/loss per model and the win
   margin. A label that is not A/B/tie, or a pair id absent from the key, raises an error naming the file and row.

Each labelled row is one judgement, so several annotators' files (or rows) simply add up.
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence


LABELS: tuple[str, ...] = ("A", "B", "tie")
PAIR_COLUMNS: tuple[str, ...] = ("pair_id", "item_id", "prompt", "image", "response_A", "response_B", "label")
_LABEL_ALIASES = {"a": "A", "b": "B", "tie": "tie"}


class HumanEvalError(ValueError):
    """Bad human-evaluation input; the message names the file and row."""


@dataclass
class HumanEvalSummary:
    """Outcome of an A/B evaluation.

    Attributes:
        model_a / model_b: the two models' names.
        results: per model: ``wins``, ``ties``, ``losses`` and their rates over the labelled pairs.
        n_labelled / n_unlabelled: judgements read / rows left empty.
        win_margin: win rate of ``model_a`` minus win rate of ``model_b`` (in [-1, 1]; ties count for neither).
    """

    model_a: str
    model_b: str
    results: dict[str, dict[str, float]]
    n_labelled: int
    n_unlabelled: int
    win_margin: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _by_id(records: Sequence[Mapping[str, Any]], name: str) -> dict[str, Mapping[str, Any]]:
    table: dict[str, Mapping[str, Any]] = {}
    for index, record in enumerate(records):
        missing = [key for key in ("id", "prompt", "response") if key not in record]
        if missing:
            raise HumanEvalError(f"Records of {name!r}, row {index}: missing {missing} (need id, prompt, response).")
        key = str(record["id"])
        if key in table:
            raise HumanEvalError(f"Records of {name!r}: item id {key!r} appears twice (rows must be unique).")
        table[key] = record
    return table


def export_ab_pairs(
    records_a: Sequence[Mapping[str, Any]],
    records_b: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    *,
    model_a: str,
    model_b: str,
    seed: int = 0,
) -> dict[str, Path]:
    """Write blinded pairs for the items both record lists share (matched by ``id``; records as produced by
    :func:`~.runner.evaluate`: ``id``, ``prompt``, ``response`` and optionally ``image``).

    Returns the paths of ``pairs.csv``, ``pairs.jsonl`` and ``key.json``. The prompts of a shared id must agree.
    """
    if model_a == model_b:
        raise HumanEvalError(f"The two models need different names (both are {model_a!r}).")
    table_a, table_b = _by_id(records_a, model_a), _by_id(records_b, model_b)
    shared = [key for key in table_a if key in table_b]
    if not shared:
        raise HumanEvalError(
            f"{model_a!r} and {model_b!r} have no item ids in common; were they run on one benchmark?"
        )
    rng = random.Random(seed)
    pairs, key = [], {}
    for number, item_id in enumerate(shared, start=1):
        a, b = table_a[item_id], table_b[item_id]
        if a["prompt"] != b["prompt"]:
            raise HumanEvalError(f"Item {item_id!r}: the two models were given different prompts.")
        swap = rng.random() < 0.5
        first, second = (b, a) if swap else (a, b)
        pair_id = f"pair-{number:05d}"
        pairs.append(
            {
                "pair_id": pair_id,
                "item_id": item_id,
                "prompt": a["prompt"],
                "image": a.get("image") or "",
                "response_A": first["response"],
                "response_B": second["response"],
                "label": "",
            }
        )
        key[pair_id] = {"A": model_b if swap else model_a, "B": model_a if swap else model_b, "item_id": item_id}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "pairs.csv", "jsonl": out / "pairs.jsonl", "key": out / "key.json"}
    with paths["csv"].open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=PAIR_COLUMNS)
        writer.writeheader()
        writer.writerows(pairs)
    with paths["jsonl"].open("w", encoding="utf-8") as handle:
        for pair in pairs:
            handle.write(json.dumps(pair, ensure_ascii=False) + "\n")
    key_data = {"model_a": model_a, "model_b": model_b, "seed": seed, "labels": list(LABELS), "pairs": key}
    paths["key"].write_text(json.dumps(key_data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return paths


def _label_rows(path: Path) -> list[tuple[int, Mapping[str, Any]]]:
    """(line number, row) for each row of a labelled CSV or JSONL file."""
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise HumanEvalError(f"{path}:{number}: invalid JSON ({err.msg}).") from None
            if not isinstance(row, dict):
                raise HumanEvalError(f"{path}:{number}: expected a JSON object per line.")
            rows.append((number, row))
        return rows
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [column for column in ("pair_id", "label") if column not in (reader.fieldnames or [])]
    if missing:
        raise HumanEvalError(f"{path}:1: columns {missing} are missing (header: {reader.fieldnames}).")
    rows = []
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return rows
        except csv.Error as err:
            raise HumanEvalError(f"{path}:{reader.line_num}: malformed CSV ({err}).") from None
        rows.append((start, row))


def import_labels(labels_path: str | Path, key_path: str | Path) -> HumanEvalSummary:
    """Read annotators' labels (``pairs.csv``/``pairs.jsonl`` with ``label`` filled in) and the key; count
    win/tie/loss per model and the win margin."""
    labels_path, key_path = Path(labels_path), Path(key_path)
    try:
        key_data = json.loads(key_path.read_text(encoding="utf-8"))
        model_a, model_b, key = key_data["model_a"], key_data["model_b"], key_data["pairs"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise HumanEvalError(f"{key_path}: not a key file written by export_ab_pairs ({err}).") from None
    counts = {model_a: {"wins": 0, "ties": 0, "losses": 0}, model_b: {"wins": 0, "ties": 0, "losses": 0}}
    labelled = unlabelled = 0
    for line, row in _label_rows(labels_path):
        pair_id = str(row.get("pair_id") or "").strip()
        raw = row.get("label")
        value = "" if raw is None else str(raw).strip()
        if pair_id not in key:
            raise HumanEvalError(f"{labels_path}:{line}: pair_id {pair_id!r} is not in the key file {key_path}.")
        if not value:
            unlabelled += 1
            continue
        label = _LABEL_ALIASES.get(value.lower())
        if label is None:
            raise HumanEvalError(f"{labels_path}:{line} (pair {pair_id}): label {value!r} is not A, B or tie.")
        labelled += 1
        if label == "tie":
            counts[model_a]["ties"] += 1
            counts[model_b]["ties"] += 1
            continue
        winner = key[pair_id][label]
        loser = model_b if winner == model_a else model_a
        counts[winner]["wins"] += 1
        counts[loser]["losses"] += 1
    results: dict[str, dict[str, float]] = {}
    for model, table in counts.items():
        results[model] = {
            **table,
            "win_rate": table["wins"] / labelled if labelled else None,
            "tie_rate": table["ties"] / labelled if labelled else None,
            "loss_rate": table["losses"] / labelled if labelled else None,
        }
    margin = (counts[model_a]["wins"] - counts[model_b]["wins"]) / labelled if labelled else None
    return HumanEvalSummary(model_a, model_b, results, labelled, unlabelled, margin)


__all__ = ["HumanEvalError", "HumanEvalSummary", "LABELS", "PAIR_COLUMNS", "export_ab_pairs", "import_labels"]
