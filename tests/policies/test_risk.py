"""policy=risk (Learn then Test) and per-exit temperature scaling: the p-value's validity, the
fixed-sequence rule, refusal, budgets, calibration and the calibrate=true fits. What every policy
shares (round trip through policy.safetensors, engine = simulation) is in tests/contracts."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from eenn.errors import EENNError
from eenn.evaluation.calibration import expected_calibration_error, fit_temperatures, temperature_split
from eenn.evaluation.offline import evaluate
from eenn.inference.engine import EarlyExitEngine, batches_of
from eenn.policies import ExitPolicy, build_policy
from eenn.policies.risk import (
    binomial_pvalues,
    candidate_exits,
    candidate_grid,
    exit_losses,
    fixed_sequence,
    min_calibration_size,
)
from eenn.policies.simulate import simulate
from eenn.policies.synthetic import synthetic_predictions
from eenn.predictions import Predictions
from eenn.tasks.fit import fit_run
from tests.contracts.checks import replay_network

from .helpers import EENET_FAST
from .test_fit_cli import fit_cfg

DRAWS = 4000


def _mc_error(p: float, draws: int) -> float:
    """Three standard errors of a rate p estimated from ``draws`` Bernoulli draws."""
    return 3 * math.sqrt(p * (1 - p) / draws)


@pytest.mark.parametrize(("n", "epsilon", "delta"), [(200, 0.05, 0.1), (1000, 0.01, 0.1), (500, 0.1, 0.05)])
def test_the_binomial_p_value_is_valid_at_the_null_boundary(n: int, epsilon: float, delta: float) -> None:
    # H0: risk > ε is hardest at risk = ε: there P(p <= δ) must stay <= δ
    gen = torch.Generator().manual_seed(0)
    losses = (torch.rand(DRAWS, n, generator=gen) < epsilon).sum(1)
    rate = float((binomial_pvalues(losses, n, epsilon) <= delta).double().mean())
    assert rate <= delta + _mc_error(delta, DRAWS)
    assert rate > delta / 3  # and not vacuous: the binomial tail is nearly exact


def test_learn_then_test_controls_the_family_wise_error_on_known_risks() -> None:
    # candidates whose true risks rise through ε: a violation is certifying any candidate with risk > ε
    n, epsilon, delta = 400, 0.05, 0.1
    risks = torch.tensor([0.0, 0.01, 0.02, 0.03, 0.04, 0.045, 0.05, 0.052, 0.06, 0.08, 0.1])
    gen = torch.Generator().manual_seed(1)
    sums = (torch.rand(DRAWS, n, len(risks), generator=gen) < risks).sum(1)  # (draws, M)
    rejected = fixed_sequence(binomial_pvalues(sums, n, epsilon), delta)  # how many certified, per draw
    first_bad = int((risks > epsilon).nonzero()[0])
    violation = float((rejected > first_bad).double().mean())
    assert violation <= delta + _mc_error(delta, DRAWS)
    assert float((rejected >= 4).double().mean()) > 0.5  # and it certifies the safe ones


def test_fixed_sequence_testing_stops_at_the_first_non_rejection() -> None:
    p = torch.tensor([[0.01, 0.05, 0.2, 0.001, 0.001], [0.5, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.1]])
    assert fixed_sequence(p, 0.1).tolist() == [2, 0, 5]


def _case(max_probs: list[list[float]], preds: list[list[int]], labels: list[int]) -> Predictions:
    """Two-class predictions with the given max probability and prediction per sample and exit."""
    p = torch.tensor(max_probs, dtype=torch.float64)
    margin = torch.log(p / (1 - p))
    logits = torch.zeros(*p.shape, 2)
    logits.scatter_(2, torch.tensor(preds)[..., None], margin[..., None].float())
    val = Predictions(
        logits=logits, labels=torch.tensor(labels), costs=torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    )
    val.validate()
    return val


def test_the_policy_stops_at_the_first_failure_though_later_candidates_would_pass() -> None:
    # 300 samples confident and right everywhere; 30 whose exit 1 is wrong at max p 0.9 while
    # exits 0 (max p 0.55) and 2 are right. Thresholds in (0.55, 0.9] send those 30 out at exit 1:
    # a drop of 30/330 > ε, not certified. Thresholds <= 0.55 let them out, right, at exit 0 (no
    # loss, a tiny p-value), but fixed-sequence testing stopped before them.
    n_safe, n_bad = 300, 30
    val = _case(
        [[0.999, 0.999, 0.999]] * n_safe + [[0.55, 0.9, 0.99]] * n_bad,
        [[0, 0, 0]] * n_safe + [[0, 1, 0]] * n_bad,
        [0] * (n_safe + n_bad),
    )
    policy = build_policy("risk", epsilon=0.05, delta=0.1).fit(val, None, "flops")
    grid = candidate_grid(policy.candidates)
    assert policy.info["certified_candidates"] == int((grid > 0.9).sum())
    exits = candidate_exits(build_policy("maxprob").score_matrix(val.logits), grid)
    losses = exit_losses(val.logits, val.labels, "drop").gather(1, exits).sum(0)
    assert float(binomial_pvalues(losses[-1:], n_safe + n_bad, 0.05)[0]) < 1e-6  # λ = 0 alone would pass
    assert policy.info["certified"] and policy.info["threshold"] > 0.9 and policy.info["calibration_risk"] == 0.0
    S = evaluate(policy, val, "flops")
    assert S["exit_fractions"] == pytest.approx([n_safe / (n_safe + n_bad), 0.0, n_bad / (n_safe + n_bad)])
    assert S["risk"]["drop"] == 0.0 and policy.info["calibration_size"] == n_safe + n_bad


def test_candidate_exits_equal_the_simulated_policy(val: Predictions) -> None:
    scores = build_policy("maxprob").score_matrix(val.logits)
    grid = candidate_grid(30)
    exits = candidate_exits(scores, grid)
    for j in (0, 10, 20, 29):
        policy = build_policy("maxprob", thresholds=[float(grid[j])] * 2).fit(val, None, "flops")
        assert torch.equal(simulate(policy, val.logits)[0], exits[:, j])


def test_losses_against_the_final_exit() -> None:
    val = _case([[0.9, 0.9, 0.9]] * 3, [[1, 0, 0], [0, 1, 1], [1, 1, 0]], [0, 0, 1])
    drop, disagree = exit_losses(val.logits, val.labels, "drop"), exit_losses(val.logits, None, "disagreement")
    assert drop.tolist() == [[True, False, False], [False, False, False], [False, False, False]]
    assert disagree.tolist() == [[True, False, False], [True, False, False], [True, True, False]]
    with pytest.raises(EENNError, match="risk.loss='drop' needs labels"):
        exit_losses(val.logits, None, "drop")


def test_a_calibration_set_too_small_gives_the_final_exit_and_a_warning() -> None:
    small = synthetic_predictions(100, seed=0)
    assert min_calibration_size(0.01, 0.1) == 230 > 100
    with pytest.warns(
        UserWarning,
        match=r"no candidate is certified at risk.epsilon=0.01 .* on 100 calibration "
        r"samples \(even with no loss observed it takes at least 230\); every sample "
        r"answers at the final exit",
    ):
        policy = build_policy("risk", epsilon=0.01).fit(small, None, "flops")
    assert evaluate(policy, small, "flops")["exit_fractions"] == [0.0, 0.0, 1.0]
    assert policy.info["certified"] is False and policy.info["warnings"]
    # with a budget below the full cost nothing meets both: refused by name
    with pytest.raises(EENNError, match="final exit exceeds the budget"):
        build_policy("risk", epsilon=0.01).fit(small, 0.9 * float(small.costs[-1]), "flops")


def test_a_budget_is_a_ceiling_on_the_cheapest_certified_candidate(val: Predictions) -> None:
    free = build_policy("risk", epsilon=0.05).fit(val, None, "flops")
    cost = free.info["val_cost"]
    within = build_policy("risk", epsilon=0.05).fit(val, cost * 1.01, "flops")
    assert within.info["candidate"] == free.info["candidate"] and within.info["fitted_to_budget"]
    with pytest.raises(EENNError, match=r"risk.epsilon=0.05 is within the budget .* the cheapest costs"):
        build_policy("risk", epsilon=0.05).fit(val, cost * 0.95, "flops")


def test_a_larger_epsilon_never_costs_more(val: Predictions) -> None:
    costs = [build_policy("risk", epsilon=e).fit(val, None, "flops").info["val_cost"] for e in (0.01, 0.02, 0.05, 0.1)]
    assert costs == sorted(costs, reverse=True) and costs[0] > costs[-1]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"epsilon": 0.0}, "risk.epsilon must be a number in"),
        ({"delta": 1.5}, "risk.delta must be"),
        ({"loss": "mse"}, "risk.loss must be one of"),
        ({"candidates": 1}, "risk.candidates must be"),
        ({"certify": "yes"}, "risk.certify must be"),
    ],
)
def test_bad_risk_settings_are_named(kw: dict, match: str) -> None:
    with pytest.raises(EENNError, match=match):
        build_policy("risk", **kw)


def _overconfident(n: int, seed: int) -> Predictions:
    """Synthetic predictions with logits scaled up 10x: the same answers, far too sure of them."""
    p = synthetic_predictions(n, seed=seed)
    return p.scaled(torch.full((p.num_exits,), 0.1))


def test_temperature_scaling_lowers_the_ece_of_overconfident_exits() -> None:
    val, test = _overconfident(1500, 0), _overconfident(2000, 1)
    T = fit_temperatures(val)
    assert (T > 1).all()  # it cools every exit down
    for k in range(val.num_exits):
        before = expected_calibration_error(test.logits[:, k], test.labels)
        after = expected_calibration_error(test.logits[:, k] / T[k], test.labels)
        assert after < 0.5 * before, k  # measured on test: 0.35 -> 0.04, 0.13 -> 0.03, 0.03 -> 0.01
    assert torch.equal(test.scaled(T).logits.argmax(-1), test.logits.argmax(-1))  # predictions unchanged


@pytest.mark.parametrize("name", ["maxprob", "eenet", "risk"])
def test_a_calibrated_policy_decides_on_scaled_logits_and_keeps_them_in_its_file(name: str, tmp_path: Path) -> None:
    val, test = _overconfident(1500, 0), _overconfident(800, 1)
    T = fit_temperatures(val)
    kw = {**(EENET_FAST if name == "eenet" else {}), **({"epsilon": 0.05} if name == "risk" else {})}
    budget = 0.7 * float(val.costs[-1])
    calibrated = build_policy(name, **kw).fit(val, budget, "flops", temperature=T)
    # the same decisions as the policy fitted on (and deciding on) logits scaled by hand
    by_hand = build_policy(name, **kw).fit(val.scaled(T), budget, "flops")
    assert torch.equal(simulate(calibrated, test.logits)[0], simulate(by_hand, test.scaled(T).logits)[0])
    loaded = ExitPolicy.load(calibrated.save(tmp_path / "p.safetensors"))
    assert torch.equal(loaded.temperature, T)
    exits = simulate(loaded, test.logits)
    assert torch.equal(exits[0], simulate(calibrated, test.logits)[0])
    out = EarlyExitEngine(replay_network(test.num_exits), loaded, device="cpu").run(batches_of(test.logits, 64))
    assert torch.equal(out.exit_index, exits[0]) and torch.equal(out.heads_evaluated, exits[1])


def test_bad_temperatures_are_refused(val: Predictions) -> None:
    with pytest.raises(EENNError, match="temperature must hold 3 positive values"):
        build_policy("maxprob").fit(val, 0.7e6, "flops", temperature=torch.tensor([1.0, -1.0, 1.0]))


@pytest.mark.parametrize("policy", ["maxprob", "eenet", "risk"])
def test_fit_app_calibrate_writes_ece_before_and_after(policy: str, run_dir: Path, tmp_path: Path) -> None:
    extra = [f"policy.{k}={v}" for k, v in EENET_FAST.items()] if policy == "eenet" else []
    cfg = fit_cfg(
        [f"run_dir={run_dir}", f"policy={policy}", "calibrate=true", "risk.epsilon=0.1", "budget.fraction=1.0", *extra]
    )
    metrics = fit_run(cfg, tmp_path / "fit")
    cal = json.loads((tmp_path / "fit" / "metrics.json").read_text())["calibration"]
    assert cal == json.loads(json.dumps(metrics["calibration"]))
    assert len(cal["temperatures"]) == 3 and all(t > 0 for t in cal["temperatures"])
    for split in ("val", "test"):
        assert len(cal[split]["ece_before"]) == len(cal[split]["ece_after"]) == 3
        assert sum(cal[split]["ece_after"]) < sum(cal[split]["ece_before"])
    loaded = ExitPolicy.load(tmp_path / "fit" / "policy.safetensors")
    assert loaded.temperature.tolist() == pytest.approx(cal["temperatures"])
    assert "risk" in metrics["test"] and set(metrics["test"]["risk"]) == {"drop", "disagreement"}


def test_fit_app_risk_records_its_certificate(run_dir: Path, tmp_path: Path) -> None:
    cfg = fit_cfg(
        [f"run_dir={run_dir}", "policy=risk", "risk.epsilon=0.05", "risk.loss=disagreement", "budget.fraction=1.0"]
    )
    fitted = fit_run(cfg, tmp_path / "fit")["fitted"]
    assert (fitted["epsilon"], fitted["delta"], fitted["loss"]) == (0.05, 0.1, "disagreement")
    assert fitted["certified"] and fitted["risk_bound"] == 0.05 and fitted["calibration_size"] == 600
    assert fitted["calibration_risk"] <= 0.05 and 0 < fitted["threshold"] < 1
    loaded = ExitPolicy.load(tmp_path / "fit" / "policy.safetensors")
    assert loaded.info["threshold"] == fitted["threshold"] and loaded.hparams()["loss"] == "disagreement"


def test_fit_app_risk_refusal_is_a_warning_in_metrics(run_dir: Path, tmp_path: Path) -> None:
    cfg = fit_cfg([f"run_dir={run_dir}", "policy=risk", "risk.epsilon=0.001", "budget.fraction=1.0"])
    with pytest.warns(UserWarning, match="no candidate is certified"):
        metrics = fit_run(cfg, tmp_path / "fit")
    assert any("every sample answers at the final exit" in w for w in metrics["warnings"])
    assert metrics["val"]["exit_fractions"] == [0.0, 0.0, 1.0]


def _equally_good_early_exits(n: int, early: int, error: float, seed: int) -> Predictions:
    """A pool where each of ``early`` early exits is wrong on exactly ``error`` of the samples
    (independently placed) with one same-shaped logit vector, and the final exit is always right.
    Unscaled, every early exit has the same max probability, so the shared-threshold rules are
    "all at the final exit" or "all at exit 0". Temperatures fitted by NLL set exit k's max
    probability to its accuracy on the data they are fitted on, so they order the exits by it."""
    gen = torch.Generator().manual_seed(seed)
    classes = 10
    wrong = torch.zeros(n, early, dtype=torch.bool)
    for k in range(early):
        wrong[torch.randperm(n, generator=gen)[: round(error * n)], k] = True
    pred = torch.where(wrong, torch.randint(1, classes, (n, early), generator=gen), 0)
    logits = torch.zeros(n, early + 1, classes)
    logits[:, :early].scatter_(2, pred[..., None], 2.0)
    logits[:, early, 0] = 8.0
    return Predictions(
        logits=logits, labels=torch.zeros(n, dtype=torch.int64), costs=torch.arange(1.0, early + 2, dtype=torch.float64)
    )


def test_temperatures_fitted_on_the_calibration_data_void_the_guarantee_and_the_split_keeps_it() -> None:
    # every early exit's true (pool) drop risk is 0.102 > ε = 0.1: certifying any of them violates.
    # Fitted on the calibration draw, the temperatures rank the six exits by their luck on it, and
    # Learn then Test tests the luckiest first: the best of six tries, not one. Fitted on a
    # separate part (as eenn-fit does for policy=risk), they fix the order before the test sees
    # its data. A violation is the chosen rule's risk on the whole pool above ε.
    from scipy.stats import binom

    pool, eps, delta, draws, n = _equally_good_early_exits(3000, 6, 0.102, seed=0), 0.1, 0.1, 150, 600
    gen = torch.Generator().manual_seed(1)
    violations = {"leak": 0, "split": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a refusal warns; here it is an outcome like any other
        for d in range(draws):
            cal = pool.select(torch.randint(0, pool.num_samples, (n,), generator=gen))
            leaky = build_policy("risk", epsilon=eps, delta=delta).fit(
                cal, None, "flops", temperature=fit_temperatures(cal)
            )
            temp_part, cal_part, _ = temperature_split(cal, 0.5, seed=d)
            split = build_policy("risk", epsilon=eps, delta=delta).fit(
                cal_part, None, "flops", temperature=fit_temperatures(temp_part)
            )
            violations["leak"] += evaluate(leaky, pool, "flops")["risk"]["drop"] > eps
            violations["split"] += evaluate(split, pool, "flops")["risk"]["drop"] > eps
    # P(a rate >= the observed one | the true rate is δ): tiny for the leak, unremarkable for the split
    assert binom.sf(violations["leak"] - 1, draws, delta) < 1e-4, violations  # measured: 42 of 150
    assert binom.sf(violations["split"] - 1, draws, delta) > 0.05, violations  # measured: 9 of 150


def test_fit_app_calibrated_risk_fits_its_temperatures_on_a_part_of_validation_of_their_own(
    run_dir: Path, tmp_path: Path
) -> None:
    cfg = fit_cfg(
        [
            f"run_dir={run_dir}",
            "policy=risk",
            "calibrate=true",
            "calibrate_split=0.25",
            "calibrate_seed=3",
            "risk.epsilon=0.1",
            "budget.fraction=1.0",
        ]
    )
    metrics = fit_run(cfg, tmp_path / "fit")
    split = metrics["calibration"]["split"]
    assert split == {"temperature_fraction": 0.25, "seed": 3, "temperature_samples": 150, "calibration_samples": 450}
    assert metrics["fitted"]["calibration_size"] == 450
    val = Predictions.load(run_dir / "predictions" / "val.safetensors")
    temp_part, cal_part, _ = temperature_split(val, 0.25, seed=3)
    T = fit_temperatures(temp_part)
    assert metrics["calibration"]["temperatures"] == T.tolist()
    # the policy is the one calibrated on the other part alone
    by_hand = build_policy("risk", epsilon=0.1).fit(cal_part, None, "flops", temperature=T)
    assert metrics["fitted"]["threshold"] == by_hand.info["threshold"]
    # the two parts are disjoint and cover validation
    rows = torch.randperm(600, generator=torch.Generator().manual_seed(3))
    assert torch.equal(temp_part.labels, val.labels[rows[:150].sort().values])
    assert torch.equal(cal_part.labels, val.labels[rows[150:].sort().values])


def test_fit_app_calibrated_maxprob_fits_on_all_of_validation(run_dir: Path, tmp_path: Path) -> None:
    metrics = fit_run(
        fit_cfg([f"run_dir={run_dir}", "policy=maxprob", "calibrate=true", "budget.fraction=0.7"]), tmp_path / "fit"
    )
    val = Predictions.load(run_dir / "predictions" / "val.safetensors")
    assert (
        metrics["calibration"]["split"] is None
        and metrics["calibration"]["temperatures"] == fit_temperatures(val).tolist()
    )


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            ["calibrate_split=1.0"],
            r"calibrate_split must be a number in \(0, 1\) \(the share of validation the temperatures",
        ),
        (["calibrate_split=0.0001"], r"calibrate_split=0.0001 leaves one part of the 600 validation samples empty"),
        (["calibrate_seed=x"], "calibrate_seed must be an integer, got 'x'"),
    ],
)
def test_fit_app_bad_calibration_split_is_named(
    overrides: list[str], match: str, run_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(EENNError, match=match):
        fit_run(fit_cfg([f"run_dir={run_dir}", "policy=risk", "calibrate=true", *overrides]), tmp_path / "fit")
