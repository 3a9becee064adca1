"""The eenn-pipeline job, the main one: train (stage 1) -> predictions -> fit every policy over a
budget sweep, or an experiment's own ``stage2:`` (stage 2) -> compare. Each step writes under one pipeline dir
(:class:`eenn.rundir.PipelineRun`) and is skipped when its outputs exist (``force=true`` redoes
them), so a re-run after an interruption picks up where it stopped. Every value stage 2 needs is
checked before stage 1 trains, and a re-run with another config is refused, naming the keys."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

from hydra import compose
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from eenn.errors import EENNError, check_flag, check_number
from eenn.evaluation.compare import Comparison
from eenn.evaluation.report import accuracy_table
from eenn.policies import POLICIES, build_policy, policy_class
from eenn.policies.base import check_budget
from eenn.policies.budget import sweep_fractions
from eenn.predictions import Predictions, cost_unit_name
from eenn.rundir import ERROR_FILE, PipelineRun
from eenn.tasks.compare import compare
from eenn.tasks.fit import fit_run
from eenn.tasks.train import train
from eenn.utils import interrupt
from eenn.utils.overrides import override

log = logging.getLogger("eenn.pipeline")


def budget_fractions(cfg: DictConfig, val: Predictions, unit: str) -> list[float]:
    """``pipeline.budgets`` as given, or ``pipeline.num_budgets`` evenly spaced from the first
    exit's cost to the full cost (the range where policies differ)."""
    if cfg.pipeline.budgets:
        return [float(b) for b in cfg.pipeline.budgets]
    n = int(cfg.pipeline.num_budgets)
    # unrounded: the first exit's fraction rounded down would be clamped up with a warning
    return sweep_fractions(val.costs_in(unit), n)


def check_config(cfg: DictConfig) -> None:
    """Every value stage 2 will need, checked before stage 1 trains: each fit's policy and budget
    (as eenn-fit would check them), the budget sweep and the cost unit."""
    stage2 = cfg.get("stage2")
    ignored = [
        o
        for o in (cfg.hydra.overrides.task if "hydra" in cfg else [])
        if o.lstrip("+").split("=")[0]
        in ("pipeline.policies", "pipeline.budgets", "pipeline.num_budgets", "pipeline.cost")
    ]
    if stage2 and ignored:
        raise EENNError(
            f"{ignored[0]}: experiment={cfg.hydra.runtime.choices.get('experiment')} brings its own stage 2 "
            "(its stage2: policy, budgets and cost), which replaces pipeline.policies, budgets, num_budgets "
            "and cost; leave them out, or add stage2=null to use them."
        )
    if stage2:
        units, jobs = [cost_unit_name(stage2.cost)], [(f"stage2 job {name}", o) for name, o in experiment_jobs(stage2)]
    else:
        p = cfg.pipeline
        units = [cost_unit_name(p.cost)]
        if p.budgets is not None:
            if isinstance(p.budgets, str) or not p.budgets:
                raise EENNError(
                    f"pipeline.budgets must be a non-empty list of budget fractions or null, got {p.budgets!r}."
                )
            for b in p.budgets:
                check_budget(b, "pipeline.budgets")
            named = {}  # a job is named by its budget to 4 decimals: two budgets must not share a name
            for b in p.budgets:
                if f"{b:.4f}" in named:
                    raise EENNError(
                        f"pipeline.budgets {named[f'{b:.4f}']} and {b} would both be the jobs <policy>_{b:.4f}; "
                        "give budgets that differ in their first 4 decimals."
                    )
                named[f"{b:.4f}"] = b
        else:
            check_number(p.num_budgets, "pipeline.num_budgets", 2, integer=True)
        if isinstance(p.policies, str) or not p.policies:
            raise EENNError(f"pipeline.policies must be a non-empty list of policies, got {p.policies!r}.")
        for name in [*p.policies, *p.policy_overrides]:
            if name not in POLICIES:
                raise EENNError(f"pipeline: {name!r} is not a known exit policy; valid: {', '.join(POLICIES.names())}.")
        jobs = [
            (
                f"pipeline.policy_overrides.{name}" if name in p.policy_overrides else f"pipeline.policies: {name}",
                [override("policy", name), *policy_overrides(cfg, name)],
            )
            for name in p.policies
        ]
    have = ["flops", "macs", "params", *(["latency_ms"] if cfg.cost.latency else [])]
    if units[0] not in have:
        raise EENNError(
            f"pipeline.cost={units[0]!r}: stage 1 will save the costs {have} (latency only with cost.latency=true)."
        )
    for where, overrides in jobs:
        fit_cfg = compose("fit", overrides=overrides)
        try:
            build_policy(**OmegaConf.to_container(fit_cfg.policy, resolve=True))  # type: ignore[arg-type]
            budget = fit_cfg.budget.value if fit_cfg.budget.value is not None else fit_cfg.budget.fraction
            check_budget(budget, "budget.value" if fit_cfg.budget.value is not None else "budget.fraction")
        except EENNError as exc:
            raise EENNError(f"{where}: {exc}") from None


def policy_overrides(cfg: DictConfig, policy: str) -> list[str]:
    """The eenn-fit overrides of ``pipeline.policy_overrides.<policy>``."""
    given = cfg.pipeline.policy_overrides.get(policy)
    return [
        override(f"policy.{k}", v) for k, v in (OmegaConf.to_container(given, resolve=True) if given else {}).items()
    ]


def fit_jobs(cfg: DictConfig, fractions: list[float], num_exits: int) -> list[tuple[str, list[str]]]:
    """(job name, eenn-fit overrides) for every policy and budget; a policy compared per exit
    (static) once per exit instead, and a risk-controlled one once, at the full cost: its budget
    is a ceiling and its cost follows its risk level, so the tighter budgets of the sweep would
    only refuse it."""
    jobs = []
    for policy in cfg.pipeline.policies:
        extra = policy_overrides(cfg, policy)
        if policy_class(policy).per_exit_only:
            jobs += [
                (
                    f"{policy}_exit{k}",
                    [override("policy", policy), override("policy.exit", k), "budget.fraction=1.0", *extra],
                )
                for k in range(num_exits)
            ]
        elif policy_class(policy).risk_controlled:
            jobs.append((f"{policy}_1.0000", [override("policy", policy), "budget.fraction=1.0", *extra]))
        else:
            jobs += [
                (f"{policy}_{b:.4f}", [override("policy", policy), override("budget.fraction", b), *extra])
                for b in fractions
            ]
    return jobs


def experiment_jobs(stage2: DictConfig) -> list[tuple[str, list[str]]]:
    """(job name, eenn-fit overrides) of an experiment's ``stage2:`` section: its policy with its
    hyper-parameters, once per combination of its sweep's values (a budget given as a value in the
    cost unit clears the default fraction, so that the results table shows the budget fitted to)."""
    s = OmegaConf.to_container(stage2, resolve=True)
    params = dict(s["policy"])  # type: ignore[index]
    name = params.pop("name")
    base = [override("policy", name), *(override(f"policy.{k}", v) for k, v in params.items())]
    axes = [(f"{group}.{key}", values) for group, keys in s["sweep"].items() for key, values in keys.items()]  # type: ignore[index, union-attr]
    jobs = []
    for combo in itertools.product(*(values for _, values in axes)):
        chosen = list(zip((key for key, _ in axes), combo))
        clear = ["budget.fraction=null"] if any(key == "budget.value" for key, _ in chosen) else []
        job = "_".join([name, *(f"{key.rsplit('.', 1)[-1]}={v}" for key, v in chosen)])
        jobs.append((job, [*base, *clear, *(override(key, v) for key, v in chosen)]))
    return jobs


def run_pipeline(cfg: DictConfig) -> Comparison:
    """Run the pipeline into ``cfg.paths.output_dir``; returns the comparison, whose ``failures``
    list the fits that failed."""
    pipe = PipelineRun(cfg.paths.output_dir)
    check_config(cfg)
    force = check_flag(cfg.get("force", False), "force")
    with pipe.claimed(force=force, resume=not force and pipe.resumes(cfg)):
        pipe.write_config(cfg)
        return _run_pipeline(cfg, pipe)


def _run_pipeline(cfg: DictConfig, pipe: PipelineRun) -> Comparison:
    console = Console(soft_wrap=True)  # messages hold paths: a line broken inside one cannot be copied or grepped

    # --- stage 1 (force=true cleared the pipeline dir when claiming it) -------------------------
    if not pipe.train.finished():
        console.rule("[bold]stage 1: train")
        train(pipe.stage1_config(cfg))
    else:
        console.print(f"stage 1: {escape(str(pipe.train.path))} is complete, skipped (force=true redoes it)")

    # --- stage 2: an experiment's own, or every policy over the budget sweep --------------------
    val = pipe.train.predictions("val")
    stage2 = cfg.get("stage2")
    cost = stage2.cost if stage2 else cfg.pipeline.cost
    if stage2:
        jobs = experiment_jobs(stage2)
    else:
        jobs = fit_jobs(cfg, budget_fractions(cfg, val, cost_unit_name(cost)), val.num_exits)
    todo = [(n, o) for n, o in jobs if not pipe.fit(n).finished()]
    console.rule(f"[bold]stage 2: {len(jobs)} fits ({len(jobs) - len(todo)} done before)")
    failed = []
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        task = progress.add_task("fitting", total=len(todo))
        for name, overrides in todo:
            interrupt.check()  # a Ctrl-C that a fit's cleanup swallowed stops the pipeline here
            progress.update(task, description=f"fitting {escape(name):<24}")
            fit = pipe.fit(name)
            fit_cfg = compose(
                "fit", overrides=[*overrides, override("run_dir", pipe.train.path), override("cost", cost)]
            )
            with open_dict(fit_cfg):
                fit_cfg.paths.output_dir = str(fit.path)
                fit_cfg.wandb = cfg.wandb  # the pipeline's wandb settings reach every fit
                fit_cfg.force = True  # its own job, unfinished: what a failed try left goes
            fit.clear_error()
            try:
                fit_run(fit_cfg, fit.path)
            except Exception as exc:  # noqa: BLE001  (one failed fit must not lose the others)
                failed.append(name)
                fit.write_error(exc, overrides)
                log.error("fit %s failed: %s", name, exc)
            progress.advance(task)

    # --- compare -------------------------------------------------------------------------------
    interrupt.check()
    console.rule("[bold]compare")
    comp = compare(
        [pipe.fit_dir],
        [pipe.train.path],
        pipe.compare.path,
        cfg.wandb,
        group=pipe.name,
        force=True,
        baseline=cfg.compare.baseline,
    )
    # a failed job of an earlier run that this one no longer asks for (a policy dropped) is named,
    # and does not make this run fail
    asked = {str(pipe.fit(n).path) for n, _ in jobs}
    stale = [f for f in comp.failures if f["run"] not in asked]
    comp.failures = [f for f in comp.failures if f["run"] in asked]
    if stale:
        log.warning(
            "%s holds failed fits this pipeline no longer asks for, left out: %s (delete them, or redo the "
            "pipeline with force=true)",
            pipe.fit_dir,
            ", ".join(sorted(Path(f["run"]).name for f in stale)),
        )
    print_results(comp, console)
    console.print(f"\nreport: [bold]{escape(str(pipe.compare.report_file.resolve()))}[/bold]")  # a path may hold [...]
    if failed:
        console.print(f"[red]{len(failed)} fit(s) failed: {escape(', '.join(failed))} (see their {ERROR_FILE})")
    return comp


def print_results(comp: Comparison, console: Console) -> None:
    header, rows = accuracy_table(comp)
    table = Table(title="test accuracy (%) by budget (fraction of the full model's cost)")
    for h in header:
        left = h in ("model", "policy", "unit")
        table.add_column(escape(h), justify="left" if left else "right", no_wrap=True)
    for r in rows:
        table.add_row(*(escape(str(v)) for v in r))
    if not console.is_terminal:  # a log file or pipe: rich would squeeze the table into 80 columns
        console.width = max(console.width, 10 * len(header) + 20)
    console.print(table)
