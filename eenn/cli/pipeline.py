"""``eenn-pipeline``: train, fit every policy over a budget sweep, compare — the main job."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from eenn.cli.common import cli, conf_dir, quiet_environment, report_errors


@hydra.main(config_path=conf_dir(), config_name="pipeline", version_base="1.3")
@report_errors
def app(cfg: DictConfig) -> None:
    from eenn.rundir import ERROR_FILE
    from eenn.tasks.pipeline import run_pipeline  # after Hydra parsed the command line: --help stays fast

    quiet_environment()
    comp = run_pipeline(cfg)
    if comp.failures:  # as eenn-fit -m ends when jobs of its sweep failed
        names = ", ".join(sorted(Path(f["run"]).name for f in comp.failures))
        print(
            f"error: {len(comp.failures)} fit(s) of the pipeline failed: {names} (see their {ERROR_FILE}).",
            file=sys.stderr,
        )
        sys.exit(1)


main = cli(app)

if __name__ == "__main__":
    main()
