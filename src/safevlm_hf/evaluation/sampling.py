"""Stratified subsets of a benchmark: ``safevlm eval --sample N --seed S``.

Benchmark files are sorted by category, so their first N rows (``--limit``) can miss whole categories - the first 25
rows of XSTest hold no unsafe prompt. :func:`stratified_sample` draws N items so that the expected behaviours
(refuse/answer) and the categories within them keep their shares.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Hashable, Sequence, TypeVar


T = TypeVar("T")


def _label(item: Any) -> str:
    return str(getattr(item, "expected", ""))


def _category(item: Any) -> str:
    return str(getattr(item, "category", ""))


def _allocate(sizes: dict[Hashable, int], n: int, rng: random.Random) -> dict[Hashable, int]:
    """Split ``n`` over groups in proportion to their sizes, rounding by the largest-remainder method (random
    tie-break), so the counts add up to ``n`` and each is within one item of its exact share."""
    total = sum(sizes.values())
    quotas = {name: n * size / total for name, size in sizes.items()}
    counts = {name: int(quota) for name, quota in quotas.items()}
    # Largest remainders first; the random tie-break keeps equal groups from always losing in file order.
    order = sorted(sizes, key=lambda name: (-(quotas[name] - counts[name]), rng.random()))
    for name in order[: n - sum(counts.values())]:
        counts[name] += 1
    return counts


def stratified_sample(
    items: Sequence[T],
    n: int,
    seed: int = 0,
    levels: Sequence[Callable[[T], Hashable]] = (_label, _category),
) -> list[T]:
    """``n`` items drawn without replacement, stratified level by level, in their original order.

    The default levels are the expected behaviour (refuse/answer) and then the category within it: ``n`` is split
    over the labels in proportion to their sizes, each label's share over its categories, and the items of each
    category are drawn uniformly. Shares are rounded by the largest-remainder method, so the label counts are each
    within one item of their exact share (and a category's within two) even when ``n`` is smaller than the number
    of categories. The draw depends only on the items, their order, ``n`` and ``seed``; ``n >= len(items)`` returns
    every item.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}.")
    items = list(items)
    if n >= len(items):
        return items
    rng = random.Random(seed)

    def draw(indices: list[int], count: int, level: int) -> list[int]:
        if level == len(levels) or count == 0:
            return rng.sample(indices, count)
        groups: dict[Hashable, list[int]] = {}
        for index in indices:
            groups.setdefault(levels[level](items[index]), []).append(index)
        counts = _allocate({name: len(members) for name, members in groups.items()}, count, rng)
        return [chosen for name, members in groups.items() for chosen in draw(members, counts[name], level + 1)]

    return [items[index] for index in sorted(draw(list(range(len(items))), n, 0))]


__all__ = ["stratified_sample"]
