"""Every dataset YAML names a registered source and declares its data's form, which the stand-in
of debug=smoke takes and which the real files hold, for the datasets at hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import requires_cifar10_small
from tests.contracts import checks

YAMLS = sorted(p.stem for p in (Path(checks.conf_dir()) / "data").glob("*.yaml") if p.stem != "base")


@pytest.mark.parametrize("option", YAMLS)
def test_data_yaml(option):
    checks.check_data_yaml(option)


@pytest.mark.parametrize("option", YAMLS)
def test_the_stand_in_has_the_declared_form(option):
    checks.check_the_stand_in_has_the_declared_form(option)


@pytest.mark.parametrize(
    "option", ["digits", "random", pytest.param("cifar10_small", marks=[pytest.mark.data, requires_cifar10_small])]
)
def test_the_declared_form_is_the_real_one(option):
    checks.check_the_declared_form_is_the_real_one(option)
