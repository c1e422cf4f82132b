# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""Training recipes: named sets of :class:`SafeVLMTrainingConfig` settings per stage, kept as YAML/JSON files.

A recipe file holds ``name``, ``description``, ``source`` (where its numbers come from), an optional ``launch`` block
(the accelerate config and process count it was published with; informational) and one block per stage
(``stage1``, ``stage2``) whose keys are `SafeVLMTrainingConfig` / `TrainingArguments` fields. The recipes shipped
with the package live in ``safevlm_hf/training/recipes/``; a path to any other file works the same way, so users copy
a shipped recipe and edit it.

Example::

    from safevlm_hf.training import load_recipe

    config = load_recipe("psa-vlm").training_config(stage=1, output_dir="out/stage1", num_safe_samples=1000)
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from .config import SafeVLMTrainingConfig


RECIPE_SUFFIXES = (".yaml", ".yml", ".json")
_TOP_LEVEL_KEYS = {"name", "description", "source", "launch", "stage1", "stage2"}
# Fields a stage block may not set: the stage and the output folder belong to the run, not to the recipe.
_RUN_FIELDS = {"stage", "output_dir"}


class RecipeError(ValueError):
    """A recipe that cannot be found, read or applied; the message names the file and the key."""


@dataclass(frozen=True)
class TrainingRecipe:
    """A parsed recipe: its metadata and the settings of each stage (field name -> value)."""

    name: str
    description: str
    source: str
    path: Path
    stages: dict[int, dict[str, Any]]
    launch: dict[str, Any] = field(default_factory=dict)

    def settings(self, stage: int) -> dict[str, Any]:
        """The recipe's settings for ``stage`` (1 or 2); a copy the caller may edit."""
        if stage not in (1, 2):
            raise RecipeError(f"stage must be 1 or 2, got {stage!r}.")
        return dict(self.stages.get(stage, {}))

    def training_config(self, stage: int, output_dir: str | os.PathLike, **overrides: Any) -> SafeVLMTrainingConfig:
        """A :class:`SafeVLMTrainingConfig` for ``stage``: the recipe's settings, then ``overrides`` on top."""
        settings = {**self.settings(stage), **overrides, "stage": stage, "output_dir": str(output_dir)}
        return build_training_config(settings, origin=f"recipe {self.path}")


def _recipe_files() -> dict[str, Path]:
    folder = resources.files(__package__).joinpath("recipes")
    found = {}
    for entry in folder.iterdir():
        path = Path(str(entry))
        if path.suffix in RECIPE_SUFFIXES:
            found[path.stem] = path
    return dict(sorted(found.items()))


def list_recipes() -> list[TrainingRecipe]:
    """Every recipe shipped with the package, by name."""
    return [load_recipe(path) for path in _recipe_files().values()]


def _read(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            return json.loads(text)
        import yaml

        return yaml.safe_load(text)
    except (json.JSONDecodeError, ValueError) as err:
        raise RecipeError(f"{path} is not valid {path.suffix[1:].upper()}: {err}") from err
    except Exception as err:  # yaml.YAMLError has no common base with the JSON errors
        raise RecipeError(f"{path} is not valid YAML: {err}") from err


def load_recipe(name_or_path: str | os.PathLike) -> TrainingRecipe:
    """A shipped recipe by name (e.g. ``"psa-vlm"``), or a recipe file (``.yaml``/``.yml``/``.json``) by path."""
    shipped = _recipe_files()
    candidate = Path(name_or_path)
    if str(name_or_path) in shipped:
        path = shipped[str(name_or_path)]
    elif candidate.suffix in RECIPE_SUFFIXES or candidate.exists():
        path = candidate
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist.")
    else:
        raise RecipeError(
            f"unknown recipe {str(name_or_path)!r}; shipped recipes: {sorted(shipped)}, or a path to a "
            f"{'/'.join(RECIPE_SUFFIXES)} file."
        )
    data = _read(path)
    if not isinstance(data, dict):
        raise RecipeError(
            f"{path}: a recipe is a mapping with keys {sorted(_TOP_LEVEL_KEYS)}, got {type(data).__name__}."
        )
    unknown = sorted(set(data) - _TOP_LEVEL_KEYS)
    if unknown:
        raise RecipeError(f"{path}: unknown top-level key(s) {unknown}; allowed: {sorted(_TOP_LEVEL_KEYS)}.")
    stages = {}
    for stage in (1, 2):
        block = data.get(f"stage{stage}") or {}
        if not isinstance(block, dict):
            raise RecipeError(f"{path}: stage{stage} must be a mapping of training fields, got {block!r}.")
        _check_keys(block, f"{path}: stage{stage}")
        stages[stage] = {key: value for key, value in block.items() if value is not None}
    launch = data.get("launch") or {}
    if not isinstance(launch, dict):
        raise RecipeError(f"{path}: launch must be a mapping, got {launch!r}.")
    recipe = TrainingRecipe(
        name=str(data.get("name") or path.stem),
        description=str(data.get("description") or ""),
        source=str(data.get("source") or ""),
        path=path,
        stages=stages,
        launch=dict(launch),
    )
    for stage in (1, 2):  # a bad value fails when the recipe is read, not hours later when that stage starts
        _check_values(stages[stage], f"{path}: stage{stage}")  # the keys were checked above
    return recipe


def _check_keys(settings: Mapping[str, Any], origin: str, run_fields: bool = False) -> None:
    """Every key must be a training field; ``run_fields`` also allows the ones a run sets (``stage``,
    ``output_dir``), which a recipe may not."""
    known = {f.name for f in fields(SafeVLMTrainingConfig) if f.init}
    for key in settings:
        if key in _RUN_FIELDS:
            if run_fields:
                continue
            raise RecipeError(f"{origin}: {key!r} is set by the run (--stage / --out), not by a recipe; remove it.")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f" Did you mean {close}?" if close else ""
            raise RecipeError(f"{origin}: {key!r} is not a SafeVLMTrainingConfig / TrainingArguments field.{hint}")


def _argv(settings: Mapping[str, Any], origin: str) -> list[str]:
    argv: list[str] = []
    for key, value in settings.items():
        if value is None:
            continue
        if isinstance(value, dict):
            raise RecipeError(f"{origin}: {key!r} must be a scalar or a list, got a mapping.")
        values = value if isinstance(value, (list, tuple)) else [value]
        argv += [f"--{key}", *(str(v) for v in values)]
    return argv


def _parser():
    from transformers import HfArgumentParser

    return HfArgumentParser(SafeVLMTrainingConfig, exit_on_error=False)


def check_settings(settings: Mapping[str, Any], origin: str = "training settings") -> None:
    """Check that every key is a training field and every value parses as that field's type (hardware-independent:
    the config itself is not built, so e.g. ``bf16: true`` passes on a machine without a GPU)."""
    _check_keys(settings, origin, run_fields=True)
    _check_values(settings, origin)


def _check_values(settings: Mapping[str, Any], origin: str) -> None:
    """Every value must parse as its field's type (the keys are already known to be fields)."""
    try:
        _parser().parse_known_args(_argv(settings, origin))
    except argparse.ArgumentError as err:
        raise RecipeError(f"{origin}: {err}") from err


def build_training_config(settings: Mapping[str, Any], origin: str = "training settings") -> SafeVLMTrainingConfig:
    """A :class:`SafeVLMTrainingConfig` from field settings, each value typed by `HfArgumentParser`.

    Values may be strings (from the command line) or YAML/JSON scalars and lists; ``None`` leaves a field at its
    default. Errors name ``origin`` and the field.
    """
    _check_keys(settings, origin, run_fields=True)  # a clear error, with close field names, before parsing
    argv = _argv(settings, origin)  # outside the `try`: its RecipeError already names the origin
    try:  # parsed once: a value of the wrong type fails here, as in check_settings
        (config, unknown) = _parser().parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except (argparse.ArgumentError, ValueError) as err:
        raise RecipeError(f"{origin}: {err}") from err
    if unknown:
        raise RecipeError(f"{origin}: unknown training option(s) {unknown}.")
    return config


__all__ = [
    "RECIPE_SUFFIXES",
    "RecipeError",
    "TrainingRecipe",
    "build_training_config",
    "check_settings",
    "list_recipes",
    "load_recipe",
]
