"""The SLURM and local launcher presets compose against hydra-submitit-launcher's schema (a key it
does not know fails composition), so one override moves a sweep between a laptop and a cluster."""

import pytest
from hydra import compose, initialize_config_dir

from eenn.cli.common import conf_dir

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")


@pytest.mark.parametrize(
    ("app", "preset", "launcher", "gpus"),
    [
        ("train", "slurm_gpu", "SlurmLauncher", 1),
        ("fit", "slurm_cpu", "SlurmLauncher", 0),
        ("train", "slurm_cpu_train", "SlurmLauncher", 0),
        ("train", "slurm", "SlurmLauncher", None),
        ("fit", "local", "LocalLauncher", None),
    ],
)
def test_launcher_presets_compose(app, preset, launcher, gpus):
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose(
            config_name=app,
            overrides=[
                f"hydra/launcher={preset}",
                "hydra.launcher.partition=debug" if preset.startswith("slurm") else "hydra.launcher.cpus_per_task=1",
            ],
            return_hydra_config=True,
        )
    assert cfg.hydra.launcher._target_.endswith(launcher)
    assert cfg.hydra.launcher.get("gpus_per_node") == gpus
    if preset.startswith("slurm"):
        assert cfg.hydra.launcher.partition == "debug"
