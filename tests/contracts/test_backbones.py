"""Every registered backbone family keeps the backbone contract, and every backbone YAML names one."""

from __future__ import annotations

from pathlib import Path

import pytest

from eenn.models.backbones import BACKBONES
from tests.contracts import checks

YAMLS = sorted(p.stem for p in (Path(checks.conf_dir()) / "backbone").glob("*.yaml"))


@pytest.mark.parametrize("name", BACKBONES.names())
def test_backbone(name):
    checks.check_backbone(name)


@pytest.mark.parametrize("option", YAMLS)
def test_backbone_yaml(option):
    checks.check_backbone_yaml(option)


def test_every_family_has_a_yaml():
    families = {checks.compose_app("train", [f"backbone={o}"]).backbone.name for o in YAMLS}
    assert families == set(BACKBONES.names())
