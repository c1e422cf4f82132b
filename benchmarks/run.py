"""What safety costs, measured side by side: SafeVLM vs the LLaVA it was converted from, on a random mid-size model.

    python benchmarks/run.py [--quick] [--out benchmarks/results.json] [--threads 2] [--profile DIR]

Prints a Markdown table and writes every number (and how it was measured) as JSON. Each figure is a ratio taken in
the same process on the same weights, variants interleaved, median of repeated runs after warm-up. See
benchmarks/README.md for the setup and the meaning of each row.
"""

from __future__ import annotations

import os


# Before torch loads OpenMP: on a shared machine, spinning OpenMP workers stall each other at every barrier whenever
# one is descheduled (measured here under load: prefill median 2.6 s, range 0.7-3.9 s); passive waiting gives stable
# timings (0.42 s, range 0.40-0.43 s). An OMP_WAIT_POLICY set by the caller is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import json
import math
import platform
import statistics
import sys
import time
import timeit
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from transformers.utils import logging as hf_logging

from bench_flops import analytic_floors, count_flops, parameter_overhead, real_shape_overheads
from bench_measure import (
    ForwardCounter,
    GenerateTimings,
    ModuleTimer,
    RatioStats,
    StepClock,
    interleaved,
    interleaved_decode_steps,
    peak_rss_delta,
    peak_rss_supported,
    pin_malloc_for_rss,
    tensor_bytes,
)
from bench_models import ANSWER, MID_SIZE, QUICK, BenchModels, BenchShape, build_models, force_levels, make_inputs
from safevlm_hf import SafetyGateLogitsProcessor, SafetyPolicy, default_safety_policy


NUM_THREADS = 2
LEVEL_ANSWER, LEVEL_REJECT = 0, 3


@dataclass(frozen=True)
class RunSettings:
    """Repetitions and lengths of one run (the full run must stay under 10 minutes on 2 cores)."""

    shape: BenchShape
    warmup: int
    prefill_rounds: int
    decode_rounds: int
    new_tokens: int
    guard_tokens: int
    guard_rounds: int
    batch_size: int
    batch_new_tokens: int
    batch_rounds: int
    train_batch_size: int
    train_rounds: int
    memory_rounds: int
    gate_calls: int
    step_rounds: int


FULL = RunSettings(
    shape=MID_SIZE,
    warmup=1,
    prefill_rounds=25,
    decode_rounds=8,
    new_tokens=32,
    guard_tokens=5,
    guard_rounds=8,
    batch_size=4,
    batch_new_tokens=64,
    batch_rounds=4,
    train_batch_size=2,
    train_rounds=5,
    memory_rounds=3,
    gate_calls=2000,
    step_rounds=4,
)
QUICK_RUN = RunSettings(
    shape=QUICK,
    warmup=1,
    prefill_rounds=2,
    decode_rounds=2,
    new_tokens=4,
    guard_tokens=2,
    guard_rounds=2,
    batch_size=4,
    batch_new_tokens=6,
    batch_rounds=1,
    train_batch_size=2,
    train_rounds=1,
    memory_rounds=1,
    gate_calls=50,
    step_rounds=1,
)


def median(values: list[float]) -> float:
    return statistics.median(values)


def generate_kwargs(new_tokens: int, clock: StepClock | None = None) -> dict[str, Any]:
    # min_new_tokens: random weights may emit EOS at any step; every variant must decode the same number of steps.
    kwargs: dict[str, Any] = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    if clock is not None:
        kwargs["stopping_criteria"] = [clock]
    return kwargs


def warm_up(variants: dict[str, Callable[[], Any]], times: int) -> None:
    """Run every variant ``times`` times, untimed (allocator, oneDNN kernels, lazily installed hooks)."""
    for _ in range(times):
        for run in variants.values():
            run()


def counters(models: BenchModels) -> dict[str, ForwardCounter]:
    return {
        "llava": ForwardCounter({"llm": models.llava.model.language_model, "vision": models.llava.model.vision_tower}),
        "safevlm": ForwardCounter(
            {"llm": models.safevlm.model.language_model, "vision": models.safevlm.model.vision_tower}
        ),
        "guard": ForwardCounter({"llm": models.guard.model.language_model, "vision": models.guard.model.vision_tower}),
    }


# ------------------------------------------------------------------------------------------------------ sections
def bench_refusal_costs(models: BenchModels, run: RunSettings, batch_seconds: dict[str, list[float]]) -> dict:
    """What a refusal and a caution cost now that refused rows skip the LLM and caution prefixes are prefilled.

    * an all-refused batch: gated ``generate`` vs the verdict alone (``assess``) and vs the base LLaVA's ``generate``,
      on the same ``batch_size`` rows and ``batch_new_tokens``; LLM forwards counted with hooks (0 expected). The
      three are timed in `bench_mixed_batch`'s interleaved rounds (``batch_seconds``, the per-round wall seconds it
      returns), so LLaVA's generate on that batch is timed once and each ratio still pairs rounds of one run;
    * a cautioned row: ``generate`` up to its first free token (the prefix prefilled, then one token) vs the base
      LLaVA's prefill of the same prompt.
    """
    llava, safe = models.llava, models.safevlm
    shape = models.shape
    safe_in = make_inputs(models.safevlm_processor, shape, run.batch_size)
    force_levels(safe, safe_in, [LEVEL_REJECT] * run.batch_size)
    count = counters(models)["safevlm"]
    with count.counting() as counted:
        safe.generate(**safe_in, **generate_kwargs(run.batch_new_tokens), safety_policy=refuse_every_level())
    llm_calls = dict(counted).get("llm", 0)
    seconds = {name: batch_seconds[name] for name in ("safevlm_all_refused", "safevlm_assess", "llava_generate")}

    one_base = make_inputs(models.llava_processor, shape, 1)
    one_safe = make_inputs(models.safevlm_processor, shape, 1)
    force_levels(safe, one_safe, [1])  # a level-1 verdict, cautioned under this per-call policy
    caution_all = default_safety_policy()
    caution_all.update(levels={"0": "caution", "1": "caution", "2": "caution", "3": "refuse"}, types={})
    verdict = safe.assess(**one_safe, safety_policy=caution_all)[0]
    prefix = len(models.tokenizer.encode(verdict.message, add_special_tokens=False))
    first_free = dict(generate_kwargs(prefix + 1), min_new_tokens=prefix + 1)
    caution = {
        "safevlm_caution_first_free_token": lambda: safe.generate(**one_safe, **first_free, safety_policy=caution_all),
        "llava_prefill": lambda: llava(**one_base, use_cache=True, logits_to_keep=1),
    }
    caution_seconds = interleaved(caution, rounds=run.prefill_rounds, warmup=run.warmup)
    force_levels(safe, one_safe, [LEVEL_ANSWER])  # restore for later sections
    return {
        "batch_size": run.batch_size,
        "max_new_tokens": run.batch_new_tokens,
        "seconds": {name: median(values) for name, values in {**seconds, **caution_seconds}.items()},
        "llm_forward_calls_all_refused": llm_calls,
        "all_refused_vs_verdict": RatioStats.of(seconds["safevlm_all_refused"], seconds["safevlm_assess"]).to_dict(),
        "all_refused_vs_llava_generate": RatioStats.of(
            seconds["safevlm_all_refused"], seconds["llava_generate"]
        ).to_dict(),
        "caution_prefix_tokens": prefix,
        "caution_action": verdict.action,
        "caution_first_free_token_vs_llava_prefill": RatioStats.of(
            caution_seconds["safevlm_caution_first_free_token"], caution_seconds["llava_prefill"]
        ).to_dict(),
    }


def bench_prefill_and_verdict(models: BenchModels, run: RunSettings, base_in: dict, safe_in: dict) -> dict:
    """Prefill (what generate's first step runs: vision, LLM with cache, lm_head on the last position; SafeVLM adds
    the safety head) of both models, and SafeVLM's classify-only paths, interleaved."""
    llava, safe = models.llava, models.safevlm
    variants: dict[str, Callable[[], Any]] = {
        "llava_prefill": lambda: llava(**base_in, use_cache=True, logits_to_keep=1),
        "safevlm_prefill": lambda: safe(**safe_in, use_cache=True, logits_to_keep=1),
        "safevlm_assess": lambda: safe.assess(**safe_in),
        "safevlm_predict_safety": lambda: safe.predict_safety(**safe_in),
    }
    seconds = interleaved(variants, rounds=run.prefill_rounds, warmup=run.warmup)
    flops = {name: count_flops(fn) for name, fn in variants.items()}
    calls = {}
    count = counters(models)["safevlm"]
    for name in ("safevlm_assess", "safevlm_predict_safety"):
        with count.counting() as counted:
            variants[name]()
        calls[name] = dict(counted)
    # Where the time goes: seconds inside each top-level module, median over a few more calls of each path.
    parts = {
        "vision_tower": safe.model.vision_tower,
        "multi_modal_projector": safe.model.multi_modal_projector,
        "safety_projector": safe.model.safety_projector,
        "safety_head": safe.model.safety_head,
        "language_model": safe.model.language_model,
    }
    breakdown = {}
    for name in ("safevlm_assess", "safevlm_prefill"):
        timer = ModuleTimer(parts)
        totals = []
        with timer.timing():
            for _ in range(max(run.prefill_rounds // 5, 1)):
                start = time.perf_counter()
                variants[name]()
                totals.append(time.perf_counter() - start)
        breakdown[name] = {
            "total_s": median(totals),
            **{part: median(values) if values else 0.0 for part, values in timer.seconds.items()},
        }
    return {
        "seconds": {name: median(values) for name, values in seconds.items()},
        "samples": seconds,
        "breakdown_s": breakdown,
        "flops": flops,
        "prefill_ratio": RatioStats.of(seconds["safevlm_prefill"], seconds["llava_prefill"]).to_dict(),
        "assess_vs_prefill": RatioStats.of(seconds["safevlm_assess"], seconds["safevlm_prefill"]).to_dict(),
        "predict_safety_vs_prefill": RatioStats.of(
            seconds["safevlm_predict_safety"], seconds["safevlm_prefill"]
        ).to_dict(),
        "forward_calls": calls,
        "sequence_length": {
            "llava": int(base_in["input_ids"].shape[1]),
            "safevlm": int(safe_in["input_ids"].shape[1]),
        },
    }


def bench_decode(models: BenchModels, run: RunSettings, base_in: dict, safe_in: dict) -> dict:
    """Greedy decoding of ``new_tokens`` tokens: base LLaVA, SafeVLM gated (verdict: answer), SafeVLM ungated."""
    llava, safe = models.llava, models.safevlm
    clock = StepClock()
    kwargs = generate_kwargs(run.new_tokens, clock)
    variants = {
        "llava": lambda: llava.generate(**base_in, **kwargs),
        "safevlm_gated": lambda: safe.generate(**safe_in, **kwargs, safety_gating=True),
        "safevlm_ungated": lambda: safe.generate(**safe_in, **kwargs, safety_gating=False),
    }
    timings = {name: GenerateTimings() for name in variants}

    def timed(name: str) -> Callable[[], None]:
        def call() -> None:
            clock.start()
            variants[name]()
            timings[name].add(clock)

        return call

    warm_up(variants, run.warmup)
    interleaved({name: timed(name) for name in variants}, rounds=run.decode_rounds, warmup=0)

    # LLM / vision forward passes per generate call, counted with forward hooks.
    forward_calls = {}
    count = counters(models)
    for name, fn in variants.items():
        with count["llava" if name == "llava" else "safevlm"].counting() as counted:
            fn()
        forward_calls[name] = dict(counted)

    # FLOPs of one decoding step: difference between a (1 + m)-token and a 1-token generation.
    extra = max(run.new_tokens // 4, 2)
    step_flops = {}
    for name, model, inputs, gating in (
        ("llava", llava, base_in, None),
        ("safevlm_gated", safe, safe_in, True),
        ("safevlm_ungated", safe, safe_in, False),
    ):
        options = {} if gating is None else {"safety_gating": gating}
        long = count_flops(lambda: model.generate(**inputs, **generate_kwargs(1 + extra), **options))
        short = count_flops(lambda: model.generate(**inputs, **generate_kwargs(1), **options))
        step_flops[name] = (long - short) / extra

    summary = {name: timing.summary() for name, timing in timings.items()}
    return {
        "new_tokens": run.new_tokens,
        "summary": summary,
        "step_ratio_gated_vs_llava": RatioStats.of(
            timings["safevlm_gated"].median_step, timings["llava"].median_step
        ).to_dict(),
        "step_ratio_gated_vs_ungated": RatioStats.of(
            timings["safevlm_gated"].median_step, timings["safevlm_ungated"].median_step
        ).to_dict(),
        "ttft_ratio_gated_vs_llava": RatioStats.of(
            timings["safevlm_gated"].time_to_first_token, timings["llava"].time_to_first_token
        ).to_dict(),
        "step_flops": step_flops,
        "forward_calls_per_generate": forward_calls,
    }


def bench_decode_steps(models: BenchModels, run: RunSettings, base_in: dict, safe_in: dict) -> dict:
    """Decode steps of SafeVLM and LLaVA alternating step by step (see `interleaved_decode_steps`), for one row and
    for a left-padded batch of ``batch_size`` distinct rows: the precise per-step cost of the 64 cached extra tokens.
    """
    batch_base = make_inputs(models.llava_processor, models.shape, run.batch_size)
    batch_safe = make_inputs(models.safevlm_processor, models.shape, run.batch_size)
    result = {}
    for label, base, safe in (("batch_1", base_in, safe_in), (f"batch_{run.batch_size}", batch_base, batch_safe)):
        seconds = interleaved_decode_steps(
            {"llava": (models.llava, base), "safevlm": (models.safevlm, safe)},
            steps=run.new_tokens,
            rounds=run.step_rounds,
        )
        result[label] = {
            "step_s": {name: median(values) for name, values in seconds.items()},
            "step_ratio": RatioStats.of(seconds["safevlm"], seconds["llava"]).to_dict(),
            "steps": len(seconds["llava"]),
        }
    return result


def bench_gate(models: BenchModels, run: RunSettings, safe_in: dict, decode_step_s: float) -> dict:
    """Cost of one SafetyGateLogitsProcessor call (the only per-step work gating adds), idle and forcing."""
    tokenizer = models.tokenizer
    vocab = models.safevlm.config.text_config.vocab_size
    message = SafetyPolicy.default().message("refuse", "Privacy", LEVEL_REJECT, "reject")
    forced = tokenizer.encode(message, add_special_tokens=False)
    prompt_length = int(safe_in["input_ids"].shape[1])
    input_ids = torch.zeros(1, prompt_length + 3, dtype=torch.long)
    scores = torch.randn(1, vocab)
    gates = {
        "idle (answer)": SafetyGateLogitsProcessor.from_forced([None], [False], tokenizer.eos_token_id, prompt_length),
        "forcing (refuse)": SafetyGateLogitsProcessor.from_forced(
            [forced], [True], tokenizer.eos_token_id, prompt_length
        ),
    }
    result = {}
    for name, gate in gates.items():
        gate(input_ids, scores)
        per_call = (
            min(timeit.repeat(lambda: gate(input_ids, scores), number=run.gate_calls, repeat=3)) / run.gate_calls
        )
        result[name] = {"seconds_per_call": per_call, "fraction_of_decode_step": per_call / decode_step_s}
    return result


def bench_memory(models: BenchModels, run: RunSettings, base_in: dict, safe_in: dict) -> dict:
    """Weights, and the peak RSS growth during a generate call (activations, KV cache, logits).

    Runs after every timed section: pinning glibc's mmap threshold (needed for RSS to follow the live tensors)
    turns every large allocation, e.g. the KV cache growing by `torch.cat` at each step, into fresh page faults,
    which would slow the timed runs in proportion to the sequence length.
    """
    llava, safe = models.llava, models.safevlm
    kwargs = generate_kwargs(run.new_tokens)
    result: dict[str, Any] = {
        "method": "peak RSS (VmHWM after /proc/self/clear_refs reset) minus RSS before the call; glibc mmap "
        "threshold pinned at 128 KiB so freed tensors leave the RSS",
        "weights_bytes": {"llava": tensor_bytes(llava), "safevlm": tensor_bytes(safe)},
    }
    text = models.safevlm.config.text_config
    kv_heads = text.num_key_value_heads or text.num_attention_heads
    kv_per_token = 2 * text.num_hidden_layers * text.hidden_size * kv_heads // text.num_attention_heads * 4  # fp32
    result["kv_cache_bytes"] = {
        "llava": kv_per_token * (int(base_in["input_ids"].shape[1]) + run.new_tokens),
        "safevlm": kv_per_token * (int(safe_in["input_ids"].shape[1]) + run.new_tokens),
    }
    result["malloc_pinned"] = pin_malloc_for_rss()
    if not result["malloc_pinned"] or not peak_rss_supported():
        result["peak_bytes"] = None
        result["note"] = "peak RSS unavailable (needs Linux /proc/self/clear_refs)"
        return result
    runs = {
        "llava": lambda: llava.generate(**base_in, **kwargs),
        "safevlm": lambda: safe.generate(**safe_in, **kwargs),
    }
    for fn in runs.values():
        fn()
    peaks: dict[str, list[int]] = {name: [] for name in runs}
    for round_index in range(run.memory_rounds):
        for name in runs if round_index % 2 == 0 else reversed(list(runs)):
            peaks[name].append(peak_rss_delta(runs[name]))
    peak = {name: int(median(values)) for name, values in peaks.items()}
    total = {name: peak[name] + result["weights_bytes"][name] for name in runs}
    result.update(
        peak_bytes=peak,
        peak_samples=peaks,
        total_bytes=total,
        peak_ratio=peak["safevlm"] / peak["llava"] if peak["llava"] else None,
        total_ratio=total["safevlm"] / total["llava"],
    )
    return result


def bench_external_guard(models: BenchModels, run: RunSettings, base_in: dict, safe_in: dict) -> dict:
    """SafeVLM generate vs the external-guard pattern: a same-size guard LLaVA reads the prompt and decodes a short
    label (``guard_tokens`` tokens, as Llama Guard's "unsafe\\nS1"), then the base LLaVA answers."""
    llava, safe, guard = models.llava, models.safevlm, models.guard
    clock = StepClock()
    answer_kwargs = generate_kwargs(run.new_tokens, clock)
    guard_kwargs = generate_kwargs(run.guard_tokens)
    record: dict[str, dict[str, list[float]]] = {
        "guard_pattern": {"verdict": [], "ttft": [], "total": []},
        "safevlm": {"verdict": [], "ttft": [], "total": []},
    }

    def guard_pattern() -> None:
        start = time.perf_counter()
        guard.generate(**base_in, **guard_kwargs)
        verdict = time.perf_counter() - start
        clock.start()
        llava.generate(**base_in, **answer_kwargs)
        record["guard_pattern"]["verdict"].append(verdict)
        record["guard_pattern"]["ttft"].append(verdict + clock.time_to_first_token)
        record["guard_pattern"]["total"].append(verdict + clock.total_seconds)

    def safevlm() -> None:
        start = time.perf_counter()
        safe.assess(**safe_in)  # the classify-only verdict, for the time-to-verdict comparison
        verdict = time.perf_counter() - start
        clock.start()
        safe.generate(**safe_in, **answer_kwargs)  # computes its own verdict before the first token
        record["safevlm"]["verdict"].append(verdict)
        record["safevlm"]["ttft"].append(clock.time_to_first_token)
        record["safevlm"]["total"].append(clock.total_seconds)

    warm_up({"guard_pattern": guard_pattern, "safevlm": safevlm}, run.warmup)
    for values in (*record["guard_pattern"].values(), *record["safevlm"].values()):
        values.clear()
    interleaved({"guard_pattern": guard_pattern, "safevlm": safevlm}, rounds=run.guard_rounds, warmup=0)
    calls = {}
    count = counters(models)
    with count["guard"].counting() as guard_calls, count["llava"].counting() as llava_calls:
        guard.generate(**base_in, **guard_kwargs)
        llava.generate(**base_in, **generate_kwargs(run.new_tokens))
    calls["guard_pattern"] = {"guard": dict(guard_calls), "llava": dict(llava_calls)}
    with count["safevlm"].counting() as safe_calls:
        safe.generate(**safe_in, **generate_kwargs(run.new_tokens))
    calls["safevlm"] = dict(safe_calls)
    return {
        "new_tokens": run.new_tokens,
        "guard_tokens": run.guard_tokens,
        "seconds": {k: {m: median(v) for m, v in metrics.items()} for k, metrics in record.items()},
        "speedup_verdict": RatioStats.of(record["guard_pattern"]["verdict"], record["safevlm"]["verdict"]).to_dict(),
        "speedup_ttft": RatioStats.of(record["guard_pattern"]["ttft"], record["safevlm"]["ttft"]).to_dict(),
        "speedup_total": RatioStats.of(record["guard_pattern"]["total"], record["safevlm"]["total"]).to_dict(),
        "weights_ratio": (tensor_bytes(guard) + tensor_bytes(llava)) / tensor_bytes(safe),
        "forward_calls": calls,
    }


def delivered_tokens(sequences: torch.Tensor, prompt_length: int, eos_token_id: int) -> list[int]:
    """Per row, tokens generated up to and including the first EOS (what the user receives)."""
    counts = []
    for row in sequences[:, prompt_length:].tolist():
        counts.append(row.index(eos_token_id) + 1 if eos_token_id in row else len(row))
    return counts


def refuse_every_level() -> dict:
    """The default policy with every level refused: a per-call policy stricter than the default (so allowed)."""
    policy = default_safety_policy()
    policy["levels"] = {str(level): "refuse" for level in range(4)}
    return policy


def bench_mixed_batch(models: BenchModels, run: RunSettings) -> tuple[dict, dict[str, list[float]]]:
    """A batch of ``batch_size`` distinct rows, half of them refused (level 3 forced by the head, rows 0, 2, ...),
    against the base LLaVA on the same rows; plus the same batch with every row refused (per-call policy).

    Returns the section's results and, for `bench_refusal_costs`, the per-round wall seconds of the all-refused
    ``generate``, of its verdict alone (``assess``, timed in the same rounds) and of LLaVA's ``generate``.
    """
    llava, safe = models.llava, models.safevlm
    shape = models.shape
    base_in = make_inputs(models.llava_processor, shape, run.batch_size)
    safe_in = make_inputs(models.safevlm_processor, shape, run.batch_size)
    levels = [LEVEL_REJECT if row % 2 == 0 else LEVEL_ANSWER for row in range(run.batch_size)]
    force_levels(safe, safe_in, levels)
    refuse_all = refuse_every_level()
    eos = models.tokenizer.eos_token_id
    clock = StepClock()
    kwargs = generate_kwargs(run.batch_new_tokens, clock)
    variants = {
        "llava": lambda: llava.generate(**base_in, **kwargs),
        "safevlm_half_refused": lambda: safe.generate(**safe_in, **kwargs, return_dict_in_generate=True),
        "safevlm_all_refused": lambda: safe.generate(
            **safe_in, **kwargs, safety_policy=refuse_all, return_dict_in_generate=True
        ),
        # Not a generate call: the verdict alone, which the all-refused batch is compared to in refusal costs.
        "safevlm_assess": lambda: safe.assess(**safe_in, safety_policy=refuse_all),
    }
    timings = {name: GenerateTimings() for name in variants}
    outputs: dict[str, Any] = {}

    def timed(name: str) -> Callable[[], None]:
        def call() -> None:
            clock.start()
            start = time.perf_counter()
            outputs[name] = variants[name]()
            timings[name].add(clock, total=time.perf_counter() - start)

        return call

    warm_up(variants, run.warmup)
    interleaved({name: timed(name) for name in variants}, rounds=run.batch_rounds, warmup=0)

    result: dict[str, Any] = {"batch_size": run.batch_size, "max_new_tokens": run.batch_new_tokens, "levels": levels}
    for name, output in outputs.items():
        if name == "safevlm_assess":
            continue
        sequences = output.sequences if hasattr(output, "sequences") else output
        prompt = int((base_in if name.startswith("llava") else safe_in)["input_ids"].shape[1])
        tokens = delivered_tokens(sequences, prompt, eos)
        wall = median(timings[name].total)
        entry = {
            "delivered_tokens": tokens,
            "decode_steps": int(sequences.shape[1] - prompt),
            "wall_s": wall,
            "delivered_tokens_per_s": sum(tokens) / wall,
            "decode_step_s": timings[name].summary()["decode_step_s"],
        }
        if hasattr(output, "safety_verdicts"):
            entry["actions"] = [v.action for v in output.safety_verdicts]
        result[name] = entry
    actions = result["safevlm_half_refused"]["actions"]
    result["refused_rows_end_early"] = all(
        tokens < run.batch_new_tokens
        for tokens, action in zip(result["safevlm_half_refused"]["delivered_tokens"], actions)
        if action == "refuse"
    )
    result["wall_ratio_half_refused_vs_llava"] = RatioStats.of(
        timings["safevlm_half_refused"].total, timings["llava"].total
    ).to_dict()
    result["step_ratio_half_refused_vs_llava"] = RatioStats.of(
        timings["safevlm_half_refused"].median_step, timings["llava"].median_step
    ).to_dict()
    result["wall_ratio_all_refused_vs_llava"] = RatioStats.of(
        timings["safevlm_all_refused"].total, timings["llava"].total
    ).to_dict()
    force_levels(safe, make_inputs(models.safevlm_processor, shape, 1), [LEVEL_ANSWER])  # restore for later sections
    refusal_seconds = {
        "safevlm_all_refused": timings["safevlm_all_refused"].total,
        "safevlm_assess": timings["safevlm_assess"].total,
        "llava_generate": timings["llava"].total,
    }
    return result, refusal_seconds


def training_batch(models: BenchModels, run: RunSettings) -> dict:
    """Prompt + answer rows with next-token labels on the answer, safety labels, and the head's prompt-only mask."""
    batch = make_inputs(models.safevlm_processor, models.shape, run.train_batch_size, answer=ANSWER)
    answer_length = len(models.tokenizer.encode(" " + ANSWER + "</s>", add_special_tokens=False))
    input_ids = batch["input_ids"]
    answer = torch.zeros_like(input_ids, dtype=torch.bool)
    answer[:, -answer_length:] = True  # left padding: every row's answer ends the sequence
    batch["labels"] = torch.where(answer, input_ids, torch.full_like(input_ids, -100))
    batch["safety_text_mask"] = batch["attention_mask"].bool() & ~answer
    batch["safety_type_labels"] = torch.arange(run.train_batch_size) % len(models.safevlm.config.safety_types)
    batch["safety_level_labels"] = torch.arange(run.train_batch_size) % len(models.safevlm.config.safety_levels)
    batch["safety_subcategory_labels"] = torch.zeros(run.train_batch_size, dtype=torch.long)  # every head trains
    return batch


def bench_training(models: BenchModels, run: RunSettings, measure_memory: bool) -> dict:
    """One optimizer step of Stage I (only the safety modules trainable) vs full fine-tuning (every parameter).

    A plain loop rather than `transformers.Trainer`: the comparison is the model's forward/backward/optimizer cost,
    and the Trainer's data loading, logging and scheduling would add the same noise to both sides. With
    ``measure_memory`` the peak RSS growth of one step of each is measured after the timings (see `bench_memory`).
    """
    batch = training_batch(models, run)
    stage1 = copy.deepcopy(models.safevlm).train()
    full = copy.deepcopy(models.safevlm).train()
    stage1.requires_grad_(False)
    for module in stage1.safety_modules().values():
        module.requires_grad_(True)
    full.requires_grad_(True)
    optimizers = {
        name: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        for name, model in (("stage1", stage1), ("full", full))
    }
    models_by_name = {"stage1": stage1, "full": full}

    def forward_backward(name: str) -> None:
        model = models_by_name[name]
        model(**batch).loss.backward()

    def step(name: str) -> Callable[[], None]:
        def call() -> None:
            optimizers[name].zero_grad(set_to_none=True)
            forward_backward(name)
            optimizers[name].step()

        return call

    seconds = interleaved({name: step(name) for name in models_by_name}, rounds=run.train_rounds, warmup=run.warmup)
    flops = {}
    for name in models_by_name:
        optimizers[name].zero_grad(set_to_none=True)
        flops[name] = count_flops(lambda: forward_backward(name))
    result: dict[str, Any] = {
        "batch_size": run.train_batch_size,
        "sequence_length": int(batch["input_ids"].shape[1]),
        "seconds": {name: median(values) for name, values in seconds.items()},
        "step_ratio_stage1_vs_full": RatioStats.of(seconds["stage1"], seconds["full"]).to_dict(),
        "flops": flops,
        "trainable_params": {
            name: sum(p.numel() for p in model.parameters() if p.requires_grad)
            for name, model in models_by_name.items()
        },
        "adamw_moment_bytes": {
            name: sum(
                state[key].numel() * state[key].element_size()
                for state in opt.state.values()
                for key in ("exp_avg", "exp_avg_sq")
            )
            for name, opt in optimizers.items()
        },
    }
    if measure_memory and pin_malloc_for_rss() and peak_rss_supported():
        result["step_peak_rss_bytes"] = {name: peak_rss_delta(step(name)) for name in models_by_name}
    return result


def profile_paths(models: BenchModels, base_in: dict, safe_in: dict, directory: Path) -> None:
    """torch.profiler operator tables of the compared paths (for explaining a missed target)."""
    from torch.profiler import ProfilerActivity, profile

    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        "llava_prefill": lambda: models.llava(**base_in, use_cache=True, logits_to_keep=1),
        "safevlm_prefill": lambda: models.safevlm(**safe_in, use_cache=True, logits_to_keep=1),
        "safevlm_assess": lambda: models.safevlm.assess(**safe_in),
        "llava_generate": lambda: models.llava.generate(**base_in, **generate_kwargs(8)),
        "safevlm_generate": lambda: models.safevlm.generate(**safe_in, **generate_kwargs(8)),
    }
    for name, fn in paths.items():
        fn()
        with profile(activities=[ProfilerActivity.CPU], with_stack=False) as prof:
            fn()
        table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=40)
        (directory / f"{name}.txt").write_text(table)


# ------------------------------------------------------------------------------------------------------ report
def pct(value: float) -> str:
    return f"{100 * value:+.1f} %"


def ratio_cell(stats: dict) -> str:
    return f"{stats['median']:.3f} [{stats['q1']:.3f}-{stats['q3']:.3f}] (min {stats['min_ratio']:.3f})"


def build_table(results: dict) -> list[dict[str, str]]:
    """The summary rows: what is compared, the measured ratio, counted FLOPs, the analytic floor and the target."""
    p, d, g = results["prefill_verdict"], results["decode"], results["gate"]
    m, e, b, t = results["memory"], results["external_guard"], results["mixed_batch"], results["training"]
    r = results["refusal_costs"]
    ds = results["decode_steps"]
    batch_key = f"batch_{b['batch_size']}"
    mid, big = results["floors"]["mid"], results["floors"]["llava-1.5-7b"]
    params_7b = results["parameters"]["llava-1.5-7b"]
    targets = results["targets"]
    s = d["summary"]
    rows = [
        {
            "figure": "Prefill latency, SafeVLM / LLaVA",
            "measured": f"{p['seconds']['safevlm_prefill'] * 1e3:.0f} / {p['seconds']['llava_prefill'] * 1e3:.0f} ms",
            "ratio": ratio_cell(p["prefill_ratio"]),
            "flops": f"{p['flops']['safevlm_prefill'] / p['flops']['llava_prefill']:.3f}",
            "floor": f"{1 + mid['prefill_overhead']:.3f} / {1 + big['prefill_overhead']:.3f}",
            "target": targets["prefill_overhead"]["text"],
        },
        {
            "figure": "Decode step (cached forward + argmax), SafeVLM / LLaVA, steps interleaved, 1 row",
            "measured": f"{ds['batch_1']['step_s']['safevlm'] * 1e3:.1f} / {ds['batch_1']['step_s']['llava'] * 1e3:.1f} ms",
            "ratio": ratio_cell(ds["batch_1"]["step_ratio"]),
            "flops": f"{d['step_flops']['safevlm_gated'] / d['step_flops']['llava']:.3f}",
            "floor": f"{1 + mid['decode_overhead']:.3f} / {1 + big['decode_overhead']:.3f}",
            "target": targets["decode_overhead"]["text"],
        },
        {
            "figure": f"Decode step, as above, batch of {b['batch_size']} (left-padded)",
            "measured": f"{ds[batch_key]['step_s']['safevlm'] * 1e3:.1f} / {ds[batch_key]['step_s']['llava'] * 1e3:.1f} ms",
            "ratio": ratio_cell(ds[batch_key]["step_ratio"]),
            "flops": "-",
            "floor": f"{1 + mid['decode_overhead']:.3f} / {1 + big['decode_overhead']:.3f}",
            "target": "-",
        },
        {
            "figure": "Decode tokens/s in `generate`, SafeVLM (gated) / LLaVA (per-call step medians)",
            "measured": f"{s['safevlm_gated']['decode_tokens_per_s']:.1f} / {s['llava']['decode_tokens_per_s']:.1f} tok/s",
            "ratio": ratio_cell(d["step_ratio_gated_vs_llava"]),
            "flops": f"{d['step_flops']['safevlm_gated'] / d['step_flops']['llava']:.3f}",
            "floor": f"{1 + mid['decode_overhead']:.3f} / {1 + big['decode_overhead']:.3f}",
            "target": "-",
        },
        {
            "figure": "Decode step in `generate`, gated / `safety_gating=False`",
            "measured": f"{s['safevlm_gated']['decode_step_s'] * 1e3:.1f} / "
            f"{s['safevlm_ungated']['decode_step_s'] * 1e3:.1f} ms/step",
            "ratio": ratio_cell(d["step_ratio_gated_vs_ungated"]),
            "flops": f"{d['step_flops']['safevlm_gated'] / d['step_flops']['safevlm_ungated']:.3f}",
            "floor": "1.000 / 1.000",
            "target": "-",
        },
        {
            "figure": "Gate processor call, idle / forcing a refusal (share of a decode step)",
            "measured": f"{g['idle (answer)']['seconds_per_call'] * 1e6:.1f} / "
            f"{g['forcing (refuse)']['seconds_per_call'] * 1e6:.1f} us",
            "ratio": f"{g['idle (answer)']['fraction_of_decode_step']:.4f} / "
            f"{g['forcing (refuse)']['fraction_of_decode_step']:.4f}",
            "flops": "0",
            "floor": "0",
            "target": targets["gate_overhead"]["text"],
        },
        {
            "figure": "LLM forward passes per generate call (LLaVA / gated / ungated)",
            "measured": " / ".join(
                str(d["forward_calls_per_generate"][k]["llm"]) for k in ("llava", "safevlm_gated", "safevlm_ungated")
            ),
            "ratio": f"{d['forward_calls_per_generate']['safevlm_gated']['llm'] - d['forward_calls_per_generate']['safevlm_ungated']['llm']:+d} extra",
            "flops": "-",
            "floor": "+0",
            "target": targets["llm_forward_calls"]["text"],
        },
        {
            "figure": "Time to first token in generate, SafeVLM / LLaVA",
            "measured": f"{s['safevlm_gated']['time_to_first_token_s'] * 1e3:.0f} / "
            f"{s['llava']['time_to_first_token_s'] * 1e3:.0f} ms",
            "ratio": ratio_cell(d["ttft_ratio_gated_vs_llava"]),
            "flops": "-",
            "floor": f"{1 + mid['prefill_overhead']:.3f} / {1 + big['prefill_overhead']:.3f}",
            "target": "-",
        },
        {
            "figure": "Time to verdict (`assess`) / SafeVLM prefill",
            "measured": f"{p['seconds']['safevlm_assess'] * 1e3:.0f} / {p['seconds']['safevlm_prefill'] * 1e3:.0f} ms"
            f" (LLM calls: {p['forward_calls']['safevlm_assess']['llm']})",
            "ratio": ratio_cell(p["assess_vs_prefill"]),
            "flops": f"{p['flops']['safevlm_assess'] / p['flops']['safevlm_prefill']:.3f}",
            "floor": f"{mid['verdict_fraction']:.3f} / {big['verdict_fraction']:.3f}",
            "target": targets["verdict_fraction"]["text"],
        },
        {
            "figure": "Peak memory in generate (weights + peak RSS growth), SafeVLM / LLaVA",
            "measured": (
                f"{m['total_bytes']['safevlm'] / 2**20:.0f} / {m['total_bytes']['llava'] / 2**20:.0f} MiB (growth "
                f"{m['peak_bytes']['safevlm'] / 2**20:.1f} / {m['peak_bytes']['llava'] / 2**20:.1f} MiB)"
                if m.get("total_bytes")
                else "n/a"
            ),
            "ratio": (
                f"{m['total_ratio']:.3f} (growth {m['peak_ratio']:.3f})"
                if m.get("peak_ratio")
                else f"{m['total_ratio']:.3f}"
                if m.get("total_ratio")
                else "n/a"
            ),
            "flops": "-",
            "floor": f"weights {m['weights_bytes']['safevlm'] / m['weights_bytes']['llava']:.3f}, KV "
            f"{m['kv_cache_bytes']['safevlm'] / m['kv_cache_bytes']['llava']:.3f}",
            "target": "-",
        },
        {
            "figure": f"External guard (guard prefill + {e['guard_tokens']} tokens, then LLaVA) / SafeVLM: time to verdict",
            "measured": f"{e['seconds']['guard_pattern']['verdict'] * 1e3:.0f} / {e['seconds']['safevlm']['verdict'] * 1e3:.0f} ms",
            "ratio": ratio_cell(e["speedup_verdict"]) + " x",
            "flops": "-",
            "floor": f"{mid['guard_speedup_verdict']:.2f} / {big['guard_speedup_verdict']:.2f} x",
            "target": "-",
        },
        {
            "figure": "External guard / SafeVLM: time to first answer token",
            "measured": f"{e['seconds']['guard_pattern']['ttft'] * 1e3:.0f} / {e['seconds']['safevlm']['ttft'] * 1e3:.0f} ms",
            "ratio": ratio_cell(e["speedup_ttft"]) + " x",
            "flops": "-",
            "floor": f"{mid['guard_speedup_first_token']:.2f} / {big['guard_speedup_first_token']:.2f} x",
            "target": targets["guard_speedup"]["text"],
        },
        {
            "figure": f"External guard / SafeVLM: end to end, {e['new_tokens']}-token answer",
            "measured": f"{e['seconds']['guard_pattern']['total'] * 1e3:.0f} / {e['seconds']['safevlm']['total'] * 1e3:.0f} ms",
            "ratio": ratio_cell(e["speedup_total"]) + " x",
            "flops": "-",
            "floor": f"{mid['guard_speedup']:.3f} / {big['guard_speedup']:.3f} x",
            "target": "-",
        },
        {
            "figure": f"All-refused batch of {r['batch_size']}: gated generate / time to verdict (`assess`)",
            "measured": f"{r['seconds']['safevlm_all_refused'] * 1e3:.0f} / {r['seconds']['safevlm_assess'] * 1e3:.0f} ms "
            f"(LLM forwards: {r['llm_forward_calls_all_refused']})",
            "ratio": ratio_cell(r["all_refused_vs_verdict"]),
            "flops": "-",
            "floor": "-",
            "target": targets["refused_vs_verdict"]["text"],
        },
        {
            "figure": f"All-refused batch of {r['batch_size']}: SafeVLM / base LLaVA generate ({r['max_new_tokens']} tokens)",
            "measured": f"{r['seconds']['safevlm_all_refused'] * 1e3:.0f} / {r['seconds']['llava_generate'] * 1e3:.0f} ms",
            "ratio": ratio_cell(r["all_refused_vs_llava_generate"]),
            "flops": "-",
            "floor": "-",
            "target": targets["refused_vs_llava"]["text"],
        },
        {
            "figure": f"Mixed batch of {b['batch_size']} (half refused): delivered tokens/s SafeVLM / LLaVA",
            "measured": f"{b['safevlm_half_refused']['delivered_tokens_per_s']:.1f} / "
            f"{b['llava']['delivered_tokens_per_s']:.1f} tok/s",
            "ratio": f"{b['safevlm_half_refused']['delivered_tokens_per_s'] / b['llava']['delivered_tokens_per_s']:.3f}",
            "flops": "-",
            "floor": "-",
            "target": targets["mixed_batch_throughput"]["text"],
        },
        {
            "figure": f"Caution row: time to first free token ({r['caution_prefix_tokens']}-token prefix prefilled) / "
            "base LLaVA prefill",
            "measured": f"{r['seconds']['safevlm_caution_first_free_token'] * 1e3:.0f} / "
            f"{r['seconds']['llava_prefill'] * 1e3:.0f} ms",
            "ratio": ratio_cell(r["caution_first_free_token_vs_llava_prefill"]),
            "flops": "-",
            "floor": f"prefill ratio {p['prefill_ratio']['median']:.3f}",
            "target": targets["caution_first_token"]["text"],
        },
        {
            "figure": f"Training step, Stage I / full fine-tuning (batch {t['batch_size']})",
            "measured": f"{t['seconds']['stage1'] * 1e3:.0f} / {t['seconds']['full'] * 1e3:.0f} ms",
            "ratio": ratio_cell(t["step_ratio_stage1_vs_full"]),
            "flops": f"{t['flops']['stage1'] / t['flops']['full']:.3f}",
            "floor": f"{mid['training_ratio']:.3f} / {big['training_ratio']:.3f}",
            "target": "-",
        },
        {
            "figure": "Training state (AdamW moments), Stage I / full fine-tuning: this model; 7B (grad + moments)",
            "measured": f"{t['adamw_moment_bytes']['stage1'] / 2**20:.0f} / {t['adamw_moment_bytes']['full'] / 2**20:.0f} MiB; "
            f"{params_7b['adamw_state_bytes_stage1'] / 1e9:.2f} / {params_7b['adamw_state_bytes_full'] / 1e9:.1f} GB",
            "ratio": f"{t['adamw_moment_bytes']['stage1'] / t['adamw_moment_bytes']['full']:.3f}; "
            f"{params_7b['adamw_state_bytes_stage1'] / params_7b['adamw_state_bytes_full']:.4f}",
            "flops": "-",
            "floor": "-",
            "target": "-",
        },
        {
            "figure": "Safety parameters / base parameters (mid-size / llava-1.5-7b / -13b)",
            "measured": f"{results['parameters']['mid']['safety_params'] / 1e6:.1f}M / "
            f"{params_7b['parameters']['safety_params'] / 1e6:.1f}M / "
            f"{results['parameters']['llava-1.5-13b']['parameters']['safety_params'] / 1e6:.1f}M",
            "ratio": f"{results['parameters']['mid']['safety_fraction']:.4f} / "
            f"{params_7b['parameters']['safety_fraction']:.4f} / "
            f"{results['parameters']['llava-1.5-13b']['parameters']['safety_fraction']:.4f}",
            "flops": "-",
            "floor": "-",
            "target": targets["safety_params"]["text"],
        },
    ]
    return rows


def evaluate_targets(results: dict) -> dict[str, dict[str, Any]]:
    p, d, e = results["prefill_verdict"], results["decode"], results["external_guard"]
    b, r = results["mixed_batch"], results["refusal_costs"]
    mid = results["floors"]["mid"]
    calls = d["forward_calls_per_generate"]
    gate_share = results["gate"]["idle (answer)"]["fraction_of_decode_step"]
    step_overhead = results["decode_steps"]["batch_1"]["step_ratio"]["median"] - 1
    checks = {
        # The decode step of generate = model forward + logits processors + bookkeeping; only the forward (measured
        # step-interleaved) and the gate call (timed directly) differ between SafeVLM and LLaVA.
        "decode_overhead": (step_overhead + gate_share, "<=", 0.02, "step + gate overhead <= 2 %"),
        "gate_overhead": (gate_share, "<=", 0.02, "idle gate <= 2 % of a step"),
        "llm_forward_calls": (calls["safevlm_gated"]["llm"] - calls["safevlm_ungated"]["llm"], "<=", 0, "+0 calls"),
        "prefill_overhead": (
            p["prefill_ratio"]["median"] - 1,
            "<=",
            mid["prefill_overhead"] + 0.03,
            f"overhead <= floor + 3 % = {100 * (mid['prefill_overhead'] + 0.03):.1f} %",
        ),
        "verdict_fraction": (p["assess_vs_prefill"]["median"], "<=", 0.25, "<= 0.25"),
        "guard_speedup": (e["speedup_ttft"]["median"], ">=", 1.7, ">= 1.7 x"),
        "safety_params": (
            results["parameters"]["llava-1.5-7b"]["parameters"]["safety_fraction"],
            "<=",
            0.02,
            "<= 2 % at 7B",
        ),
        "refused_llm_forwards": (r["llm_forward_calls_all_refused"], "<=", 0, "0 LLM forwards"),
        "refused_vs_verdict": (r["all_refused_vs_verdict"]["median"], "<=", 1.15, "<= 1.15"),
        "refused_vs_llava": (r["all_refused_vs_llava_generate"]["median"], "<=", 0.4, "<= 0.4"),
        "mixed_batch_throughput": (
            b["safevlm_half_refused"]["delivered_tokens_per_s"] / b["llava"]["delivered_tokens_per_s"],
            ">=",
            1.0,
            ">= 1.0",
        ),
        "caution_first_token": (
            r["caution_first_free_token_vs_llava_prefill"]["median"],
            "<=",
            1.1 * p["prefill_ratio"]["median"],
            f"<= 1.1 x prefill ratio = {1.1 * p['prefill_ratio']['median']:.3f}",
        ),
    }
    evaluated = {}
    for name, (value, op, bound, text) in checks.items():
        met = value <= bound if op == "<=" else value >= bound
        evaluated[name] = {
            "value": value,
            "bound": bound,
            "op": op,
            "met": bool(met),
            "text": f"{text}: {'met' if met else 'MISSED'}",
        }
    return evaluated


def markdown_table(rows: list[dict[str, str]]) -> str:
    header = "| Figure | Measured (SafeVLM / reference) | Ratio, median [IQR] | Counted FLOPs ratio | Analytic FLOP ratio (this model / 7B) | Target |"
    lines = [header, "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['figure']} | {row['measured']} | {row['ratio']} | {row['flops']} | {row['floor']} | {row['target']} |"
        )
    return "\n".join(lines)


def clean_json(value: Any) -> Any:
    """JSON-safe copy: NaN/inf become null, tuples lists, dict keys strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    return value


# -------------------------------------------------------------------------------------------------------- main
def run_suite(run: RunSettings, profile_dir: Path | None = None, log: Callable[[str], None] = print) -> dict:
    """Build the models, run every section, and return the results (with the summary table and target checks)."""
    started = time.perf_counter()
    stamps: dict[str, float] = {}

    def section(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        log(f"[{time.perf_counter() - started:6.1f}s] {name} ...")
        value = fn()
        stamps[name] = time.perf_counter() - t0
        return value

    models = section("build models", lambda: build_models(run.shape))
    base_in = make_inputs(models.llava_processor, run.shape, 1)
    safe_in = make_inputs(models.safevlm_processor, run.shape, 1)
    force_levels(models.safevlm, safe_in, [LEVEL_ANSWER])  # a safe prompt: the gate stays idle
    text_tokens = int(base_in["attention_mask"].sum()) - (run.shape.image_size // run.shape.patch_size) ** 2

    results: dict[str, Any] = {}
    with torch.inference_mode():
        results["prefill_verdict"] = section(
            "prefill + verdict", lambda: bench_prefill_and_verdict(models, run, base_in, safe_in)
        )
        results["decode"] = section("decode", lambda: bench_decode(models, run, base_in, safe_in))
        results["decode_steps"] = section(
            "decode steps (interleaved)", lambda: bench_decode_steps(models, run, base_in, safe_in)
        )
        step_s = results["decode_steps"]["batch_1"]["step_s"]["safevlm"]
        results["gate"] = section("gate processor", lambda: bench_gate(models, run, safe_in, step_s))
        results["external_guard"] = section(
            "external guard", lambda: bench_external_guard(models, run, base_in, safe_in)
        )
        results["mixed_batch"], batch_seconds = section("mixed batch", lambda: bench_mixed_batch(models, run))
        results["refusal_costs"] = section("refusal costs", lambda: bench_refusal_costs(models, run, batch_seconds))
        if profile_dir is not None:
            section("profile", lambda: profile_paths(models, base_in, safe_in, profile_dir))
    # Timings end here; the memory measurements (which change malloc's behaviour for the process) come last.
    results["training"] = section("training", lambda: bench_training(models, run, measure_memory=True))
    with torch.inference_mode():
        results["memory"] = section("memory", lambda: bench_memory(models, run, base_in, safe_in))

    real = real_shape_overheads(num_safety_tokens=64)
    results["parameters"] = {
        "mid": parameter_overhead(models.safevlm),
        **{
            name: {
                "parameters": entry["parameters"],
                "adamw_state_bytes_stage1": entry["adamw_state_bytes_stage1"],
                "adamw_state_bytes_full": entry["adamw_state_bytes_full"],
            }
            for name, entry in real.items()
        },
    }
    results["floors"] = {
        "mid": analytic_floors(
            models.safevlm.config,
            text_tokens,
            name=run.shape.name,
            new_tokens=run.new_tokens,
            guard_tokens=run.guard_tokens,
        ).to_dict(),
        **{name: entry["floors"] for name, entry in real.items()},
    }

    results["targets"] = evaluate_targets(results)
    results["table"] = build_table(results)
    results["meta"] = {
        "shape": run.shape.to_dict(),
        "settings": {k: v for k, v in run.__dict__.items() if k != "shape"},
        "text_tokens": text_tokens,
        "tokenizer_vocab": len(models.tokenizer),
        "params": {
            "llava": sum(p.numel() for p in models.llava.parameters()),
            "safevlm": sum(p.numel() for p in models.safevlm.parameters()),
        },
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "section_seconds": stamps,
        "elapsed_s": time.perf_counter() - started,
    }
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and 1-2 repetitions: checks the code path")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results.json", help="JSON output path")
    parser.add_argument("--threads", type=int, default=NUM_THREADS, help="torch intra-op threads (default 2)")
    parser.add_argument("--profile", type=Path, default=None, help="also write torch.profiler tables to this folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hf_logging.set_verbosity_error()
    results = run_suite(QUICK_RUN if args.quick else FULL, args.profile)
    results["meta"]["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
    table = markdown_table(results["table"])
    print()
    print(table)
    print()
    for name, check in results["targets"].items():
        print(f"  {name:<18} {check['text']}  (value {check['value']:.4g})")
    print(f"\nelapsed {results['meta']['elapsed_s']:.0f} s; results written to {args.out}")
    results["markdown_table"] = table
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(clean_json(results), indent=2, allow_nan=False))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
