"""The contracts every registered part keeps, written once as functions: tests/contracts
parametrizes them over the registries and the config folders, and the README guide's test runs
them on its toy parts. So a new policy or backbone is tested by adding its module and its YAML,
and a dataset by adding its YAML, nothing else."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from eenn.cli.common import conf_dir
from eenn.cost import profile_costs
from eenn.data import EENNDataModule
from eenn.data.sources import SOURCES
from eenn.errors import EENNError, is_number
from eenn.evaluation.offline import evaluate
from eenn.inference.engine import EarlyExitEngine, batches_of
from eenn.models import build_multi_exit
from eenn.models.backbones import BACKBONES
from eenn.models.multi_exit import MultiExitNetwork
from eenn.policies import POLICIES, ExitPolicy, budget_ceiling, build_policy, policy_class
from eenn.policies.simulate import simulate
from eenn.predictions import Predictions
from eenn.tasks.build import instantiate
from tests.policies.helpers import naive_simulate

FRACTIONS = (0.4, 0.55, 0.7, 0.85, 1.0)
SHAPE = (3, 32, 32)  # the images a backbone's example must take


def policy_cases() -> list:
    """(name, hyper-parameters) for every registered policy and each of its examples."""
    return [
        pytest.param(name, example, id="-".join([name, *(f"{k}={v}" for k, v in example.items())]))
        for name in POLICIES.names()
        for example in policy_class(name).examples
    ]


_FITTED: dict[tuple, ExitPolicy] = {}


def fitted(name: str, example: dict, val: Predictions, fraction: float) -> ExitPolicy:
    """``name`` fitted to ``fraction`` of the full cost (at least its cheapest), or without a
    budget if it takes none; cached: fitting EENet takes a while and deciding never changes a policy."""
    key = (name, repr(example), id(val), fraction)
    if key not in _FITTED:
        policy = build_policy(name, **example)
        budget = max(fraction * float(val.costs[-1]), policy.cheapest_cost(val, "flops")) if policy.budgeted else None
        _FITTED[key] = policy.fit(val, budget, "flops")
    return _FITTED[key]


# ------------------------------------------------------------------------------- policies
def check_budget_is_held(name: str, example: dict, val: Predictions) -> None:
    """A budgeted policy's realised validation cost is within the budget it was fitted to."""
    if not policy_class(name).budgeted:
        assert fitted(name, example, val, 1.0).info["fitted_to_budget"] is False
        return
    for fraction in FRACTIONS:
        policy = fitted(name, example, val, fraction)
        S = evaluate(policy, val, "flops")
        assert S["avg_cost"] <= policy.budget * (1 + 1e-9), (name, fraction)
        assert sum(S["exit_fractions"]) == pytest.approx(1.0)
        assert policy.info["fitted_to_budget"] is True


def check_the_ceiling_beats_it(name: str, example: dict, val: Predictions) -> None:
    """No budgeted policy is more accurate than the budget ceiling at the same average cost."""
    if not policy_class(name).budgeted:
        return
    for fraction in (0.55, 0.85):
        S = evaluate(fitted(name, example, val, fraction), val, "flops")
        best = evaluate(build_policy(budget_ceiling()).fit(val, S["avg_cost"], "flops"), val, "flops")
        assert best["accuracy"] >= S["accuracy"], (name, fraction)
        assert best["avg_cost"] <= S["avg_cost"] * (1 + 1e-9)


def check_simulation_equals_a_naive_loop(name: str, example: dict, val: Predictions) -> None:
    """The compacting offline simulation decides as a sample-by-sample loop does."""
    policy = fitted(name, example, val, 0.7)
    sub = slice(0, 300)
    got = simulate(policy, val.logits[sub], val.labels[sub])
    want = naive_simulate(policy, val.logits[sub], val.labels[sub])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def check_save_load_round_trip(name: str, example: dict, val: Predictions, test: Predictions, tmp_path: Path) -> None:
    """A saved and loaded policy is the same class, fitted alike, and decides identically."""
    policy = fitted(name, example, val, 0.7)
    path = policy.save(tmp_path / f"{name}.safetensors")
    loaded = ExitPolicy.load(path).to("cpu")
    assert type(loaded) is type(policy)
    assert (loaded.num_exits, loaded.num_classes, loaded.budget) == (
        policy.num_exits,
        policy.num_classes,
        policy.budget,
    )
    for a, b in zip(simulate(policy, test.logits, test.labels), simulate(loaded, test.logits, test.labels)):
        assert torch.equal(a, b)
    assert evaluate(loaded, test, "flops") == evaluate(policy, test, "flops")
    assert path.stat().st_size < 64_000


class _Pick(nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.k]


def replay_network(num_exits: int) -> MultiExitNetwork:
    """A network whose input is saved logits (N, K, C): its stages pass them on, head k reads
    exit k's. The engine run on it meets exactly the logits offline simulation reads."""
    return MultiExitNetwork(
        [nn.Identity() for _ in range(num_exits)],
        [_Pick(k) for k in range(num_exits)],
        [f"exit{k}" for k in range(num_exits)],
    )


def check_the_engine_agrees_with_simulation(name: str, example: dict, val: Predictions, test: Predictions) -> None:
    """An online policy takes, in the engine, the exits offline simulation takes; one that reads
    the labels is refused by the engine."""
    policy = fitted(name, example, val, 0.7)
    network = replay_network(test.num_exits)
    if not policy.online:
        with pytest.raises(EENNError):
            EarlyExitEngine(network, policy)
        with pytest.raises(EENNError):
            policy.init_state(4)
        return
    out = EarlyExitEngine(network, policy, device="cpu").run(batches_of(test.logits, 64))
    exit_idx, heads = simulate(policy, test.logits)
    assert torch.equal(out.exit_index, exit_idx) and torch.equal(out.heads_evaluated, heads)


def check_traits(name: str, example: dict, val: Predictions) -> None:
    """What the class says it is, it is: its hyper-parameters rebuild it, a per-exit policy
    answers at the exit it is given, a policy with a p_d curve takes p_d."""
    cls = policy_class(name)
    policy = build_policy(name, **example)
    assert build_policy(name, **policy.hparams()).hparams() == policy.hparams()
    if cls.per_exit_only:
        assert "exit" in inspect.signature(cls).parameters
        for k in range(val.num_exits):
            at_k = build_policy(name, **{**example, "exit": k}).fit(val, None, "flops")
            assert evaluate(at_k, val, "flops")["exit_fractions"][k] == 1.0
    if cls.has_p_d_curve:
        assert "p_d" in policy.hparams()


def compose_app(app: str, overrides: Sequence[str], search_path: Path | None = None):
    """An app's config composed from conf/ (and ``search_path``, a folder of further configs)."""
    extra = [f"hydra.searchpath=[file://{search_path}]"] if search_path else []
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return compose(config_name=app, overrides=[*overrides, *extra])


def check_policy_yaml(name: str, search_path: Path | None = None) -> None:
    """conf/policy/<name>.yaml selects the policy and builds it."""
    cfg = compose_app("fit", [f"policy={name}"], search_path)
    assert cfg.policy.name == name
    build_policy(**cfg.policy)


# ------------------------------------------------------------------------------ backbones
def check_backbone(name: str) -> None:
    """The registered example builds, cut into units whose blocks and stages it names in order;
    as a multi-exit network it runs whole and stage by stage alike, its last exit is the plain
    backbone, and its costs grow with the exit."""
    kwargs = BACKBONES.example(name)
    parts = BACKBONES.build(name, num_classes=5, in_chans=SHAPE[0], **kwargs)
    units = [n for n, _ in parts.units]
    assert parts.blocks and all(b in units for b in parts.blocks)
    assert [units.index(b) for b in parts.blocks] == sorted(units.index(b) for b in parts.blocks)
    assert set(parts.stages.values()) <= set(parts.blocks)
    torch.manual_seed(0)
    net = build_multi_exit({"name": name, **kwargs}, {"at": [1], "head": {"name": "linear"}}, 5, SHAPE).eval()
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        full = net(x)
        staged = torch.stack([logits for _, logits, _ in net.iter_exits(x)], 1)
        plain = net.forward_backbone(x)
    assert full.shape == (2, 2, 5)
    torch.testing.assert_close(staged, full)
    torch.testing.assert_close(plain, full[:, -1])
    flops = profile_costs(net, SHAPE, latency=False).per_exit("flops")
    assert flops == sorted(flops)


def check_backbone_yaml(option: str, search_path: Path | None = None) -> None:
    """A backbone YAML (conf/backbone/<option>.yaml) names a registered family and only arguments
    its factory takes."""
    cfg = compose_app("train", [f"backbone={option}"], search_path)
    family = cfg.backbone.name
    assert family in BACKBONES, option
    params = inspect.signature(BACKBONES.get(family)).parameters
    assert set(cfg.backbone) - {"name"} <= set(params), option


# ------------------------------------------------------------------------------- datasets
def check_data_yaml(option: str, overrides: Sequence[str] = (), search_path: Path | None = None) -> None:
    """A dataset YAML (conf/data/<option>.yaml) names a registered source and declares the form
    of its data (data.meta): an image shape [C, H, W] and a class count, each or left open."""
    data = compose_app("train", [f"data={option}", *overrides], search_path).data
    assert data.name in SOURCES, option
    shape, classes = data.meta.input_shape, data.meta.num_classes
    assert shape is None or (len(shape) == 3 and all(is_number(d, integer=True) and d > 0 for d in shape)), option
    assert classes is None or (is_number(classes, integer=True) and classes > 1), option


def datamodule(option: str, overrides: Sequence[str] = (), search_path: Path | None = None) -> EENNDataModule:
    """The data module a dataset YAML builds (set up), with ``overrides``."""
    dm = instantiate(compose_app("train", [f"data={option}", *overrides], search_path).data, _convert_="all")
    dm.setup("fit")
    return dm


def check_the_stand_in_has_the_declared_form(
    option: str, overrides: Sequence[str] = (), search_path: Path | None = None
) -> None:
    """debug=smoke puts random images of the declared form in the dataset's place."""
    dm = datamodule(option, ["debug=smoke", *overrides], search_path)
    x, y = next(iter(dm.train_dataloader()))
    shape, classes = dm.meta["input_shape"], dm.meta["num_classes"]
    assert dm.name == "random"
    assert shape is None or tuple(x.shape[1:]) == tuple(shape)
    assert classes is None or dm.num_classes == classes


def check_the_declared_form_is_the_real_one(
    option: str, overrides: Sequence[str] = (), search_path: Path | None = None
) -> None:
    """The dataset's own files hold what its YAML declares (for a dataset at hand)."""
    dm = datamodule(option, overrides, search_path)
    x, _ = next(iter(dm.split_loader("val")))
    assert tuple(x.shape[1:]) == tuple(dm.meta["input_shape"]) == tuple(dm.input_shape)
    assert dm.num_classes == dm.meta["num_classes"]
