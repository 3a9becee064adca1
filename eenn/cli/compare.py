"""``eenn-compare``: compare exit policies across budgets from stage-2 sweep dirs."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from eenn.cli.common import conf_dir, quiet_environment, report_errors


@hydra.main(config_path=conf_dir(), config_name="compare", version_base="1.3")
@report_errors
def main(cfg: DictConfig) -> None:
    from eenn.evaluation.run_compare import compare

    quiet_environment()
    wandb_cfg = OmegaConf.to_container(cfg.wandb, resolve=True)
    enabled = wandb_cfg.pop("enabled")
    compare(list(cfg.sweeps), list(cfg.runs), cfg.paths.output_dir, wandb_cfg if enabled else None)


if __name__ == "__main__":
    main()
