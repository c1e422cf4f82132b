"""The `safevlm` console script (also `python -m safevlm_hf.cli ...`, e.g. under `torchrun`).

Each feature module owns its sub-command (`register(subparsers)` adds it and sets `func`); this file only assembles
them, so `safevlm --help` lists everything and `safevlm <command> --help` documents each one.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence


def build_parser() -> argparse.ArgumentParser:
    """The full `safevlm` argument parser."""
    from . import __version__, demo
    from .evaluation import cli as eval_cli
    from .hub import cli as hub_cli
    from .layerwise import cli as layerwise_cli
    from .training import cli as training_cli

    parser = argparse.ArgumentParser(
        prog="safevlm",
        description="Safety alignment for LLaVA-style VLMs: SafeVLM (safety modules + refusal gating) and "
        "layer-wise alignment (ICET scan, L-PPO).",
    )
    parser.add_argument("--version", action="version", version=f"safevlm-hf {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo.register(subparsers)
    training_cli.register(subparsers)
    eval_cli.register(subparsers)
    layerwise_cli.register(subparsers)
    hub_cli.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse `argv` (default: `sys.argv[1:]`) and run the chosen sub-command; returns its exit code."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # training forks dataloader workers after tokenizing
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
