"""``eenn-compare``: compare exit policies across budgets from stage-2 sweep dirs."""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from eenn.cli.common import cli, conf_dir, quiet_environment, report_errors


@hydra.main(config_path=conf_dir(), config_name="compare", version_base="1.3")
@report_errors
def app(cfg: DictConfig) -> None:
    from eenn.errors import check_flag
    from eenn.tasks.compare import compare  # after Hydra parsed the command line: --help stays fast

    quiet_environment()
    compare(
        _paths(cfg.sweeps),
        _paths(cfg.runs),
        cfg.paths.output_dir,
        cfg.wandb,
        force=check_flag(cfg.force, "force"),
        baseline=cfg.compare.baseline,
    )


def _paths(value: Any) -> list[str]:
    """A list of paths, or one path given without brackets (``sweeps=<dir>``)."""
    return [value] if isinstance(value, str) else list(value or [])


main = cli(app)

if __name__ == "__main__":
    main()
