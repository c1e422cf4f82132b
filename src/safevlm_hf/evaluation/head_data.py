"""Labelled prompts for the safety-head metrics (``safevlm eval --head-data SPEC``).

Every source the package reads is accepted:

* a training file (``.jsonl`` / ``.json`` in the documented format) or ``vlguard:PATH`` - read by
  :func:`safevlm_hf.data.load_safety_dataset`, the same reader (and VLGuard label mapping) as training, so the head is
  scored in the labels it was trained with;
* a benchmark spec ``figstep:PATH[:text]``, ``xstest:PATH`` or ``mmsafetybench:DIR[:variant]`` - read by
  :func:`~.safety_benchmarks.load_benchmark`. The gold type is the SafeVLM risk type of the item's category
  (:mod:`~.taxonomy`; items of unmapped categories are left out as untyped). Benchmarks say whether a prompt is risky,
  not how risky: a safe item gets level 0, a risky item no level, and counts for the type metrics only.
"""

from __future__ import annotations

import os
from typing import Any

from ..modeling.policy_safevlm import SAFE_TYPE
from .safety_benchmarks import (
    BenchmarkFormatError,
    LabelledItem,
    benchmark_name,
    load_benchmark,
    parse_benchmark_spec,
)


class HeadDataError(ValueError):
    """``--head-data`` names a source that cannot give labelled prompts; the message says what to pass instead."""


def load_head_data(
    spec: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    render_dir: str | os.PathLike | None = None,
) -> list[Any]:
    """Labelled prompts from ``spec`` (see the module docstring): training examples or :class:`LabelledItem`s, as
    :func:`~.runner.evaluate_head` takes them. ``render_dir`` is where a benchmark's typographic images are written
    (default :func:`~.typography.default_render_dir`; ``safevlm eval`` passes its run's render folder)."""
    from ..data import SafetyDataError, load_safety_dataset

    text = os.fspath(spec)
    name = benchmark_name(text)
    try:
        if name is None:
            return list(load_safety_dataset(text, image_root=image_root).examples)
        if name == "vlguard":
            _, path, option = parse_benchmark_spec(text)
            if option is not None:
                raise HeadDataError(
                    f"--head-data {text!r}: VLGuard subsets are a benchmark option; head data reads the whole file "
                    f"with its training labels (pass vlguard:{path})."
                )
            return list(load_safety_dataset(f"vlguard:{path}", image_root=image_root).examples)
        items = load_benchmark(text, image_root=image_root, render_dir=render_dir)
    except (SafetyDataError, BenchmarkFormatError, FileNotFoundError) as err:
        raise HeadDataError(f"--head-data {text!r}: {err}") from None
    labelled = []
    for item in items:
        safe = item.expected == "answer" and item.risk_type == SAFE_TYPE
        labelled.append(
            LabelledItem(
                prompt=item.prompt,
                image=item.image,
                safe_type=item.risk_type,
                safe_level=0 if safe else None,
                id=f"{item.source}:{item.id}",
            )
        )
    return labelled


__all__ = ["HeadDataError", "load_head_data"]
