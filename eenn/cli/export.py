"""``eenn-export``: a stage-1 run's network and a fitted policy as a deployment bundle (per-segment
ONNX graphs, the policy, a checked manifest) that runs without PyTorch.

    eenn-export policy_dir=<eenn-fit run dir>
    eenn-export run_dir=<stage-1 run dir> policy_file=<policy file> baseline=false
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from eenn.cli.common import cli, conf_dir, report_errors


@hydra.main(config_path=conf_dir(), config_name="export", version_base="1.3")
@report_errors
def app(cfg: DictConfig) -> None:
    from eenn.tasks.export import export  # after Hydra parsed the command line: --help stays fast

    export(cfg, cfg.paths.output_dir)


main = cli(app)

if __name__ == "__main__":
    main()
