"""``eenn-infer``: run a stage-1 network with a fitted exit policy, skipping layers for real.

eenn-infer policy_dir=<eenn-fit run dir>
eenn-infer run_dir=<stage-1 run dir> policy_file=<policy file> mode=rebatch
eenn-infer -m policy_dir=<a>,<b> batch_size=1,128
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from eenn.cli.common import cli, conf_dir, quiet_environment, report_errors


@hydra.main(config_path=conf_dir(), config_name="infer", version_base="1.3")
@report_errors
def app(cfg: DictConfig) -> None:
    from eenn.tasks.infer import infer  # after Hydra parsed the command line: --help stays fast

    quiet_environment()
    infer(cfg, cfg.paths.output_dir)


main = cli(app)

if __name__ == "__main__":
    main()
