"""The eenn-compare job: stage-2 run and sweep dirs in; the results table, plots and a
self-contained report out (:class:`eenn.rundir.CompareRun`), and the same to wandb."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from eenn.errors import EENNError
from eenn.evaluation.compare import (
    CSV_COLUMNS,
    Comparison,
    Model,
    distinguish,
    fit_row,
    flatten,
    group_seeds,
    policy_label,
    risk_points,
    seed_statistics,
    write_csv,
    write_group_csv,
)
from eenn.evaluation.plots import (
    plot_accuracy_vs_cost,
    plot_confusions,
    plot_exit_distributions,
    plot_reliability,
    plot_risk_curves,
    plot_seed_groups,
    save_png,
)
from eenn.evaluation.report import accuracy_table, seed_table, write_report
from eenn.rundir import CompareRun, FitRun, TrainRun, fit_runs
from eenn.tasks.loggers import start_wandb_run

log = logging.getLogger("eenn.compare")


def load_model(run: TrainRun) -> Model:
    """A stage-1 run's model: its name, training, saved predictions and resolved config (which
    groups it with the runs that differ from it only in their seed)."""
    config = flatten(OmegaConf.to_container(run.config())) if run.has_config() else {}
    return Model(run.name, run.path, run.training(), run.predictions("test"), run.predictions("val"), config)


def collect(sweeps: Sequence[str | Path], runs: Sequence[str | Path] = (), baseline: str | None = None) -> Comparison:
    """Read stage-2 run/sweep dirs and the stage-1 runs they came from (plus any ``runs`` given);
    group the models by seed, with ``baseline`` the group the others are paired with."""
    comp = Comparison()
    for r in runs:
        m = load_model(TrainRun(r))
        comp.models[str(m.run_dir.resolve())] = m
    for sweep in map(Path, sweeps):
        if not sweep.is_dir():
            raise EENNError(f"sweeps: {str(sweep)!r} is not a directory.")
        for job in fit_runs(sweep):
            try:
                if not job.finished():
                    raise EENNError(job.failure())
                add_fit(comp, job)
            except EENNError as exc:  # one broken job is listed; the others' results stand
                comp.failures.append({"run": str(job.path), "reason": str(exc)})
    name_models_apart(comp)
    distinguish(comp)
    comp.rows.sort(key=lambda r: (r["model"], r["policy"], r["settings"], r["cost_unit"], r["budget"]))
    if not comp.rows:
        why = f" ({comp.failures[0]['run']}: {comp.failures[0]['reason']})" if comp.failures else ""
        raise EENNError(f"sweeps={[str(s) for s in sweeps]} hold no finished eenn-fit run{why}.")
    group_seeds(comp)
    seed_statistics(comp, baseline)
    return comp


def add_fit(comp: Comparison, job: FitRun) -> None:
    """A finished fit's row, and the stage-1 model it came from if not there yet."""
    metrics = job.metrics()
    source = job.source_run()
    model = None
    if source is not None:
        key = str(source.path.resolve())
        if key not in comp.models and source.has_predictions():
            comp.models[key] = load_model(source)
        model = comp.models.get(key)
    row = fit_row(
        metrics,
        job.path,
        model.name if model else (source.path.name if source else "unknown"),
        model.training if model else "unknown",
    )
    row["model_dir"] = str(source.path.resolve()) if source is not None else ""  # who it is, beyond its name
    comp.fits.append(
        {
            **metrics,
            "run": str(job.path),
            "model": row["model"],
            "policy_file": str(job.policy_file),
            "hparams": job.policy().hparams(),
        }
    )
    comp.rows.append(row)


def name_models_apart(comp: Comparison) -> None:
    """Two stage-1 runs of one name (two dirs called ``base`` in different places) are two models:
    each is named by its parent dir as well (its whole path if that is not enough), in the models,
    the rows and the fits, so that no table or plot merges them."""
    by_name: dict[str, list[str]] = {}
    for key, m in comp.models.items():
        by_name.setdefault(m.name, []).append(key)
    renamed: dict[str, str] = {}
    for name, keys in by_name.items():
        if len(keys) < 2:
            continue
        longer = {k: f"{Path(k).parent.name}/{name}" for k in keys}
        if len(set(longer.values())) < len(keys):
            longer = {k: k for k in keys}
        for k in keys:
            comp.models[k].name = renamed[k] = longer[k]
    if not renamed:
        return
    runs = {}
    for r in comp.rows:
        if r.get("model_dir") in renamed:
            r["model"] = renamed[r["model_dir"]]
            runs[r["run"]] = r["model"]
    for f in comp.fits:
        f["model"] = runs.get(f["run"], f["model"])


def compare(
    sweeps: Sequence[str | Path],
    runs: Sequence[str | Path],
    out_dir: str | Path,
    wandb_cfg: Mapping[str, Any] | None = None,
    group: str | None = None,
    force: bool = False,
    baseline: str | None = None,
) -> Comparison:
    """Compare the fits of ``sweeps`` into ``out_dir``; ``wandb_cfg`` is the ``wandb:`` config every
    app shares (None: no wandb run), ``group`` the wandb group when it names none; ``force``
    overwrites an earlier comparison there; ``baseline`` (``compare.baseline``) names the seed
    group every other one gets a paired difference to."""
    out = CompareRun(out_dir)
    comp = collect(sweeps, runs, baseline)
    with out.claimed(force=force):
        if not out.has_config():  # made in-process (eenn-pipeline's): the dir still says whose it is
            out.write_config(
                OmegaConf.create(
                    {"task_name": CompareRun.APP, "sweeps": [str(s) for s in sweeps], "runs": [str(r) for r in runs]}
                )
            )
        _write(comp, out, wandb_cfg, group)
    return comp


def _write(comp: Comparison, out: CompareRun, wandb_cfg: Mapping[str, Any] | None, group: str | None) -> None:
    for f in comp.failures:
        log.warning("missing or failed run %s: %s", f["run"], f["reason"])
    write_csv(comp, out.results_file)
    write_group_csv(comp, out.group_results_file)
    risk = risk_points(comp)
    figures = [
        *plot_accuracy_vs_cost(comp),
        *plot_seed_groups(comp),
        *plot_exit_distributions(comp),
        *plot_confusions(comp),
        *plot_reliability(comp),
        *plot_risk_curves(risk),
    ]
    images = [save_png(fig, out.figure_file(name)) for name, fig in figures]
    write_report(comp, images, out.report_file, risk)
    if isinstance(wandb_cfg, DictConfig):
        wandb_cfg = OmegaConf.to_container(wandb_cfg, resolve=True)  # type: ignore[assignment]
    run = start_wandb_run(wandb_cfg, out.path, job_type="compare", name="compare", group=group)
    if run is not None:
        log_to_wandb(run, comp, images)
    log.info("compared %d runs (%d missing/failed): %s", len(comp.rows), len(comp.failures), out.report_file)


def wandb_key(prefix: str, name: str, limit: int = 96) -> str:
    """``prefix/name`` short enough for wandb, which names a plot's table artifact after its key and
    refuses names over 128 characters (a sweep job's model name holds all its overrides): a long
    name keeps its start and a hash of the whole, so two models never share a key."""
    key = f"{prefix}/{name}"
    if len(key) <= limit:
        return key
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"{key[: limit - 9]}~{digest}"


def log_to_wandb(run: Any, comp: Comparison, images: list[Path]) -> None:
    """The results as a wandb.Table, the curves as wandb.plot.line_series, the plots as images."""
    import wandb  # only here: importing wandb takes seconds, and most comparisons log nowhere

    try:
        # wandb types a column by its first value: a blank is None, never ""
        data = [[None if r.get(c, "") == "" else r[c] for c in CSV_COLUMNS] for r in comp.rows]
        run.log({"results": wandb.Table(columns=CSV_COLUMNS, data=data)})
        for model in comp.models.values():
            series = sorted({(policy_label(r), r["cost_unit"]) for r in comp.rows if r["model"] == model.name})
            xs, ys, keys = [], [], []
            for policy, unit in series:
                pts = sorted(
                    (
                        r
                        for r in comp.rows
                        if (r["model"], policy_label(r), r["cost_unit"]) == (model.name, policy, unit)
                    ),
                    key=lambda r: r["test_avg_cost"],
                )
                xs.append([r["test_avg_cost"] for r in pts])
                ys.append([r["test_accuracy"] for r in pts])
                keys.append(f"{policy} [{unit}]")
            if keys:
                run.log(
                    {
                        wandb_key("accuracy_vs_cost", model.name): wandb.plot.line_series(
                            xs=xs,
                            ys=ys,
                            keys=keys,
                            title=f"{model.name}: test accuracy vs average cost",
                            xname="average cost",
                        )
                    }
                )
        header, rows = accuracy_table(comp)
        run.log({"accuracy_by_budget": wandb.Table(columns=header, data=rows)})
        header, rows = seed_table(comp)
        run.log({"seed_groups": wandb.Table(columns=header, data=rows)})
        run.log({p.stem: wandb.Image(str(p)) for p in images})
    finally:
        run.finish()
