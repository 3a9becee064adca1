"""``eenn-compare``: compare exit policies across budgets from stage-2 sweep dirs."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from eenn.cli.common import conf_dir, quiet_environment, report_errors


@hydra.main(config_path=conf_dir(), config_name="compare", version_base="1.3")
@report_errors
def main(cfg: DictConfig) -> None:
    from eenn.tasks.compare import compare  # after Hydra parsed the command line: --help stays fast

    quiet_environment()
    compare(list(cfg.sweeps), list(cfg.runs), cfg.paths.output_dir, cfg.wandb)


if __name__ == "__main__":
    main()
