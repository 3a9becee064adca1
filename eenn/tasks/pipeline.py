"""The eenn-pipeline job, the main one: train (stage 1) -> predictions -> fit every policy over a
budget sweep, or an experiment's own ``stage2:`` (stage 2) -> compare. Each step writes under one pipeline dir
(:class:`eenn.rundir.PipelineRun`) and is skipped when its outputs exist (``pipeline.force=true``
redoes them), so a re-run after an interruption picks up where it stopped."""

from __future__ import annotations

import itertools
import json
import logging
from typing import Any

from hydra import compose
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from eenn.errors import EENNError
from eenn.evaluation.compare import Comparison
from eenn.evaluation.report import accuracy_table
from eenn.policies import policy_class
from eenn.predictions import Predictions, cost_unit_name
from eenn.rundir import ERROR_FILE, PipelineRun
from eenn.tasks.compare import compare
from eenn.tasks.fit import fit_run, sweep_fractions
from eenn.tasks.train import train

log = logging.getLogger("eenn.pipeline")


def budget_fractions(cfg: DictConfig, val: Predictions, unit: str) -> list[float]:
    """``pipeline.budgets`` as given, or ``pipeline.num_budgets`` evenly spaced from the first
    exit's cost to the full cost (the range where policies differ)."""
    if cfg.pipeline.budgets:
        return [float(b) for b in cfg.pipeline.budgets]
    n = int(cfg.pipeline.num_budgets)
    if n < 2:
        raise EENNError(f"pipeline.num_budgets must be at least 2, got {n}.")
    # unrounded: the first exit's fraction rounded down would be clamped up with a warning
    return sweep_fractions(val.costs_in(unit), n)


def override(key: str, value: Any) -> str:
    """A Hydra command-line override setting ``key`` to ``value`` (JSON is Hydra's syntax for values)."""
    return f"{key}={json.dumps(value)}"


def fit_jobs(cfg: DictConfig, fractions: list[float], num_exits: int) -> list[tuple[str, list[str]]]:
    """(job name, eenn-fit overrides) for every policy and budget; a policy compared per exit
    (static) once per exit instead."""
    jobs = []
    for policy in cfg.pipeline.policies:
        given = cfg.pipeline.policy_overrides.get(policy)
        extra = [override(f"policy.{k}", v) for k, v in (OmegaConf.to_container(given, resolve=True) if given else {}).items()]
        if policy_class(policy).per_exit_only:
            jobs += [(f"{policy}_exit{k}", [f"policy={policy}", f"policy.exit={k}", "budget.fraction=1.0", *extra])
                     for k in range(num_exits)]
        else:
            jobs += [(f"{policy}_{b:.4f}", [f"policy={policy}", f"budget.fraction={b}", *extra]) for b in fractions]
    return jobs


def experiment_jobs(stage2: DictConfig) -> list[tuple[str, list[str]]]:
    """(job name, eenn-fit overrides) of an experiment's ``stage2:`` section: its policy with its
    hyper-parameters, once per combination of its sweep's values (a budget given as a value in the
    cost unit clears the default fraction, so that the results table shows the budget fitted to)."""
    s = OmegaConf.to_container(stage2, resolve=True)
    params = dict(s["policy"])  # type: ignore[index]
    name = params.pop("name")
    base = [f"policy={name}", *(override(f"policy.{k}", v) for k, v in params.items())]
    axes = [(f"{group}.{key}", values) for group, keys in s["sweep"].items() for key, values in keys.items()]  # type: ignore[index, union-attr]
    jobs = []
    for combo in itertools.product(*(values for _, values in axes)):
        chosen = list(zip((key for key, _ in axes), combo))
        clear = ["budget.fraction=null"] if any(key == "budget.value" for key, _ in chosen) else []
        job = "_".join([name, *(f"{key.rsplit('.', 1)[-1]}={v}" for key, v in chosen)])
        jobs.append((job, [*base, *clear, *(override(key, v) for key, v in chosen)]))
    return jobs


def run_pipeline(cfg: DictConfig) -> Comparison:
    pipe = PipelineRun(cfg.paths.output_dir)
    force = bool(cfg.pipeline.force)
    console = Console()

    # --- stage 1 -------------------------------------------------------------------------------
    if force or not pipe.train.finished():
        console.rule("[bold]stage 1: train")
        train_cfg = cfg.copy()
        with open_dict(train_cfg):
            train_cfg.paths.output_dir = str(pipe.train.path)
        train(train_cfg)
    else:
        console.print(f"stage 1: {pipe.train.path} is complete, skipped (pipeline.force=true redoes it)")

    # --- stage 2: an experiment's own, or every policy over the budget sweep --------------------
    val = pipe.train.predictions("val")
    stage2 = cfg.get("stage2")
    cost = stage2.cost if stage2 else cfg.pipeline.cost
    if stage2:
        jobs = experiment_jobs(stage2)
    else:
        jobs = fit_jobs(cfg, budget_fractions(cfg, val, cost_unit_name(cost)), val.num_exits)
    todo = [(n, o) for n, o in jobs if force or not pipe.fit(n).finished()]
    console.rule(f"[bold]stage 2: {len(jobs)} fits ({len(jobs) - len(todo)} done before)")
    failed = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        task = progress.add_task("fitting", total=len(todo))
        for name, overrides in todo:
            progress.update(task, description=f"fitting {name:<24}")
            fit = pipe.fit(name)
            fit_cfg = compose("fit", overrides=[*overrides, f"run_dir={pipe.train.path}", f"cost={cost}"])
            with open_dict(fit_cfg):
                fit_cfg.paths.output_dir = str(fit.path)
                fit_cfg.wandb = cfg.wandb  # the pipeline's wandb settings reach every fit
            fit.clear_error()
            try:
                fit_run(fit_cfg, fit.path)
            except Exception as exc:  # noqa: BLE001  (one failed fit must not lose the others)
                failed.append(name)
                fit.write_error(exc, overrides)
                log.error("fit %s failed: %s", name, exc)
            progress.advance(task)

    # --- compare -------------------------------------------------------------------------------
    console.rule("[bold]compare")
    comp = compare([pipe.fit_dir], [pipe.train.path], pipe.compare.path, cfg.wandb, group=pipe.name)
    print_results(comp, console)
    console.print(f"\nreport: [bold]{pipe.compare.report_file.resolve()}[/bold]")
    if failed:
        console.print(f"[red]{len(failed)} fit(s) failed: {', '.join(failed)} (see their {ERROR_FILE})")
    return comp


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
