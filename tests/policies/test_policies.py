"""The per-policy rules on hand-built predictions and bad input (what every policy shares is in
tests/contracts)."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from eenn.cost import profile_costs
from eenn.errors import EENNError
from eenn.evaluation.offline import evaluate
from eenn.policies import ExitPolicy, build_policy, policy_class
from eenn.policies.features import max_prob
from eenn.policies.simulate import simulate
from eenn.policies.synthetic import synthetic_predictions
from eenn.predictions import Predictions
from eenn.tasks.build import build_network
from tests.contracts import checks

from .helpers import EENET_FAST, logits_for_max_prob, predictions


def fitted(name: str, val: Predictions, fraction: float) -> ExitPolicy:
    """``name`` (its first example) fitted to ``fraction`` of the full cost, as the contracts fit it."""
    return checks.fitted(name, policy_class(name).examples[0], val, fraction)


@pytest.mark.parametrize("name", ["maxprob", "entropy", "margin", "eenet"])
def test_score_policies_spend_their_budget(name: str, val: Predictions) -> None:
    policy = fitted(name, val, 0.7)
    assert evaluate(policy, val, "flops")["avg_cost"] >= 0.99 * policy.budget


@pytest.mark.parametrize("name", ["maxprob", "entropy"])
def test_full_budget_sends_everyone_to_the_last_exit(name: str, val: Predictions) -> None:
    S = evaluate(fitted(name, val, 1.0), val, "flops")
    assert S["exit_fractions"] == [0.0, 0.0, 1.0]
    assert S["accuracy"] == pytest.approx(float(val.accuracy_per_exit()[-1]))


def test_static_reproduces_per_exit_accuracy_exactly(val: Predictions, test_preds: Predictions) -> None:
    for k in range(val.num_exits):
        policy = build_policy("static", exit=k).fit(val, None, "flops")
        for preds in (val, test_preds):
            S = evaluate(policy, preds, "flops")
            assert S["accuracy"] == float(preds.accuracy_per_exit()[k])
            assert S["avg_cost"] == float(preds.costs[k])
            assert S["exit_fractions"][k] == 1.0


def _oracle_case(correct: torch.Tensor, costs: list[float], heads: list[float]) -> Predictions:
    """Two-class predictions right exactly where ``correct`` (N, K) says."""
    logits = torch.where(correct[..., None], torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0]))
    return predictions(logits, [0] * correct.shape[0], costs, heads)


def test_oracle_exits_at_the_cheapest_correct_exit() -> None:
    # sample 0 right everywhere; sample 1 right only at exit 2; sample 2 never right -> last exit
    correct = torch.tensor([[True, True, True], [False, False, True], [False, False, False]])
    val = _oracle_case(correct, [1.0, 2.0, 3.0], [0.1, 0.2, 0.0])
    oracle = build_policy("oracle").fit(val, None, "flops")
    exit_idx, heads = simulate(oracle, val.logits, val.labels)
    assert exit_idx.tolist() == [0, 2, 2]
    assert heads[1].tolist() == [True, False, True]  # jumped over head 1
    S = evaluate(oracle, val, "flops")
    assert S["accuracy"] == pytest.approx(2 / 3)
    assert S["avg_cost"] == pytest.approx((1.0 + 2 * (3.0 - 0.2)) / 3)
    # at a budget that pays for nobody's correction the ceiling is exit 0's accuracy
    assert evaluate(build_policy("oracle_budget").fit(val, 1.0, "flops"), val, "flops")["accuracy"] == pytest.approx(
        1 / 3
    )
    # right at exits 1 and 2: a costly head at exit 1 makes jumping past it to exit 2 (2.5 - 0.6 = 1.9)
    # cheaper than stopping at exit 1 (2.0), so the oracle takes exit 2, not the earliest correct one
    correct = torch.tensor([[False, True, True], [True, True, True]])
    val = _oracle_case(correct, [1.0, 2.0, 2.5], [0.1, 0.6, 0.0])
    assert simulate(build_policy("oracle").fit(val, None, "flops"), val.logits, val.labels)[0].tolist() == [2, 0]


def _brute_force_ceiling(correct: torch.Tensor, jump: torch.Tensor, budget: float) -> float:
    """The best accuracy over every assignment of samples to exits whose mean jump cost is within
    the budget (the code's rule, B(1 + 1e-9))."""
    n, K = correct.shape
    best = -1.0
    for exits in itertools.product(range(K), repeat=n):
        if sum(float(jump[k]) for k in exits) / n <= budget * (1 + 1e-9):
            best = max(best, sum(bool(correct[i, k]) for i, k in enumerate(exits)) / n)
    return best


def test_oracle_budget_is_exact_when_a_later_exit_is_cheaper_to_jump_to() -> None:
    # the counterexample: jumping straight to exit 2 costs 10.5 - 8.5 = 2, exit 1 costs 10;
    # every sample is wrong at exit 0 and right at exits 1 and 2, so budget 4 pays for all of them
    correct = torch.tensor([[False, True, True]] * 3)
    val = _oracle_case(correct, [1.0, 10.0, 10.5], [0.1, 8.5, 0.1])
    S = evaluate(build_policy("oracle_budget").fit(val, 4.0, "flops"), val, "flops")
    assert S["accuracy"] == 1.0
    assert S["exit_fractions"] == [0.0, 0.0, 1.0]
    assert S["avg_cost"] == pytest.approx(2.0)


def test_oracle_budget_equals_brute_force_on_random_small_cases() -> None:
    g = torch.Generator().manual_seed(0)
    for case in range(250):
        n, K = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(2, 5, (1,), generator=g))
        correct = torch.rand(n, K, generator=g) < 0.5
        stages = torch.rand(K, generator=g, dtype=torch.float64) * 4 + 0.1
        # heads of up to 10 (more than a stage) make a later exit cheaper to jump to than an earlier one
        heads = torch.rand(K, generator=g, dtype=torch.float64) * 10
        val = _oracle_case(correct, (stages + heads).cumsum(0).tolist(), heads.tolist())
        # jumping to exit k runs the stages up to k and evaluates heads 0 and k
        jump = stages.cumsum(0) + heads + heads[0] * (torch.arange(K) > 0)
        budget = float(jump.min() + torch.rand(1, generator=g, dtype=torch.float64) * (jump.max() - jump.min()))
        S = evaluate(build_policy("oracle_budget").fit(val, budget, "flops"), val, "flops")
        assert S["avg_cost"] <= budget * (1 + 1e-9), case
        assert S["accuracy"] == pytest.approx(_brute_force_ceiling(correct, jump, budget)), case


def test_oracles_refuse_to_run_online(val: Predictions) -> None:
    oracle = build_policy("oracle").fit(val, None, "flops")
    with pytest.raises(EENNError, match="runs only offline"):
        oracle.init_state(4)
    with pytest.raises(EENNError, match="needs the labels"):
        simulate(oracle, val.logits)


# ------------------------------------------------------------------------- per-policy rules
def test_entropy_thresholds_from_config_are_entropies_in_nats() -> None:
    # Distiller's --earlyexit_thresholds: exit at exit 0 when the entropy is below t
    p = [0.99, 0.9, 0.6]
    e0 = logits_for_max_prob(p, [0, 0, 0])
    val = predictions(torch.stack([e0, e0], 1), [0, 0, 0], [1.0, 2.0])
    h = [-(q * math.log(q) + (1 - q) * math.log(1 - q)) for q in p]  # 0.056, 0.325, 0.673 nats
    policy = build_policy("entropy", thresholds=[0.4]).fit(val, None, "flops")
    assert simulate(policy, val.logits)[0].tolist() == [0, 0, 1]
    assert h[1] < 0.4 < h[2]
    assert policy.info["fitted_to_budget"] is False
    xent = build_policy("entropy", thresholds=[0.2], criterion="cross_entropy").fit(val, None, "flops")
    assert simulate(xent, val.logits)[0].tolist() == [0, 0, 1]  # -log p: 0.01, 0.105, 0.51


def test_maxprob_thresholds_from_config() -> None:
    e0 = logits_for_max_prob([0.95, 0.7, 0.8], [0, 0, 0])
    val = predictions(torch.stack([e0, e0, e0], 1), [0, 0, 0], [1.0, 2.0, 3.0])
    policy = build_policy("maxprob", thresholds=[0.9, 0.75]).fit(val, None, "flops")
    assert simulate(policy, val.logits)[0].tolist() == [0, 2, 1]


def test_patience_counts_repeated_predictions() -> None:
    # predictions over 4 exits: a a a a | a b b b | a b a b
    seqs = [[0, 0, 0, 0], [0, 1, 1, 1], [0, 1, 0, 1]]
    logits = torch.stack([logits_for_max_prob([0.9] * 4, s) for s in seqs])
    val = predictions(logits, [0, 1, 1], [1.0, 2.0, 3.0, 4.0])
    want = {0: [0, 0, 0], 1: [1, 2, 3], 2: [2, 3, 3], 3: [3, 3, 3]}
    for p, exits in want.items():
        policy = build_policy("patience", patience=p).fit(val, None, "flops")
        assert simulate(policy, val.logits)[0].tolist() == exits, p


def test_deex_offloads_low_confidence_samples_past_the_edge_exits() -> None:
    # 4 exits: exit 0 decides (p_d = 0.7); edge exits 1, 2 (p_tar = 0.8 at exit 1, exit 2 always)
    conf = [[0.6, 0.9, 0.9, 0.9], [0.9, 0.85, 0.9, 0.9], [0.9, 0.7, 0.6, 0.9]]
    logits = torch.stack([logits_for_max_prob(c, [0] * 4) for c in conf])
    val = predictions(logits, [0, 0, 0], [1.0, 2.0, 3.0, 4.0], [0.1, 0.1, 0.1, 0.0])
    policy = build_policy("deex", p_d=0.7, p_tar=0.8).fit(val, None, "flops")
    exit_idx, heads = simulate(policy, val.logits)
    assert exit_idx.tolist() == [3, 1, 2]
    assert heads.tolist() == [[True, False, False, True], [True, True, False, False], [True, True, True, False]]
    S = evaluate(policy, val, "flops")
    assert S["exit_fractions"][0] == 0.0  # the decision exit never answers
    assert S["avg_cost"] == pytest.approx((4.0 - 0.2 + 2.0 + 3.0) / 3)


def test_deex_fits_p_d_to_the_budget(val: Predictions) -> None:
    policy = build_policy("deex", p_tar=0.8).fit(val, 0.8 * float(val.costs[-1]), "flops")
    s = max_prob(val.logits[:, 0])
    offloaded = float((s < policy.fitted_p_d).double().mean())
    S = evaluate(policy, val, "flops")
    assert S["exit_fractions"][-1] == pytest.approx(offloaded)
    # one more offloaded sample would break the budget
    above = s[s >= policy.fitted_p_d].min()
    more = build_policy("deex", p_d=float(torch.nextafter(above, torch.tensor(2.0))), p_tar=0.8).fit(val, None, "flops")
    assert evaluate(more, val, "flops")["avg_cost"] > policy.budget


def test_eenet_scores_start_as_max_prob_and_training_changes_them(val: Predictions) -> None:
    from eenn.policies.eenet_scheduler import EENetScheduler

    sched = EENetScheduler(val.num_exits, val.num_classes)
    policy = build_policy("eenet", **EENET_FAST)
    policy.scheduler, policy.num_exits, policy.num_classes = sched, val.num_exits, val.num_classes
    assert torch.allclose(policy.score_matrix(val.logits), max_prob(val.logits.flatten(0, 1)).view(-1, 3))
    trained = build_policy("eenet", **EENET_FAST).fit(val, 0.6 * float(val.costs[-1]), "flops")
    assert not torch.allclose(trained.score_matrix(val.logits), policy.score_matrix(val.logits))
    assert trained.info["epochs"] > 0
    assert sum(trained.info["exit_distribution"]) == pytest.approx(1.0)


def test_eenet_records_its_scheduler_cost_and_it_is_small_beside_the_demo_exits(val: Predictions, compose_cfg) -> None:
    policy = build_policy("eenet", **EENET_FAST).fit(val, 0.6 * float(val.costs[-1]), "flops")
    C = val.num_classes
    flops = [2 * (C + 3 + k) + 7 * C + (k + 1) ** 2 for k in range(val.num_exits)]
    assert policy.info["scheduler_flops"] == flops
    spent = torch.tensor(flops, dtype=torch.float64).cumsum(0)
    assert policy.info["scheduler_cost_fraction"] == pytest.approx(float((spent / val.costs).max()))
    # the smallest network eenn ships a demo of: `make demo`'s ResNet-20 on 8x8 digits, whose
    # first exit costs 0.15 of the full model; g_0..g_k stay below 0.1% of any exit's cost
    cfg = compose_cfg("pipeline", ["exits=early"])
    meta = cfg.data.meta
    network = build_network(cfg, SimpleNamespace(num_classes=meta.num_classes, input_shape=tuple(meta.input_shape)))
    costs = torch.tensor(profile_costs(network, tuple(meta.input_shape), latency=False).per_exit("flops"))
    demo = build_policy("eenet")
    demo.num_exits, demo.num_classes, demo.cost_unit = len(costs), meta.num_classes, "flops"
    assert 0 < demo.scheduler_cost(costs)["scheduler_cost_fraction"] < 1e-3
    demo.cost_unit = "latency_ms"  # only FLOPs and MACs can be compared
    assert demo.scheduler_cost(costs)["scheduler_cost_fraction"] is None


def test_eenet_learns_class_dependent_confidence_that_max_prob_misses() -> None:
    # classes 0-4 are predicted with shrunken logits (right as often, but unsure): EENet's g sees
    # the softmax vector, so it can learn to trust them; max prob cannot (EENet sec. 4.3, Fig. 4)
    def shrunk(n: int, seed: int) -> Predictions:
        p = synthetic_predictions(n, seed=seed)
        p.logits = p.logits * torch.where(p.logits.argmax(-1) < 5, 0.35, 1.0)[..., None]
        return p

    val, test = shrunk(1500, 20), shrunk(3000, 21)
    budget = 0.55 * float(val.costs[-1])
    eenet = evaluate(build_policy("eenet", max_epochs=100).fit(val, budget, "flops"), test, "flops")
    msdnet = evaluate(build_policy("maxprob").fit(val, budget, "flops"), test, "flops")
    assert eenet["avg_cost"] <= msdnet["avg_cost"] * 1.01
    assert eenet["accuracy"] > msdnet["accuracy"] + 0.01


# --------------------------------------------------------------------------------- bad input
def test_unknown_policy_lists_the_valid_names() -> None:
    with pytest.raises(EENNError, match=r"policy.name='nope' is not a known exit policy; valid: deex, eenet, entropy"):
        build_policy("nope")


def test_unknown_option_names_it() -> None:
    with pytest.raises(EENNError, match=r"does not take the option\(s\) \['bogus'\]"):
        build_policy("maxprob", bogus=1)


@pytest.mark.parametrize(
    ("name", "cfg", "match"),
    [
        ("maxprob", {"thresholds": ["a"]}, "policy.thresholds must be a list of finite numbers"),
        ("entropy", {"criterion": "gini"}, "policy.criterion must be one of"),
        ("patience", {"patience": -1}, "policy.patience must be a non-negative integer"),
        ("deex", {"p_d": 1.5}, r"policy.p_d must be a probability in \[0, 1\]"),
        ("static", {"exit": "last"}, "policy.exit must be an integer"),
        ("eenet", {"lr": 0}, "policy.lr must be a positive number"),
    ],
)
def test_bad_hyper_parameters(name: str, cfg: dict, match: str) -> None:
    with pytest.raises(EENNError, match=match):
        build_policy(name, **cfg)


@pytest.mark.parametrize("budget", [0, -1.0, math.nan, math.inf, "abc", True])
def test_bad_budgets(budget, val: Predictions) -> None:
    with pytest.raises(EENNError, match="budget must be a"):
        build_policy("maxprob").fit(val, budget, "flops")


def test_fit_errors(val: Predictions) -> None:
    with pytest.raises(EENNError, match="needs 2 values"):
        build_policy("maxprob", thresholds=[0.5]).fit(val, None, "flops")
    with pytest.raises(EENNError, match="needs a budget or policy.thresholds"):
        build_policy("maxprob").fit(val, None, "flops")
    with pytest.raises(EENNError, match="policy 'eenet' needs a budget"):
        build_policy("eenet").fit(val, None, "flops")
    with pytest.raises(EENNError, match="below the cheapest possible average cost"):
        build_policy("maxprob").fit(val, 0.1 * float(val.costs[0]), "flops")
    with pytest.raises(EENNError, match="below the cheapest DEEx schedule"):
        build_policy("deex").fit(val, float(val.costs[0]), "flops")
    with pytest.raises(EENNError, match="out of range for 3 exits"):
        build_policy("static", exit=3).fit(val, None, "flops")
    with pytest.raises(EENNError, match="cost unit 'joules' is not in the predictions file"):
        build_policy("maxprob").fit(val, 1.0, "joules")


def test_predictions_of_another_model_are_refused(val: Predictions) -> None:
    policy = build_policy("maxprob").fit(val, 0.6 * float(val.costs[-1]), "flops")
    with pytest.raises(EENNError, match="was fitted on K=3 exits and C=10 classes, the predictions have K=3 and C=4"):
        simulate(policy, torch.zeros(5, 3, 4))


def test_corrupt_policy_file(tmp_path) -> None:
    bad = tmp_path / "policy.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(EENNError, match="policy file .* is not a readable safetensors file"):
        ExitPolicy.load(bad)
    with pytest.raises(EENNError, match="does not exist"):
        ExitPolicy.load(tmp_path / "missing.safetensors")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda t: t.__setitem__(0, -math.inf),
            "'thresholds' must be finite or \\+inf at the early exits and -inf at the last",
        ),
        (
            lambda t: t.__setitem__(2, 0.5),
            "'thresholds' must be finite or \\+inf at the early exits and -inf at the last",
        ),
    ],
)
def test_a_policy_file_with_an_infinity_fitting_never_writes_is_refused(val, tmp_path, edit, message):
    from safetensors.torch import load_file, save_file

    policy = build_policy("maxprob").fit(val, 0.6 * float(val.costs[-1]), "flops")
    policy.save(tmp_path / "p.safetensors")
    ExitPolicy.load(tmp_path / "p.safetensors")  # as fitted: +inf nowhere, -inf at the last exit
    tensors = load_file(tmp_path / "p.safetensors")
    edit(tensors["thresholds"])
    from safetensors import safe_open

    with safe_open(str(tmp_path / "p.safetensors"), "pt") as fh:
        meta = fh.metadata()
    save_file(tensors, str(tmp_path / "p.safetensors"), meta)
    with pytest.raises(EENNError, match=message):
        ExitPolicy.load(tmp_path / "p.safetensors")


def test_an_eenet_policy_file_with_inf_in_its_scorer_is_refused(val, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    policy = build_policy("eenet", max_epochs=5, patience=5).fit(val, 0.6 * float(val.costs[-1]), "flops")
    policy.save(tmp_path / "p.safetensors")
    tensors = load_file(tmp_path / "p.safetensors")
    name = next(k for k in tensors if k.startswith("g."))
    tensors[name] = torch.full_like(tensors[name], math.inf)
    with safe_open(str(tmp_path / "p.safetensors"), "pt") as fh:
        meta = fh.metadata()
    save_file(tensors, str(tmp_path / "p.safetensors"), meta)
    with pytest.raises(EENNError, match=f"its tensor '{name}' holds inf"):
        ExitPolicy.load(tmp_path / "p.safetensors")
