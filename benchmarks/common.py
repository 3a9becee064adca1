"""What every benchmark script shares: where a run's JSON goes, and the configs it runs jobs with.

A full run writes the JSON the README quotes, under ``benchmarks/results/``. ``--quick`` is the
smoke run the slow test tier makes of every script (seconds of work, so that a benchmark cannot
rot unnoticed): its JSON goes to a temporary file unless ``--out`` names one, and never over the
quoted results.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def add_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run of seconds; its JSON goes to a temporary file"
    )
    parser.add_argument("--out", type=Path, default=None, help="where the JSON goes (default: benchmarks/results/)")


def output_path(args: argparse.Namespace, results: Path) -> Path:
    if args.out is not None:
        return args.out
    if args.quick:
        return Path(tempfile.mkdtemp(prefix="eenn_bench_")) / results.name
    return results


def write_result(path: Path, result: dict[str, Any]) -> Path:
    """Write a benchmark's JSON with the code that made it (``code``: eenn's version, the commit and
    whether the tree had uncommitted changes), so that a number can be traced to its commit."""
    from eenn.utils.io import write_json
    from eenn.utils.provenance import code_version

    write_json(path, {**result, "code": code_version()})
    return path


def compose_cfg(name: str, overrides: list[str], output_dir: Path | None = None) -> Any:
    """``conf/<name>.yaml`` with ``overrides``, composed as the apps compose it; with ``output_dir``,
    the run dir the job writes, set where Hydra would set it (the checkout as the root)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from eenn.cli.common import conf_dir

    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
            cfg.paths.root_dir = str(REPO)
    return cfg
