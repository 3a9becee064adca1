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


@pytest.mark.parametrize("spec, message", [([0.1, 0.2, 0.3, 0.4], "has 4 values"), ([-0.5, 1.0, 1.0], "non-negative"),
                                           ("geometric", "must be 'uniform', 'eenet'")])
def test_bad_loss_weights(spec, message):
    with pytest.raises(EENNError, match=message):
        exit_loss_weights(spec, 3)


def test_kl_matches_the_formula_and_vanishes_for_identical_exits():
    torch.manual_seed(0)
    logits = torch.randn(5, 3, 4)
    tau = 2.0
    expected = sum(
        tau**2 * F.kl_div(F.log_softmax(logits[:, k] / tau, -1), F.log_softmax(logits[:, -1] / tau, -1),
                          log_target=True, reduction="batchmean")
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
