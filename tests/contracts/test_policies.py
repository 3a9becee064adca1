"""Every registered policy (each example of its hyper-parameters) keeps the policy contract."""

from __future__ import annotations

from pathlib import Path

import pytest

from eenn.policies import POLICIES
from tests.contracts import checks

CONF = Path(checks.conf_dir())
CASES = checks.policy_cases()


@pytest.mark.parametrize(("name", "example"), CASES)
def test_budget_is_held(name, example, val):
    checks.check_budget_is_held(name, example, val)


@pytest.mark.parametrize(("name", "example"), CASES)
def test_the_ceiling_beats_it(name, example, val):
    checks.check_the_ceiling_beats_it(name, example, val)


@pytest.mark.parametrize(("name", "example"), CASES)
def test_simulation_equals_a_naive_loop(name, example, val):
    checks.check_simulation_equals_a_naive_loop(name, example, val)


@pytest.mark.parametrize(("name", "example"), CASES)
def test_save_load_round_trip(name, example, val, test_preds, tmp_path):
    checks.check_save_load_round_trip(name, example, val, test_preds, tmp_path)


@pytest.mark.parametrize(("name", "example"), CASES)
def test_the_engine_agrees_with_simulation(name, example, val, test_preds):
    checks.check_the_engine_agrees_with_simulation(name, example, val, test_preds)


@pytest.mark.parametrize(("name", "example"), CASES)
def test_traits(name, example, val):
    checks.check_traits(name, example, val)


@pytest.mark.parametrize("name", POLICIES.names())
def test_policy_yaml(name):
    checks.check_policy_yaml(name)


def test_every_policy_yaml_names_a_registered_policy():
    assert sorted(p.stem for p in (CONF / "policy").glob("*.yaml")) == POLICIES.names()
