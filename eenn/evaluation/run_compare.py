"""``eenn-compare`` as one function: sweep dirs in; results.csv, plots and report.html out."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from eenn.evaluation.compare import Comparison, collect, write_csv
from eenn.evaluation.plots import plot_accuracy_vs_cost, plot_confusions, plot_exit_distributions
from eenn.evaluation.report import accuracy_table, write_report

log = logging.getLogger("eenn.compare")


def compare(sweeps: list[str], runs: list[str], out_dir: str | Path, wandb_cfg: dict[str, Any] | None = None) -> Comparison:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    comp = collect(sweeps, runs)
    for f in comp.failures:
        log.warning("missing or failed run %s: %s", f["run"], f["reason"])
    write_csv(comp, out_dir / "results.csv")
    images = plot_accuracy_vs_cost(comp, out_dir)
    dist = plot_exit_distributions(comp, out_dir)
    images += [dist] if dist else []
    images += [plot_confusions(comp, m, out_dir) for m in comp.models.values()]
    report = write_report(comp, images, out_dir / "report.html")
    if wandb_cfg is not None:
        log_to_wandb(comp, wandb_cfg, images)
    log.info("compared %d runs (%d missing/failed): %s", len(comp.rows), len(comp.failures), report)
    return comp


def log_to_wandb(comp: Comparison, wandb_cfg: dict[str, Any], images: list[Path]) -> None:
    """The results as a wandb.Table, the curves as wandb.plot.line_series, the plots as images."""
    import wandb

    from eenn.utils.loggers import init_wandb_run

    # the same keys as eenn-fit's wandb section (project, mode, ...): fits and comparisons share a project
    run = init_wandb_run(job_type="compare", key="wandb.mode", **wandb_cfg)
    try:
        columns = list(comp.rows[0]) if comp.rows else []
        run.log({"results": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in comp.rows])})
        for model in comp.models.values():
            series = sorted({(r["policy"], r["cost_unit"]) for r in comp.rows if r["model"] == model.name})
            xs, ys, keys = [], [], []
            for policy, unit in series:
                pts = sorted((r for r in comp.rows if (r["model"], r["policy"], r["cost_unit"]) == (model.name, policy, unit)),
                             key=lambda r: r["test_avg_cost"])
                xs.append([r["test_avg_cost"] for r in pts])
                ys.append([r["test_accuracy"] for r in pts])
                keys.append(f"{policy} [{unit}]")
            if keys:
                run.log({f"accuracy_vs_cost/{model.name}": wandb.plot.line_series(
                    xs=xs, ys=ys, keys=keys, title=f"{model.name}: test accuracy vs average cost", xname="average cost")})
        header, rows = accuracy_table(comp)
        run.log({"accuracy_by_budget": wandb.Table(columns=header, data=rows)})
        run.log({p.stem: wandb.Image(str(p)) for p in images})
    finally:
        run.finish()
