"""``eenn-train``: stage 1, train a multi-exit network and write its run dir."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from eenn.cli.common import cli, conf_dir, quiet_environment, report_errors


@hydra.main(config_path=conf_dir(), config_name="train", version_base="1.3")
@report_errors
def app(cfg: DictConfig) -> None:
    from eenn.tasks.train import train  # after Hydra parsed the command line: --help stays fast

    quiet_environment()
    train(cfg)


main = cli(app)

if __name__ == "__main__":
    main()
