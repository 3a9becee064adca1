"""``eenn-fit``: stage 2, fit an exit policy to a budget on a stage-1 run's predictions.

    eenn-fit run_dir=<stage-1 run dir> policy=eenet budget.fraction=0.6
    eenn-fit -m run_dir=<...> policy=maxprob,entropy budget=sweep5

Each fit is also a wandb run (``wandb.*`` in conf/fit.yaml; offline without credentials): group =
the stage-1 run's name, job_type = the policy, files in the fit's run dir under ``wandb/``.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from eenn.cli.common import cli, conf_dir, quiet_environment, report_errors


@hydra.main(config_path=conf_dir(), config_name="fit", version_base="1.3")
@report_errors
def app(cfg: DictConfig) -> None:
    from eenn.tasks.fit import fit_run  # after Hydra parsed the command line: --help stays fast

    quiet_environment()
    fit_run(cfg, cfg.paths.output_dir)


main = cli(app)

if __name__ == "__main__":
    main()
