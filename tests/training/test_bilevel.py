"""Bi-level gater-and-backbone training (Budget-aware EENN, eq. 4-12): the exit distribution, which
parameters each step moves, the gater's schedule, checkpoint/resume, and a run through eenn-train."""

from __future__ import annotations

import copy
import json
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from eenn.cost import profile_costs
from eenn.errors import EENNError
from eenn.models import build_multi_exit
from eenn.predictions import Predictions
from eenn.tasks.train import train
from eenn.training.bilevel import BilevelTraining
from eenn.training.gater import Gater, confidence_features, exit_log_probs, tempered_exit_distribution

SHAPE, C = (1, 8, 8), 10


def make_network(seed: int = 0):
    torch.manual_seed(seed)
    return build_multi_exit(
        {"name": "cifar_resnet", "depth": 20},
        {"at": "stages", "head": {"name": "linear"}},
        num_classes=C,
        input_shape=SHAPE,
    )


def make_module(seed: int = 0, **kw) -> BilevelTraining:
    net = make_network(seed)
    kw.setdefault("scheduler", partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=3))
    kw.setdefault("gater_scheduler", partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=3, eta_min=1e-5))
    kw.setdefault("optimizer", partial(torch.optim.SGD, lr=0.05, momentum=0.9))
    return BilevelTraining(net, C, cost_profile=profile_costs(net, SHAPE, latency=False), **kw)


def loader(batches: int, bs: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batches * bs, *SHAPE, generator=g)
    y = torch.randint(0, C, (batches * bs,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=bs)


def trainer(**kw) -> pl.Trainer:
    opts = dict(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    return pl.Trainer(**{**opts, **kw})


def params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def grads(module: torch.nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in module.parameters()]


def same_grads(a: list[torch.Tensor | None], b: list[torch.Tensor | None]) -> bool:
    return all(
        (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y)) for x, y in zip(a, b)
    )


# ------------------------------------------------------------------------- eq. 5 and 9
def test_exit_probabilities_follow_eq5_and_sum_to_one():
    z = torch.randn(64, 4) * 6  # gate logits of 4 early exits, K = 5, saturated ones included
    pr = exit_log_probs(z).exp()
    assert pr.shape == (64, 5)
    torch.testing.assert_close(pr.sum(1), torch.ones(64, dtype=pr.dtype))
    p = torch.sigmoid(z)
    expected = [
        p[:, 0],
        p[:, 1] * (1 - p[:, 0]),
        p[:, 2] * (1 - p[:, 0]) * (1 - p[:, 1]),
        p[:, 3] * (1 - p[:, :3]).prod(1),
        (1 - p).prod(1),
    ]
    torch.testing.assert_close(pr, torch.stack(expected, 1))


def test_tempered_distribution_sums_to_one_and_flattens_as_t_grows():
    log_pr = exit_log_probs(torch.randn(32, 2) * 3)
    for t in (0.1, 0.5, 1.0, 3.0):
        torch.testing.assert_close(tempered_exit_distribution(log_pr, t).sum(1), torch.ones(32))
    torch.testing.assert_close(tempered_exit_distribution(log_pr, 1.0), log_pr.exp())
    torch.testing.assert_close(tempered_exit_distribution(log_pr, 1e9), torch.full((32, 3), 1 / 3))
    sharp = tempered_exit_distribution(log_pr, 1e-3)
    torch.testing.assert_close(sharp.argmax(1), log_pr.argmax(1))
    # T -> 0 is one-hot wherever the two likeliest exits are not (near-)tied
    top2 = log_pr.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.01
    assert bool(clear.any()) and bool((sharp.max(1).values[clear] > 0.99).all())


def test_confidence_features_and_gater_shapes():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [10.0, 0.0, 0.0, 0.0]])
    f = confidence_features(logits, ["confidence", "entropy", "margin"])
    torch.testing.assert_close(f[0], torch.tensor([0.25, 1.0, 0.0]))  # uniform: entropy 1 after / log C
    assert f[1, 0] > 0.99 and f[1, 1] < 0.01 and f[1, 2] > 0.99
    for shared in (True, False):
        g = Gater(num_exits=3, features=["confidence", "entropy"], hidden=8, shared=shared)
        assert g(torch.randn(5, 3, C)).shape == (5, 2)
        torch.testing.assert_close(g.exit_distribution(torch.randn(5, 3, C), 0.5).sum(1), torch.ones(5))
    with pytest.raises(EENNError, match="training.features"):
        Gater(3, features=["confidence", "variance"])


# --------------------------------------------------------------------- which side moves
def test_inner_gradient_reaches_theta_through_a():
    module = make_module()
    x, y = torch.randn(8, *SHAPE), torch.randint(0, C, (8,))
    w = next(module.network.stages[0].parameters())
    logits = module.network(x)
    ce = module.exit_ce(logits, y)
    loss, a = module.inner_loss(logits, ce)
    full = torch.autograd.grad(loss, w, retain_graph=True)[0]
    weight = (a.detach() + 1) * (ce + module.cost_weight * module.exit_costs)
    ce_only = torch.autograd.grad(weight.sum(1).mean(), w, retain_graph=True)[0]
    # eq. 11's second term, (CE + lambda Cost) dA/dtheta, is what separates the two
    through_a = torch.autograd.grad(((ce.detach() + module.cost_weight * module.exit_costs) * a).sum(1).mean(), w)[0]
    assert through_a.abs().sum() > 0
    torch.testing.assert_close(full, ce_only + through_a)


def test_without_grad_through_gater_a_only_weights_the_samples():
    module = make_module(grad_through_gater=False)
    x, y = torch.randn(8, *SHAPE), torch.randint(0, C, (8,))
    w = next(module.network.stages[0].parameters())
    logits = module.network(x)
    ce = module.exit_ce(logits, y)
    loss, a = module.inner_loss(logits, ce)
    got = torch.autograd.grad(loss, w, retain_graph=True)[0]
    weighted = ((a.detach() + 1) * (ce + module.cost_weight * module.exit_costs)).sum(1).mean()
    torch.testing.assert_close(got, torch.autograd.grad(weighted, w)[0])
    assert torch.autograd.grad(a.sum(), w, allow_unused=True)[0] is None  # no path from A back to theta


def test_joint_warmup_trains_theta_on_the_plain_sum_of_exit_losses():
    x, y = torch.randn(8, *SHAPE), torch.randint(0, C, (8,))
    for warmup in (1, 0):  # a module outside a trainer is at epoch 0: in the warm-up, or past it
        module = make_module(joint_warmup_epochs=warmup)
        logits = module.network(x)
        ce = module.exit_ce(logits, y)
        loss, a = module.inner_loss(logits, ce)
        weight = torch.ones_like(a) if warmup else a + 1
        torch.testing.assert_close(loss, (weight * (ce + module.cost_weight * module.exit_costs)).sum(1).mean())


def synthetic_exits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (n, 3, C) of samples of spread difficulty: exit k is right with margin growing in k,
    and a sample's confidence at each exit falls with its difficulty (what a trained network shows)."""
    g = torch.Generator().manual_seed(seed)
    difficulty = torch.rand(n, generator=g)
    y = torch.randint(0, C, (n,), generator=g)
    logits = torch.randn(n, 3, C, generator=g)
    for k in range(3):
        logits[torch.arange(n), k, y] += (k + 1) * 2.5 * (1 - difficulty) - 1.5 * difficulty
    return logits, y


@pytest.mark.parametrize("budget, start_lambda", [(0.55, 6.0), (0.8, 0.0)])
def test_dual_ascent_lambda_moves_the_expected_cost_towards_the_budget(budget, start_lambda):
    # the gater's steps (eq. 12) with and without dual ascent, from a lambda far from the budget's
    def run(target):
        module = make_module(budget=target, cost_weight=start_lambda, budget_lr=0.05)
        opt = torch.optim.Adam(module.gater.parameters(), lr=1e-3)
        for step in range(400):
            logits, y = synthetic_exits(64, step)
            loss, a = module.outer_loss(logits, module.exit_ce(logits, y))
            opt.zero_grad()
            loss.backward()
            opt.step()
            module._dual_ascent(a.detach())
        logits, y = synthetic_exits(2000, -1)
        with torch.no_grad():
            return float(module.expected_cost(module.exit_distribution(logits))), float(module.cost_weight)

    fixed_cost, fixed_lambda = run(None)
    cost, lam = run(budget)
    assert fixed_lambda == start_lambda and lam != start_lambda
    assert abs(cost - budget) < 0.05 < abs(fixed_cost - budget), (cost, fixed_cost, lam)


def test_budget_and_lambda_are_checked():
    with pytest.raises(EENNError, match="training.budget is a fraction"):
        make_module(budget=0.1)
    with pytest.raises(EENNError, match="training.budget is a fraction"):
        make_module(budget=1.5)
    with pytest.raises(EENNError, match="training.cost_weight"):
        make_module(cost_weight=float("nan"))
    with pytest.raises(EENNError, match="training.joint_warmup_epochs"):
        make_module(joint_warmup_epochs=-2)


@pytest.mark.parametrize("unit, base", [("gflops", "flops"), ("gmacs", "macs")])
def test_an_absolute_cost_unit_weighs_the_losses_in_1e9_units_and_keeps_the_budget_a_fraction(unit, base):
    relative, absolute = make_module(), make_module(cost_unit=unit, budget=0.6)
    per_exit = torch.tensor(profile_costs(absolute.network, SHAPE, latency=False).per_exit(base), dtype=torch.float64)
    torch.testing.assert_close(absolute.exit_costs, (per_exit / 1e9).float())
    torch.testing.assert_close(absolute.exit_cost_fractions, relative.exit_costs)  # the budget's unit: fractions
    torch.testing.assert_close(relative.exit_cost_fractions, relative.exit_costs)
    x, y = torch.randn(8, *SHAPE), torch.randint(0, C, (8,))
    logits = absolute.network(x)
    ce = absolute.exit_ce(logits, y)
    loss, a = absolute.inner_loss(logits, ce)
    torch.testing.assert_close(loss, ((a + 1) * (ce + absolute.cost_weight * per_exit.float() / 1e9)).sum(1).mean())
    torch.testing.assert_close(absolute.expected_cost(a), (a * relative.exit_costs).sum(1).mean())
    with pytest.raises(
        EENNError,
        match=r"training.cost_unit='gjoules' is not in the cost profile; measured units: "
        r".* and \['gflops', 'gmacs'\]",
    ):
        make_module(cost_unit="gjoules")


def test_inner_step_moves_only_theta_and_outer_step_only_phi(monkeypatch):
    module = make_module(gater_every=2)
    seen = []
    original = BilevelTraining._step

    def spy(self, opt, loss, clip=None):
        before_net, before_gater = params(self.network), params(self.gater)
        net_grads, gater_grads = grads(self.network), grads(self.gater)
        original(self, opt, loss, clip)
        side = "theta" if opt.optimizer is self.trainer.optimizers[0] else "phi"
        # each backward leaves the other side's gradients as they were (None, or the last step's)
        if side == "theta":
            assert same_grads(gater_grads, grads(self.gater))
            assert not same(before_net, params(self.network)) and same(before_gater, params(self.gater))
        else:
            assert same_grads(net_grads, grads(self.network))
            assert same(before_net, params(self.network)) and not same(before_gater, params(self.gater))
        seen.append(side)

    monkeypatch.setattr(BilevelTraining, "_step", spy)
    trainer().fit(module, train_dataloaders=loader(4))
    assert seen == ["theta", "theta", "phi", "theta", "theta", "phi"]


def test_gater_steps_exactly_every_n_batches_and_global_step_counts_both():
    module = make_module(gater_every=3)
    changed = []

    class Watch(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.before = params(pl_module.gater)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            changed.append(not same(self.before, params(pl_module.gater)))

    t = trainer(max_epochs=2, callbacks=[Watch()])
    t.fit(module, train_dataloaders=loader(4))  # 8 batches over 2 epochs: the count spans epochs
    assert changed == [False, False, True, False, False, True, False, False]
    assert module.batches_seen == 8 and t.global_step == 8 + 2
    lrs = [t.optimizers[1].param_groups[0]["lr"], t.lr_scheduler_configs[1].scheduler.last_epoch]
    assert lrs[1] == 2 and lrs[0] < 1e-3  # the gater's cosine schedule stepped once per epoch


def test_frozen_backbone_gets_no_updates(tmp_path):
    source = make_module(seed=1)
    ckpt = tmp_path / "stage1.ckpt"
    torch.save({"state_dict": source.state_dict()}, ckpt)
    module = make_module(seed=2, freeze_backbone=True, init_checkpoint=str(ckpt))
    before = {k: v.clone() for k, v in module.network.state_dict().items()}
    for k, v in before.items():
        torch.testing.assert_close(v, source.network.state_dict()[k])
    gater_before = params(module.gater)
    t = trainer()
    t.fit(module, train_dataloaders=loader(3))
    assert len(t.optimizers) == 1 and t.global_step == 3  # the gater's, stepped on every batch
    for k, v in module.network.state_dict().items():  # weights and batch-norm statistics
        assert torch.equal(v, before[k]), k
    assert not same(gater_before, params(module.gater))
    with pytest.raises(EENNError, match="needs training.init_checkpoint"):
        make_module(freeze_backbone=True)
    with pytest.raises(EENNError, match="init_checkpoint='/nonexistent.ckpt' does not exist"):
        make_module(init_checkpoint="/nonexistent.ckpt")


# ----------------------------------------------------------------- checkpoint and resume
def test_both_optimisers_schedulers_and_gater_count_resume(tmp_path):
    module = make_module(gater_every=2)
    t1 = trainer()
    t1.fit(module, train_dataloaders=loader(5))
    ckpt = tmp_path / "mid.ckpt"
    t1.save_checkpoint(ckpt)
    saved = copy.deepcopy([o.state_dict() for o in t1.optimizers])
    saved_sched = [c.scheduler.state_dict() for c in t1.lr_scheduler_configs]
    assert [len(s["state"]) for s in saved] == [
        len(list(module.network.parameters())),
        len(list(module.gater.parameters())),
    ]

    restored = {}

    class Capture(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            restored["opt"] = copy.deepcopy([o.state_dict() for o in trainer.optimizers])
            restored["sched"] = [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs]
            restored["batches"] = pl_module.batches_seen

    fresh = make_module(seed=3, gater_every=2)
    trainer(max_epochs=2, callbacks=[Capture()]).fit(
        fresh, train_dataloaders=loader(5), ckpt_path=ckpt, weights_only=True
    )
    assert restored["batches"] == 5
    assert restored["sched"] == saved_sched
    for got, want in zip(restored["opt"], saved):
        assert got["param_groups"] == want["param_groups"]
        for i, state in want["state"].items():
            for name, value in state.items():
                assert torch.equal(torch.as_tensor(got["state"][i][name]), torch.as_tensor(value)), (i, name)


def test_ema_weights_are_checkpointed_as_the_network_and_swapped_back_on_resume(tmp_path):
    module = make_module(ema_decay=0.5)
    t1 = trainer()
    t1.fit(module, train_dataloaders=loader(3))
    ema = {k: v.clone() for k, v in module.ema.module.state_dict().items()}
    for k, v in module.network.state_dict().items():  # after fit the network holds the EMA weights
        assert torch.equal(v, ema[k]), k
    # a checkpoint saved during training: network.* = EMA, ema.module.* = the trained weights
    module2 = make_module(ema_decay=0.5)
    path = tmp_path / "ema.ckpt"

    class SaveMidway(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 1:
                trainer.save_checkpoint(path)
                self.raw = {k: v.clone() for k, v in pl_module.network.state_dict().items()}
                self.ema = {k: v.clone() for k, v in pl_module.ema.module.state_dict().items()}

    cb = SaveMidway()
    trainer(callbacks=[cb]).fit(module2, train_dataloaders=loader(3))
    state = torch.load(path, weights_only=True)["state_dict"]
    for k in cb.raw:
        assert torch.equal(state[f"network.{k}"], cb.ema[k]) and torch.equal(state[f"ema.module.{k}"], cb.raw[k])
    resumed = make_module(seed=4, ema_decay=0.5)
    ck = torch.load(path, weights_only=True)
    resumed.on_load_checkpoint(ck)  # what Lightning calls before loading the state dict on resume
    resumed.load_state_dict(ck["state_dict"])
    for k in cb.raw:
        assert torch.equal(resumed.network.state_dict()[k], cb.raw[k]) and torch.equal(
            resumed.ema.module.state_dict()[k], cb.ema[k]
        )


# ------------------------------------------------------------------------- configuration
def test_trainer_level_clipping_and_accumulation_are_refused():
    with pytest.raises(EENNError, match="trainer.gradient_clip_val=1.0 .*training.clip_grad_norm"):
        trainer(gradient_clip_val=1.0).fit(make_module(), train_dataloaders=loader(1))
    with pytest.raises(EENNError, match="trainer.accumulate_grad_batches=2"):
        trainer(accumulate_grad_batches=2).fit(make_module(), train_dataloaders=loader(1))


class NormRecordingSGD(torch.optim.SGD):
    """SGD that records, at each step, the L2 norm of the gradient it is about to apply."""

    norms: list[float] = []

    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        NormRecordingSGD.norms.append(
            float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        )
        return super().step(closure)


@pytest.mark.parametrize("clip", [None, 1e-3])
def test_module_clipping_bounds_the_norm_of_thetas_step(clip):
    NormRecordingSGD.norms = []
    module = make_module(clip_grad_norm=clip, optimizer=partial(NormRecordingSGD, lr=0.05))
    trainer().fit(module, train_dataloaders=loader(3))
    assert len(NormRecordingSGD.norms) == 3  # theta's step on each batch (the gater has its own Adam)
    if clip is None:
        assert min(NormRecordingSGD.norms) > 1e-2  # unclipped, far above the bound the other case sets
    else:
        assert max(NormRecordingSGD.norms) <= clip * (1 + 1e-4)


def test_recipe_options_run_together():
    module = make_module(
        label_smoothing=0.1, mixup_alpha=0.8, cutmix_alpha=1.0, ema_decay=0.9, ema_warmup=True, gater_every=1
    )
    trainer().fit(module, train_dataloaders=loader(2))
    assert module.batches_seen == 2 and all(torch.isfinite(p).all() for p in module.parameters())
    with pytest.raises(EENNError, match="cost_unit='latency_ms'"):
        make_module(cost_unit="latency_ms")


def test_eenn_train_with_bilevel_writes_a_complete_run_dir(compose_cfg, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = compose_cfg(
        "train",
        [
            "training=bilevel",
            "training.gater_every=2",
            "data=digits",
            "logger=csv",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=4",
            "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1",
            "cost.latency=false",
            "trainer.enable_progress_bar=false",
        ],
    )
    metrics = train(cfg)
    run = Path(cfg.paths.output_dir)
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert json.loads((run / "metrics.json").read_text())["exit_names"] == ["layer1.2", "layer2.2", "final"]
    costs = json.loads((run / "costs.json").read_text())
    for split, n in {"val": 287, "test": 360}.items():
        p = Predictions.load(run / "predictions" / f"{split}.safetensors")
        assert p.logits.shape == (n, 3, 10) and p.costs.tolist() == [e["flops"] for e in costs["exits"]]
        assert p.accuracy_per_exit().tolist() == pytest.approx(list(metrics[f"{split}_accuracy"].values()))
    header = (run / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    for col in (
        "train/loss_epoch",
        "train/gater_loss",
        "train/expected_cost",
        "train/ce/layer1_2",
        "train/exit_prob/layer1_2",
        "train/exit_prob/final",
        "lr-SGD",
        "lr-Adam",
    ):
        assert col in header, col
