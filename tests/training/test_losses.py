import pytest
import torch
import torch.nn.functional as F

from eenn.errors import EENNError
from eenn.training.losses import exit_loss_weights, self_distillation_kl


def test_loss_weight_schemes():
    torch.testing.assert_close(exit_loss_weights("uniform", 4), torch.full((4,), 0.25))
    # EENet: gamma_k = k / (K (K + 1))
    torch.testing.assert_close(exit_loss_weights("eenet", 3), torch.tensor([1 / 12, 2 / 12, 3 / 12]))
    torch.testing.assert_close(exit_loss_weights([0.2, 0.3, 0.5], 3), torch.tensor([0.2, 0.3, 0.5]))
    # Distiller's --earlyexit_lossweights 0.4: the early exit's weight, the final takes the rest
    torch.testing.assert_close(exit_loss_weights([0.4], 2), torch.tensor([0.4, 0.6]))


@pytest.mark.parametrize(
    "spec, message",
    [
        ([0.1, 0.2, 0.3, 0.4], "has 4 values"),
        ([-0.5, 1.0, 1.0], "non-negative"),
        ("geometric", "must be 'uniform', 'eenet'"),
    ],
)
def test_bad_loss_weights(spec, message):
    with pytest.raises(EENNError, match=message):
        exit_loss_weights(spec, 3)


def test_kl_matches_the_formula_and_vanishes_for_identical_exits():
    torch.manual_seed(0)
    logits = torch.randn(5, 3, 4)
    tau = 2.0
    expected = sum(
        tau**2
        * F.kl_div(
            F.log_softmax(logits[:, k] / tau, -1),
            F.log_softmax(logits[:, -1] / tau, -1),
            log_target=True,
            reduction="batchmean",
        )
        for k in range(2)
    )
    torch.testing.assert_close(self_distillation_kl(logits, tau), expected)
    same = logits[:, -1:].repeat(1, 3, 1)
    assert self_distillation_kl(same, tau).abs() < 1e-6


def test_kl_teacher_is_detached_by_default():
    logits = torch.randn(3, 2, 4, requires_grad=True)
    self_distillation_kl(logits, 1.0).backward()
    assert logits.grad[:, -1].abs().sum() == 0 and logits.grad[:, 0].abs().sum() > 0
    logits.grad = None
    self_distillation_kl(logits, 1.0, detach_teacher=False).backward()
    assert logits.grad[:, -1].abs().sum() > 0


def test_kl_mean_reduction_is_the_eenet_authors_kldivloss():
    # git-disl/EENet train.py: per early exit, nn.KLDivLoss()(log_softmax(z_k / T), softmax(z_K / T)) * T^2
    torch.manual_seed(1)
    logits = torch.randn(6, 3, 10)
    T = 3.0
    authors = sum(
        torch.nn.KLDivLoss()(torch.log_softmax(logits[:, k] / T, -1), torch.softmax(logits[:, -1] / T, -1)) * T * T
        for k in range(2)
    )
    torch.testing.assert_close(self_distillation_kl(logits, T, reduction="mean"), authors)
    # the classes averaged too: C times weaker than the KL itself
    torch.testing.assert_close(self_distillation_kl(logits, T, reduction="mean") * 10, self_distillation_kl(logits, T))
    with pytest.raises(EENNError, match=r"training.kl_reduction must be one of \('batchmean', 'mean'\), got 'sum'"):
        self_distillation_kl(logits, T, reduction="sum")


def test_the_eenet_experiments_distil_as_the_authors_code(compose_cfg):
    for name in ("eenet_resnet56_cifar10", "eenet_densenet121_cifar100", "eenet_msdnet35_imagenet"):
        t = compose_cfg("train", [f"experiment={name}"]).training
        assert (t.kl_alpha, t.kl_tau, t.kl_reduction, t.kl_start, t.kl_detach_teacher) == (
            0.01,
            3.0,
            "mean",
            0.75,
            False,
        )


def test_a_bad_kl_reduction_is_refused_before_training(compose_cfg):
    # the KL is switched on late (EENet: after 75 % of the epochs): a typo must not wait for it
    from eenn.data import EENNDataModule
    from eenn.tasks.train import build_network
    from eenn.training.joint import JointTraining

    net = build_network(compose_cfg("train", []), EENNDataModule())
    with pytest.raises(EENNError, match=r"training.kl_reduction must be one of \('batchmean', 'mean'\), got 'sum'"):
        JointTraining(net, 10, optimizer=torch.optim.SGD, kl_alpha=0.01, kl_reduction="sum")
