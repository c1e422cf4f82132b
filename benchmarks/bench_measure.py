"""Measurement tools: interleaved A/B timing, per-decode-step clocks, forward-call counters, peak memory.

The benchmark machine is shared and noisy, so every comparison is taken in the same process on the same weights,
with the variants interleaved round by round (alternating their order) and summarised by medians; a ratio is the
median of the per-round ratios, so a burst of load that hits one round cancels out of that round's ratio.
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn
from transformers import StoppingCriteria


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile); for fewer than 2 values all three are the value."""
    if len(values) < 2:
        return (values[0],) * 3 if values else (float("nan"),) * 3
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


@dataclass
class RatioStats:
    """Median and interquartile range of per-round ratios ``a / b``, and the ratio of the two minima.

    The ratio of minima compares the least disturbed run of each side: on a loaded machine it is a useful check
    of the median (which a long burst of load can still shift).
    """

    median: float
    q1: float
    q3: float
    min_ratio: float
    rounds: int

    @classmethod
    def of(cls, a: list[float], b: list[float]) -> "RatioStats":
        if len(a) != len(b) or not a:
            raise ValueError(f"RatioStats needs two equally long, non-empty sample lists, got {len(a)} and {len(b)}.")
        ratios = [x / y for x, y in zip(a, b)]
        q1, median, q3 = quartiles(ratios)
        return cls(median=median, q1=q1, q3=q3, min_ratio=min(a) / min(b), rounds=len(ratios))

    def to_dict(self) -> dict[str, float]:
        return {
            "median": self.median,
            "q1": self.q1,
            "q3": self.q3,
            "min_ratio": self.min_ratio,
            "rounds": self.rounds,
        }


def interleaved(variants: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall-clock seconds of each variant, ``rounds`` samples each, the variants interleaved round by round.

    Every variant is first run ``warmup`` times (allocator, oneDNN kernels, lazy hooks). The order alternates
    between rounds so that no variant always runs right after a pause or right after a particular other one.
    """
    for _ in range(warmup):
        for run in variants.values():
            run()
    names = list(variants)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        gc.collect()
        for name in names if round_index % 2 == 0 else reversed(names):
            start = time.perf_counter()
            variants[name]()
            seconds[name].append(time.perf_counter() - start)
    return seconds


class StepClock(StoppingCriteria):
    """A stopping criterion that never stops and timestamps every decoding step.

    `generate` calls its stopping criteria once per generated token, after the token is chosen, so the first
    timestamp minus :meth:`start` is the time to the first token (vision, safety verdict, prefill) and the gaps
    between timestamps are the per-token decode steps (LLM forward, logits processors, sampling, bookkeeping).
    """

    def __init__(self) -> None:
        self.started = 0.0
        self.stamps: list[float] = []

    def start(self) -> "StepClock":
        self.stamps = []
        self.started = time.perf_counter()
        return self

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    @property
    def time_to_first_token(self) -> float:
        return self.stamps[0] - self.started

    @property
    def step_seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]

    @property
    def total_seconds(self) -> float:
        return self.stamps[-1] - self.started


@dataclass
class GenerateTimings:
    """Per-call timings of repeated `generate` calls of one variant."""

    time_to_first_token: list[float] = field(default_factory=list)
    median_step: list[float] = field(default_factory=list)  # per call: median decode step
    total: list[float] = field(default_factory=list)
    all_steps: list[float] = field(default_factory=list)  # every decode step of every call

    def add(self, clock: StepClock, total: float | None = None) -> None:
        steps = clock.step_seconds
        # A call that ran no decoding step (every row refused: no LLM at all) delivers everything at its end.
        self.time_to_first_token.append(clock.time_to_first_token if clock.stamps else total)
        self.median_step.append(statistics.median(steps) if steps else float("nan"))
        self.total.append(clock.total_seconds if total is None else total)
        self.all_steps.extend(steps)

    def summary(self) -> dict[str, float]:
        step = statistics.median(self.all_steps) if self.all_steps else float("nan")
        return {
            "time_to_first_token_s": statistics.median(self.time_to_first_token),
            "decode_step_s": step,
            "decode_tokens_per_s": 1.0 / step if step == step and step > 0 else float("nan"),
            "total_s": statistics.median(self.total),
            "calls": len(self.total),
            "decode_steps_sampled": len(self.all_steps),
        }


class ForwardCounter:
    """Counts forward calls of modules through forward hooks (e.g. the LLM, the vision tower)."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.counts = {name: 0 for name in modules}

    @contextmanager
    def counting(self) -> Iterator[dict[str, int]]:
        self.counts = {name: 0 for name in self.modules}
        handles = [
            module.register_forward_hook(lambda *args, name=name: self._bump(name))
            for name, module in self.modules.items()
        ]
        try:
            yield self.counts
        finally:
            for handle in handles:
                handle.remove()

    def _bump(self, name: str) -> None:
        self.counts[name] += 1


class ModuleTimer:
    """Wall time spent inside given modules (forward pre/post hooks), per call, for a breakdown of a path."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.seconds: dict[str, list[float]] = {name: [] for name in modules}
        self._started: dict[str, float] = {}

    @contextmanager
    def timing(self) -> Iterator[dict[str, list[float]]]:
        handles = []
        for name, module in self.modules.items():
            handles.append(module.register_forward_pre_hook(lambda *args, name=name: self._start(name)))
            handles.append(module.register_forward_hook(lambda *args, name=name: self._stop(name)))
        try:
            yield self.seconds
        finally:
            for handle in handles:
                handle.remove()

    def _start(self, name: str) -> None:
        self._started[name] = time.perf_counter()

    def _stop(self, name: str) -> None:
        self.seconds[name].append(time.perf_counter() - self._started.pop(name))


# ------------------------------------------------------------------------------------------------------ memory
# Peak memory is the peak resident set size (VmHWM in /proc/self/status) during a call, minus the resident size just
# before it; /proc/self/clear_refs resets VmHWM between calls. tracemalloc does not see torch's allocations and CPU
# torch has no allocator statistics. glibc keeps freed buffers mapped (and moves its mmap threshold up after frees),
# which would hide later allocations from the RSS, so the mmap threshold is pinned: every new buffer of >= 128 KiB is
# then its own mapping, returned to the OS when freed, and free heap pages are trimmed before each measurement.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def pin_malloc_for_rss(threshold: int = 128 * 1024) -> bool:
    """Pin glibc's mmap and trim thresholds so that RSS tracks live tensors; False where that is not possible."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(f"{key} not found in /proc/self/status")


def peak_rss_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        _status_bytes("VmHWM")
        return True
    except (OSError, KeyError):
        return False


def release_free_heap() -> None:
    """Return glibc's free heap pages to the OS (``malloc_trim(0)``), so that reusing them shows up in the RSS."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def peak_rss_delta(run: Callable[[], Any]) -> int:
    """Bytes by which the resident set size peaked above its level at the start of ``run()``.

    Free heap pages left by earlier work are released first: a call that reused them would not grow the RSS.
    """
    gc.collect()
    release_free_heap()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset the peak (VmHWM) to the current RSS
    before = _status_bytes("VmRSS")
    run()
    return _status_bytes("VmHWM") - before


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


# ------------------------------------------------------------------------------------------- interleaved decoding
def interleaved_decode_steps(
    variants: dict[str, tuple[nn.Module, dict]], steps: int, rounds: int
) -> dict[str, list[float]]:
    """Seconds of each greedy decoding step (one cached forward + argmax), the variants alternating step by step.

    `generate` cannot be interleaved below the call level, and on a shared machine the load changes between two
    2-second calls; alternating single steps (~20 ms each, the order flipped every step) puts both sides of a pair
    under the same load, so a few-percent difference is resolvable. Each round prefills every variant untimed (its
    own prompt and cache) and then decodes ``steps`` steps. Returns the step times in matching order, so
    ``zip(times[a], times[b])`` gives adjacent pairs.
    """
    names = list(variants)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        state = {}
        for name, (model, inputs) in variants.items():
            out = model(**inputs, use_cache=True, logits_to_keep=1)
            state[name] = (out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True), inputs["attention_mask"])
        gc.collect()
        for step in range(steps):
            for name in names if (step + round_index) % 2 == 0 else reversed(names):
                model = variants[name][0]
                cache, token, mask = state[name]
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                start = time.perf_counter()
                out = model(
                    input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1
                )
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                seconds[name].append(time.perf_counter() - start)
                state[name] = (out.past_key_values, token, mask)
    return seconds
