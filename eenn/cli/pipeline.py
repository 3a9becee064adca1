"""``eenn-pipeline``: train, fit every policy over a budget sweep, compare — the main job."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from eenn.cli.common import conf_dir, quiet_environment, report_errors


@hydra.main(config_path=conf_dir(), config_name="pipeline", version_base="1.3")
@report_errors
def main(cfg: DictConfig) -> None:
    from eenn.tasks.pipeline import run_pipeline  # after Hydra parsed the command line: --help stays fast

    quiet_environment()
    run_pipeline(cfg)


if __name__ == "__main__":
    main()
