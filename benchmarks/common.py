"""What every benchmark script shares: where a run's JSON goes.

A full run writes the JSON the README quotes, under ``benchmarks/results/``. ``--quick`` is the
smoke run the slow test tier makes of every script (seconds of work, so that a benchmark cannot
rot unnoticed): its JSON goes to a temporary file unless ``--out`` names one, and never over the
quoted results.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def add_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a smoke run of seconds; its JSON goes to a temporary file")
    parser.add_argument("--out", type=Path, default=None, help="where the JSON goes (default: benchmarks/results/)")


def output_path(args: argparse.Namespace, results: Path) -> Path:
    if args.out is not None:
        return args.out
    if args.quick:
        return Path(tempfile.mkdtemp(prefix="eenn_bench_")) / results.name
    return results
