"""The main job: train (stage 1) -> predictions -> fit every policy over a budget sweep (stage 2)
-> compare. Each step writes under one pipeline dir and is skipped when its outputs exist
(``pipeline.force=true`` redoes them), so a re-run after an interruption picks up where it stopped."""

from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path
from typing import Any

from hydra import compose
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from eenn.errors import EENNError
from eenn.evaluation.compare import Comparison
from eenn.evaluation.report import accuracy_table
from eenn.evaluation.run_compare import compare
from eenn.predictions import Predictions
from eenn.utils.io import write_json

log = logging.getLogger("eenn.pipeline")


def budget_fractions(cfg: DictConfig, val: Predictions, unit: str) -> list[float]:
    """``pipeline.budgets`` as given, or ``pipeline.num_budgets`` evenly spaced from the first
    exit's cost to the full cost (the range where policies differ)."""
    if cfg.pipeline.budgets:
        return [float(b) for b in cfg.pipeline.budgets]
    costs = val.costs_in(unit)
    lo = float(costs[0] / costs[-1])
    n = int(cfg.pipeline.num_budgets)
    if n < 2:
        raise EENNError(f"pipeline.num_budgets must be at least 2, got {n}.")
    return [round(lo + (1 - lo) * i / (n - 1), 4) for i in range(n)]


def fit_jobs(cfg: DictConfig, fractions: list[float], num_exits: int) -> list[tuple[str, list[str]]]:
    """(job name, eenn-fit overrides) for every policy and budget; ``static`` once per exit."""
    jobs = []
    for policy in cfg.pipeline.policies:
        extra = [f"policy.{k}={v}" for k, v in (cfg.pipeline.policy_overrides.get(policy) or {}).items()]
        if policy == "static":
            jobs += [(f"static_exit{k}", ["policy=static", f"policy.exit={k}", "budget.fraction=1.0", *extra])
                     for k in range(num_exits)]
        else:
            jobs += [(f"{policy}_{b:.4f}", [f"policy={policy}", f"budget.fraction={b}", *extra]) for b in fractions]
    return jobs


def run_pipeline(cfg: DictConfig) -> Comparison:
    from eenn.policies.fitting import fit_run
    from eenn.training.run import train

    root = Path(cfg.paths.output_dir)
    force = bool(cfg.pipeline.force)
    console = Console()

    # --- stage 1 -------------------------------------------------------------------------------
    train_dir = root / "train"
    if force or not (train_dir / "metrics.json").is_file():
        console.rule("[bold]stage 1: train")
        train_cfg = cfg.copy()
        with open_dict(train_cfg):
            train_cfg.paths.output_dir = str(train_dir)
        train(train_cfg)
    else:
        console.print(f"stage 1: {train_dir} is complete, skipped (pipeline.force=true redoes it)")

    # --- stage 2 -------------------------------------------------------------------------------
    val = Predictions.load(train_dir / "predictions" / "val.safetensors")
    unit = {"latency": "latency_ms"}.get(cfg.pipeline.cost, cfg.pipeline.cost)
    jobs = fit_jobs(cfg, budget_fractions(cfg, val, unit), val.num_exits)
    fit_root = root / "fit"
    todo = [(n, o) for n, o in jobs if force or not (fit_root / n / "metrics.json").is_file()]
    console.rule(f"[bold]stage 2: {len(jobs)} fits ({len(jobs) - len(todo)} done before)")
    failed = []
    wandb_keys = {k: v for k, v in OmegaConf.to_container(cfg.pipeline.wandb, resolve=True).items()
                  if k in ("enabled", "project", "mode")} if cfg.pipeline.get("wandb") else {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        task = progress.add_task("fitting", total=len(todo))
        for name, overrides in todo:
            progress.update(task, description=f"fitting {name:<24}")
            out = fit_root / name
            fit_cfg = compose("fit", overrides=[*overrides, f"run_dir={train_dir}", f"cost={cfg.pipeline.cost}"])
            with open_dict(fit_cfg):
                fit_cfg.paths.output_dir = str(out)
                fit_cfg.wandb.merge_with(wandb_keys)  # pipeline.wandb reaches every fit
            (out / "error.json").unlink(missing_ok=True)
            try:
                fit_run(fit_cfg, out)
            except Exception as exc:  # noqa: BLE001  (one failed fit must not lose the others)
                failed.append(name)
                write_json(out / "error.json", {"type": type(exc).__name__, "message": str(exc),
                                                "overrides": overrides, "traceback": traceback.format_exc()})
                log.error("fit %s failed: %s", name, exc)
            progress.advance(task)

    # --- compare -------------------------------------------------------------------------------
    console.rule("[bold]compare")
    comp = compare([str(fit_root)], [str(train_dir)], root / "compare", wandb_cfg=_compare_wandb(cfg))
    print_results(comp, console)
    console.print(f"\nreport: [bold]{(root / 'compare' / 'report.html').resolve()}[/bold]")
    if failed:
        console.print(f"[red]{len(failed)} fit(s) failed: {', '.join(failed)} (see their error.json)")
    return comp


def _compare_wandb(cfg: DictConfig) -> dict[str, Any] | None:
    w = OmegaConf.to_container(cfg.pipeline.wandb, resolve=True) if cfg.pipeline.get("wandb") else None
    if not w or not w.pop("enabled", True):
        return None
    return {"project": w.get("project", "eenn"), "mode": w.get("mode", "auto"),
            "dir": str(Path(cfg.paths.output_dir) / "compare"), "group": Path(cfg.paths.output_dir).name}


def print_results(comp: Comparison, console: Console) -> None:
    header, rows = accuracy_table(comp)
    table = Table(title="test accuracy (%) by budget (fraction of the full model's cost)")
    for h in header:
        left = h in ("model", "policy", "unit")
        table.add_column(h, justify="left" if left else "right", no_wrap=True)
    for r in rows:
        table.add_row(*map(str, r))
    if not console.is_terminal:  # a log file or pipe: rich would squeeze the table into 80 columns
        console.width = max(console.width, 10 * len(header) + 20)
    console.print(table)


def load_pipeline_results(pipeline_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a pipeline's results.csv as dicts (numbers parsed): for notebooks."""
    import csv

    path = Path(pipeline_dir) / "compare" / "results.csv"
    if not path.is_file():
        raise EENNError(f"{str(path)!r} does not exist: run eenn-pipeline first.")
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        for k in ("budget_fraction", "budget", "val_accuracy", "test_accuracy", "val_avg_cost", "test_avg_cost"):
            r[k] = float(r[k])
        r["test_exit_fractions"] = json.loads(r["test_exit_fractions"])
    return rows
